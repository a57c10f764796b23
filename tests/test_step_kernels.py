"""The compiled kernels added for the step's paths (issue 21, item 9) against the torch path and against
the formulas they replace, bit for bit: the compensation p = d + r·e written into a given buffer, fp16's
fused error step (a worker's d, or the server's mean of float16 payloads), signum's worker step."""
import pytest
import torch

from hvd_distef import _kernels
from hvd_distef import _torch_kernels as ref

cpp = _kernels.compiled
pytestmark = pytest.mark.skipif(cpp is None, reason="no compiled kernels to test (tests/test_build.py says why)")

SEGMENTS = {"one": lambda n: [(0, n, 1.0)], "groups": lambda n: [(0, n // 3, 0.5), (n // 3, 2 * n // 3, 0.0),
                                                                  (2 * n // 3, n, 1.7)],
            "uncovered_tail": lambda n: [(0, n // 2, 2.0)]}


def bits(t):
    return t.view(torch.int16) if t.dtype == torch.float16 else t.view(torch.int32)


def data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, generator=gen) * torch.logspace(-8, 6, n)[torch.randperm(n, generator=gen)]
    edge = torch.tensor([3e38, -3e38, 65504.0, 65519.9, 65520.0, -65520.0, 1e5, -1e5, 0.0, -0.0, 1e-45, -6e-8])
    d[: min(n, len(edge))] = edge[: min(n, len(edge))]
    return d, torch.randn(n, generator=gen) * 100


def written_out(x, error, segments):
    """p = x + r·e with the product rounded first (r = 0 where no segment covers)."""
    p = x.clone()
    for a, b, r in segments:
        if r:
            p[a:b] = p[a:b] + error[a:b] * r
    return p


@pytest.mark.parametrize("n", [1, 7, 9, 100_003])
@pytest.mark.parametrize("segments", sorted(SEGMENTS))
def test_compensate_into_a_buffer_or_in_place(n, segments):
    d, e = data(n)
    segs = SEGMENTS[segments](n)
    expected = written_out(d, e, segs)
    for path in (cpp, ref):
        assert torch.equal(bits(path.compensate(d, e, segs, None)), bits(expected))
        out = torch.full((n,), 7.0)
        assert path.compensate(d, e, segs, out).data_ptr() == out.data_ptr() and torch.equal(bits(out), bits(expected))
        inplace = d.clone()
        path.compensate(inplace, e, segs, inplace)
        assert torch.equal(bits(inplace), bits(expected))


@pytest.mark.parametrize("n", [1, 7, 9, 100_003])
@pytest.mark.parametrize("segments", sorted(SEGMENTS))
@pytest.mark.parametrize("sources", ["d", "one_payload", "three_payloads"])
def test_half_feedback_is_fp16s_error_step(n, segments, sources):
    d, e = data(n)
    segs = SEGMENTS[segments](n)
    halves = [(d * k).clamp(-65504, 65504).half() for k in (1.0, -0.25, 3.0)]
    given = {"d": [d], "one_payload": halves[:1], "three_payloads": halves}[sources]
    x = d if sources == "d" else given[0].float()
    for h in given[1:]:
        x = x + h.float()
    if len(given) > 1:
        x = x / len(given)
    p = written_out(x, e, segs)
    h_expected = p.clamp(-65504.0, 65504.0).to(torch.float16)
    e_expected = p - h_expected.float()
    for path in (cpp, ref):
        error = e.clone()
        h = path.half_feedback(given, error, segs, 65504.0)
        assert torch.equal(bits(h), bits(h_expected)), path.__name__
        assert torch.equal(bits(error), bits(e_expected)), path.__name__
        error, out = e.clone(), torch.full((n,), 7.0, dtype=torch.float16)  # into a kept buffer
        assert path.half_feedback(given, error, segs, 65504.0, out).data_ptr() == out.data_ptr()
        assert torch.equal(bits(out), bits(h_expected)) and torch.equal(bits(error), bits(e_expected)), path.__name__


@pytest.mark.parametrize("n", [1, 7, 8, 13, 100_003])
@pytest.mark.parametrize("mus", [[0.9], [0.0, 0.5], [0.9, None]])
def test_signum_momentum_is_the_momentum_then_the_signs(n, mus):
    g, m = data(n, 1)
    cut = n // len(mus)
    segments = [(i * cut, n if i == len(mus) - 1 else (i + 1) * cut, mu) for i, mu in enumerate(mus) if mu is not None]
    sent, m_expected = g.clone(), m.clone()  # uncovered: as mu = 0 (m kept, g sent)
    for a, b, mu in segments:
        if mu:
            m_expected[a:b] = m[a:b] * mu + g[a:b] * (1 - mu)
            sent[a:b] = m_expected[a:b]
    for path in (cpp, ref):
        m_out = torch.full((n,), 7.0)
        packed = path.signum_momentum(g, m, m_out, segments)
        assert torch.equal(packed, ref.pack_signs(sent)), path.__name__
        assert torch.equal(bits(m_out), bits(m_expected)), path.__name__
