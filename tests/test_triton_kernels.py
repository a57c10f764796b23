"""The Triton kernels (hvd_distef/_triton_kernels.py) against the torch path, run on the CPU through
Triton's interpreter in a process of their own (tests/triton_interpret.py), on small inputs whose
blocks span several tasks and share sign words. Bits are compared exactly; so are scales, errors
and updates: the per-element arithmetic is the torch path's, operation for operation, and on these
inputs the float64 block sums round to the same float32 scales whatever their order."""
import importlib.util
import subprocess
import sys

import pytest
import torch

import triton_interpret as ti
from conftest import ROOT
from hvd_distef import _torch_kernels as ref
from hvd_distef.kernel_args import Descent, Grads, Momentum

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (scripts/install.sh installs it for the tests)")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "out.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpret.py"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out)


def assert_equal(actual, expected):
    """Same values, bit for bit (NaN-free inputs; -0.0 and 0.0 count as equal, as in the C++ tests)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"{(actual != expected).sum()} of {actual.numel()} differ"


CASES = sorted(ti.cases())


@pytest.mark.parametrize("case", CASES)
def test_compress(interpreted, case):
    x, blocks, _ = ti.cases()[case]
    scales, bits = interpreted[case, "compress"]
    s_ref, b_ref = ref.blocksign_compress(x, blocks)
    assert_equal(bits, b_ref)
    assert_equal(scales, s_ref)


@pytest.mark.parametrize("case", CASES)
def test_worker_steps_deferred(interpreted, case):
    """Three worker steps (each settling the last one's payload, two ratios and an idle stretch):
    every payload and the error buffer as the torch path leaves them."""
    x, blocks, _ = ti.cases()[case]
    n = x.numel()
    d_list, error = ti.steps(n, 20)
    sent_ref, e_ref = ti.run_worker_steps(ref, d_list, error, blocks, ti.segments(n))
    sent, e = interpreted[case, "worker"]
    for (s, b), (s_ref, b_ref) in zip(sent, sent_ref):
        assert_equal(b, b_ref)
        assert_equal(s, s_ref)
    assert_equal(e, e_ref)


@pytest.mark.parametrize("case", CASES)
def test_server_step(interpreted, case):
    x, blocks, _ = ti.cases()[case]
    n = x.numel()
    d_list, error = ti.steps(n, 20)
    prev = ti.run_worker_steps(ref, d_list, error, blocks, ti.segments(n))[0][-1]
    scales, bits, e_ref = ti.server_inputs(n, blocks, 30)
    s_ref, b_ref = ref.blocksign_server_feedback(scales, bits, e_ref, blocks, ti.segments(n), *prev)
    (s, b), e = interpreted[case, "server"]
    assert_equal(b, b_ref)
    assert_equal(s, s_ref)
    assert_equal(e, e_ref)


@pytest.mark.parametrize("case", CASES)
def test_decompress(interpreted, case):
    x, blocks, _ = ti.cases()[case]
    n = x.numel()
    scales, bits, _ = ti.server_inputs(n, blocks, 30)
    assert_equal(interpreted[case, "decompress"], ref.blocksign_decompress(scales[0], bits[0], blocks, n))
    assert_equal(interpreted[case, "decompress_mean"], ref.blocksign_decompress_mean(scales, bits, blocks, n))


@pytest.mark.parametrize("update", sorted(ti.UPDATES))
def test_momentum_and_update(interpreted, update):
    lr, mu, wd, nesterov = ti.UPDATES[update]
    params, delta, w, grad, momentum = ti.update_inputs()
    ref.descend_(params, delta, w if wd else None, Descent(lr, mu, wd, nesterov))
    d, momentum_out = torch.empty_like(grad), torch.empty_like(momentum)
    assert ref.gather_momentum(Grads([grad], [grad.numel()]), d, Momentum(momentum, momentum_out, [mu], [nesterov]))
    got_params, got_w, got_d, got_momentum, got_finite = interpreted[update, "update"]
    for p, q in zip(got_params, params):
        assert_equal(p, q)
    assert_equal(got_w, w)
    assert_equal(got_d, d)
    assert_equal(got_momentum, momentum_out)
    assert got_finite


def test_nonfinite_block_is_named(interpreted):
    assert interpreted["nonfinite"] == ("blocksign: non-finite values (inf or NaN) in block 1; check the gradients")
