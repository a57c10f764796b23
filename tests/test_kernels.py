"""The compiled cpp_ops kernels against the pure-PyTorch path they stand in for (issue: packed
bytes identical, scales and errors to float tolerance), on random data and edge cases."""
import pytest
import torch

from conftest import mpi_env, run_mpi
from hvd_distef import _kernels
from hvd_distef import _torch_kernels as ref
from hvd_distef.kernel_args import Descent, Feedback, Grads, Momentum, Pieces

cpp = _kernels.compiled
pytestmark = pytest.mark.skipif(cpp is None, reason=f"no compiled kernels to test: "
                                f"{_kernels.import_error or _kernels.FORCE_TORCH_ENV + ' is set'} "
                                f"(tests/test_build.py fails where cpp_ops did not build)")


def rand(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def split(n, pieces, seed=0):
    """``pieces`` positive block sizes summing to n."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: pieces - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


CASES = {
    "one": (rand(1), [1]),
    "seven": (rand(7), [7]),
    "eight": (rand(8), [3, 5]),
    "nine": (rand(9), [9]),
    "zeros": (torch.zeros(100), [50, 50]),
    "negative_zero": (torch.tensor([-0.0, 0.0, -0.0, 1.0, -1.0, -0.0, 0.0, -0.0, -0.0]), [4, 5]),
    "denormals": (torch.tensor([1e-45, -1e-45, 3e-42, -2e-40] * 5), [7, 13]),
    "blocks_of_one": (rand(77, 1), [1] * 77),
    "many_small_blocks": (rand(20_011, 2), split(20_011, 3000, 2)),
    "large_odd_blocks": (rand(300_007, 3), [70_001, 3, 150_000, 80_003]),
    "resnet_like": (rand(1_000_003, 4), split(1_000_003, 60, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compress_and_decompress_match_torch(case):
    x, blocks = CASES[case]
    s_ref, b_ref = ref.blocksign_compress(x, blocks)
    s, b = cpp.blocksign_compress(x, blocks)
    assert torch.equal(b, b_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)  # torch's float sums of big blocks err ~5e-6
    torch.testing.assert_close(cpp.blocksign_decompress(s, b, blocks, x.numel()),
                               ref.blocksign_decompress(s, b, blocks, x.numel()), rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_feedback_matches_torch(case):
    d, blocks = CASES[case]
    n = d.numel()
    segments = [(0, n // 3, 0.5), (n // 3, n, 10.0)]  # two param groups with their own η_{t-1}/η_t
    e_ref = rand(n, 9)
    e = e_ref.clone()
    s_ref, b_ref = ref.blocksign_feedback(d, e_ref, blocks, segments)
    s, b = cpp.blocksign_feedback(d, e, blocks, segments)
    assert torch.equal(b, b_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)  # torch's float sums of big blocks err ~5e-6
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5 * s_ref.max().item())  # e absorbs the scale's rounding


@pytest.mark.parametrize("case", ["nine", "many_small_blocks", "large_odd_blocks"])
def test_server_feedback_and_mean_match_torch(case):
    x, blocks = CASES[case]
    n = x.numel()
    payloads = [ref.blocksign_compress(rand(n, seed), blocks) for seed in range(3)]
    scales, bits = [p[0] for p in payloads], [p[1] for p in payloads]
    assert torch.equal(cpp.blocksign_decompress_mean(scales, bits, blocks, n),
                       ref.blocksign_decompress_mean(scales, bits, blocks, n))
    e_ref = rand(n, 5)
    e = e_ref.clone()
    s_ref, b_ref = ref.blocksign_server_feedback(scales, bits, e_ref, blocks, [(0, n, 2.0)])
    s, b = cpp.blocksign_server_feedback(scales, bits, e, blocks, [(0, n, 2.0)])
    assert torch.equal(b, b_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)  # torch's float sums of big blocks err ~5e-6
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5 * s_ref.max().item())  # e absorbs the scale's rounding


def test_ratio_zero_keeps_d_exactly():
    d, e = rand(1000), rand(1000, 1)
    s, b = cpp.blocksign_feedback(d, e, [1000], [(0, 1000, 0.0)])
    assert torch.equal(e, d)  # p = d, left in e until the next step settles it
    s_ref, b_ref = ref.blocksign_compress(d, [1000])
    assert torch.equal(b, b_ref)


def eager_steps(ds, e, blocks, ratio):
    """Error feedback as SPEC §1 writes it, from torch ops alone: p = d + r·e; C(p); e = p − C(p)."""
    sent = []
    for d in ds:
        p = d + torch.mul(e, ratio)
        scales = torch.stack([part.abs().sum() / part.numel() for part in p.split(blocks)])
        signs = torch.where(p >= 0, 1.0, -1.0)
        e = p - signs * torch.repeat_interleave(scales, torch.tensor(blocks))
        sent.append((scales, ref.pack_bits(p >= 0)))
    return sent, e


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("case", ["nine", "many_small_blocks", "large_odd_blocks"])
def test_deferred_steps_equal_the_eager_ones(path, case):
    """Three worker steps, each settling the last one's Δ in its pass, then a final settle: the same
    bits, scales and error as the eager steps of SPEC §1."""
    x, blocks = CASES[case]
    n = x.numel()
    ds = [rand(n, 20 + t) for t in range(3)]
    kernels = cpp if path == "cpp" else ref
    e = rand(n, 9)
    sent_ref, e_ref = eager_steps(ds, e.clone(), blocks, 0.5)
    prev = (None, None)
    for d, (s_ref, b_ref) in zip(ds, sent_ref):
        prev = kernels.blocksign_feedback(d, e, blocks, [(0, n, 0.5)], *prev)
        assert torch.equal(prev[1], b_ref)
        torch.testing.assert_close(prev[0], s_ref, rtol=1e-5, atol=0)
    e.sub_(ref.blocksign_decompress(*prev, blocks, n))
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5 * float(sent_ref[-1][0].max()))


def test_server_step_settles_its_previous_payload():
    x, blocks = CASES["large_odd_blocks"]
    n = x.numel()
    payloads = [ref.blocksign_compress(rand(n, seed), blocks) for seed in range(3)]
    scales, bits = [p[0] for p in payloads], [p[1] for p in payloads]
    e_ref, e = rand(n, 5), rand(n, 5)
    first_ref = ref.blocksign_server_feedback(scales, bits, e_ref, blocks, [(0, n, 1.0)])
    first = cpp.blocksign_server_feedback(scales, bits, e, blocks, [(0, n, 1.0)])
    second_ref = ref.blocksign_server_feedback(scales, bits, e_ref, blocks, [(0, n, 2.0)], *first_ref)
    second = cpp.blocksign_server_feedback(scales, bits, e, blocks, [(0, n, 2.0)], *first)
    assert torch.equal(second[1], second_ref[1])
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5 * float(second_ref[0].max()))


@pytest.mark.parametrize("ratios", [(0.3, 10 / 3), (0.1 / 0.07, 0.7)])
def test_compensation_rounds_the_product_first_on_both_paths(ratios):
    """p = d + r·e with r·e rounded before the sum (no fused multiply-add) on both paths, bit for bit,
    for ratios that are not powers of two (p is what the deferred step leaves in the error buffer)."""
    n = 100_003
    d, e0 = rand(n, 5), rand(n, 6).mul_(3)
    segments = [(0, n // 2, ratios[0]), (n // 2, n, ratios[1])]
    expect = torch.cat([d[a:b] + torch.mul(e0[a:b], r) for a, b, r in segments])
    for path in (cpp, ref):
        e = e0.clone()
        path.blocksign_feedback(d, e, [n // 2, n - n // 2], segments, None, None)
        assert torch.equal(e, expect), path.__name__


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_non_finite_input_is_rejected(bad, path):
    x = rand(100)
    x[37] = bad
    fn = (cpp if path == "cpp" else ref).blocksign_compress
    with pytest.raises(ValueError, match="non-finite"):
        fn(x, [30, 70])


@pytest.mark.parametrize("call,message", [
    (lambda: cpp.blocksign_compress(torch.zeros(10), [4, 5]), "sum to 9"),
    (lambda: cpp.blocksign_compress(torch.zeros(10, dtype=torch.float64), [10]), "float32"),
    (lambda: cpp.blocksign_decompress(torch.zeros(2), torch.zeros(1, dtype=torch.uint8), [5, 5], 10), "bits"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1_000_003])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_majority_vote_matches_torch_and_the_definition(numel, ranks):
    xs = [rand(numel, seed) for seed in range(ranks)]
    xs[0][: numel // 2] = -0.0  # sign(-0) = +1
    rows = torch.cat([cpp.pack_signs(x) for x in xs])
    assert torch.equal(rows, torch.cat([ref.pack_signs(x) for x in xs]))
    vote = cpp.majority_vote(rows, numel)
    assert torch.equal(vote, ref.majority_vote(rows, numel))
    out = torch.full((numel,), 7.0)
    got = cpp.unpack_vote(vote, numel, out=out)
    assert got.data_ptr() == out.data_ptr()
    expected = torch.sign(torch.stack([torch.where(x >= 0, 1.0, -1.0) for x in xs]).sum(0))  # 0 on ties
    assert torch.equal(got, expected)
    assert torch.equal(ref.unpack_vote(vote, numel), expected)


def test_majority_vote_rejects_bad_rows():
    with pytest.raises(ValueError, match="multiple"):
        cpp.majority_vote(torch.zeros(5, dtype=torch.uint8), 9)


UPDATE_SIZES = {"one": [1], "odd": [7, 0, 9, 1], "resnet_like": split(1_000_003, 60, 5)}


@pytest.mark.parametrize("sizes", sorted(UPDATE_SIZES))
@pytest.mark.parametrize("mu,nesterov,scale", [(0.9, True, None), (0.9, False, None), (0.9, True, 1 / 1024),
                                               (0.0, True, None)])
@pytest.mark.parametrize("in_place", [False, True])
def test_gather_momentum_matches_torch_exactly(sizes, mu, nesterov, scale, in_place):
    """Gradients read where they lie (one missing: zeros), unscaled, momentum into another buffer
    or in place: bit-identical to the torch path, and to the multi-pass arithmetic of SPEC §1."""
    shapes = UPDATE_SIZES[sizes]
    n = sum(shapes)
    grads = [rand(k, 10 + i) for i, k in enumerate(shapes)]
    if len(grads) > 1:
        grads[1] = torch.empty(0)  # no gradient on this rank
    m = rand(n, 2)
    outs = {}
    for name, path in (("ref", ref), ("cpp", cpp)):
        d, m_in = torch.empty(n), m.clone()
        m_out = m_in if in_place else torch.empty(n)
        finite = path.gather_momentum(Grads(grads, shapes, scale), d,
                                      Momentum(m_in, m_out, [mu] * len(shapes), [nesterov] * len(shapes)))
        outs[name] = (d, m_out, m_in, finite)
    (d_ref, m_ref, m_in_ref, ok_ref), (d, m_out, m_in, ok) = outs["ref"], outs["cpp"]
    assert ok and ok_ref and torch.equal(d, d_ref) and torch.equal(m_out, m_ref) and torch.equal(m_in, m_in_ref)
    g = torch.cat([x if x.numel() else torch.zeros(k) for x, k in zip(grads, shapes)])
    g = g * scale if scale is not None else g
    expect_m = m * mu + g if mu else m
    assert torch.equal(m_ref, expect_m)
    assert torch.equal(d_ref, (g + expect_m * mu if nesterov else expect_m) if mu else g)
    if not in_place:
        assert torch.equal(m_in, m)  # the step may not go ahead: the current momentum is untouched


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gather_momentum_reports_nonfinite(bad):
    grads = [rand(100, 1), rand(50_000, 2)]
    grads[1][33_333] = bad
    for path in (ref, cpp):
        n = 50_100
        assert not path.gather_momentum(Grads(grads, [100, 50_000]), torch.empty(n),
                                        Momentum(torch.zeros(n), torch.empty(n), [0.9, 0.9], [True, True]))


@pytest.mark.parametrize("sizes", sorted(UPDATE_SIZES))
@pytest.mark.parametrize("mu,wd,nesterov", [(0.9, 5e-4, True), (0.9, 5e-4, False), (0.9, 0.0, True),
                                             (0.0, 1e-2, False)])
def test_descend_matches_torch_exactly(sizes, mu, wd, nesterov):
    shapes = UPDATE_SIZES[sizes]
    n = sum(shapes)
    x_ref = [t.clone() for t in rand(n, 3).split(shapes)]
    x = [t.clone() for t in x_ref]
    w_ref = rand(n, 4)
    w = w_ref.clone()
    delta = rand(n, 5)
    kept = delta.clone()
    ref.descend_(x_ref, delta, w_ref, Descent(0.1, mu, wd, nesterov))
    cpp.descend_(x, delta, w, Descent(0.1, mu, wd, nesterov))
    assert all(torch.equal(a, b) for a, b in zip(x, x_ref))
    assert torch.equal(w, w_ref)
    assert torch.equal(delta, kept)  # read only
    # independent check of the formula on one element
    i = n // 2
    x0 = rand(n, 3)[i]
    w1 = mu * rand(n, 4)[i] + wd * x0 if wd else None
    u = delta[i] + ((mu * w1 + wd * x0 if nesterov else w1) if wd else 0.0)
    torch.testing.assert_close(torch.cat(x)[i], x0 - 0.1 * u, rtol=1e-6, atol=1e-7)


def test_descend_rejects_bad_arguments():
    with pytest.raises(ValueError, match="elements"):
        cpp.descend_([torch.zeros(3)], torch.zeros(4), None, Descent(0.1, 0.9, 0.0, True))
    with pytest.raises(ValueError, match="contiguous"):
        cpp.descend_([torch.zeros(4, 4).t()], torch.zeros(16), None, Descent(0.1, 0.9, 0.0, True))
    with pytest.raises(ValueError, match="buffer"):
        cpp.descend_([torch.zeros(3)], torch.zeros(3), None, Descent(0.1, 0.9, 1e-4, True))


def pieces_of(delta, cuts, blocks_per_piece, seed=0):
    """Blocksign payloads of ``delta`` cut at ``cuts`` (a piece may begin before 0 or end after the
    group: ``delta`` is padded by 16 random elements on both sides), each in ``blocks_per_piece`` blocks."""
    padded = torch.cat([rand(16, seed + 1), delta, rand(16, seed + 2)])
    starts, scales, bits, sizes = [], [], [], []
    for a, b in zip(cuts, cuts[1:]):
        blocks = split(b - a, min(blocks_per_piece, b - a), seed)
        s, bt = ref.blocksign_compress(padded[a + 16:b + 16], blocks)
        starts.append(a), scales.append(s), bits.append(bt), sizes.append(blocks)
    return starts, scales, bits, sizes


@pytest.mark.parametrize("sizes", sorted(UPDATE_SIZES))
@pytest.mark.parametrize("mu,wd,nesterov", [(0.9, 5e-4, True), (0.9, 5e-4, False), (0.9, 0.0, True)])
def test_descend_blocksign_is_descend_of_the_decompressed_update(sizes, mu, wd, nesterov):
    """Δ̃ decompressed slice by slice inside the update (pieces cut across parameters, beginning
    before the group and ending after it) gives exactly descend_ of the decompressed Δ̃."""
    shapes = UPDATE_SIZES[sizes]
    n = sum(shapes)
    cuts = sorted({-5, n // 3 + 1, n // 2, n + 7} | {max(1, n // 7)})
    starts, scales, bits, blocks = pieces_of(rand(n, 6), cuts, 5)
    delta = torch.cat([ref.blocksign_decompress(s, b, bl, sum(bl)) for s, b, bl in zip(scales, bits, blocks)])
    delta = delta[5:5 + n]
    x_ref = [t.clone() for t in rand(n, 3).split(shapes)]
    x, x_torch = [t.clone() for t in x_ref], [t.clone() for t in x_ref]
    w_ref = rand(n, 4)
    w, w_torch = w_ref.clone(), w_ref.clone()
    descent = Descent(0.1, mu, wd, nesterov)
    ref.descend_(x_ref, delta, w_ref, descent)
    cpp.descend_blocksign_(x, Pieces(starts, scales, bits, blocks), w, descent)
    ref.descend_blocksign_(x_torch, Pieces(starts, scales, bits, blocks), w_torch, descent)
    for got, w_got in ((x, w), (x_torch, w_torch)):
        assert all(torch.equal(a, b) for a, b in zip(got, x_ref))
        assert torch.equal(w_got, w_ref)


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("starts,message", [([3, 40], "piece 0 starts at 3|starts at 3"),
                                            ([0, 60], "starts at 60"), ([0, 40], "cover")])
def test_descend_blocksign_refuses_pieces_that_leave_a_gap(path, starts, message):
    kernels = cpp if path == "cpp" else ref
    _, scales, bits, blocks = pieces_of(rand(100), [0, 50, 90], 3)
    with pytest.raises(ValueError, match=message):
        kernels.descend_blocksign_([torch.zeros(100)], Pieces(starts, scales, bits, blocks), None,
                                   Descent(0.1, 0.9, 0.0, True))


def test_multi_rank_run_agrees_with_torch_path(tmp_path):
    """Two ranks, `ps` + blocksign: ranks identical within each path, the paths agree to float rounding."""
    finals = {}
    for force in ("0", "1"):
        out = tmp_path / f"force{force}.pt"
        env = dict(mpi_env(), HVD_DISTEF_FORCE_TORCH=force)
        run_mpi(2, ["tests/mpi/train_and_dump.py", out], env=env)
        finals[force] = torch.load(out)
    assert finals["0"]["compiled"] and not finals["1"]["compiled"]
    torch.testing.assert_close(finals["0"]["params"], finals["1"]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", sorted(UPDATE_SIZES))
@pytest.mark.parametrize("scale,settle", [(None, True), (1 / 1024, False), (None, False)])
def test_worker_step_in_one_pass_is_momentum_then_feedback(sizes, scale, settle):
    """The worker's momentum and error step in one pass, on a shard cut inside parameters (blocks
    across them, two param groups, a missing gradient, a segment at ratio 0, the previous payload
    settled): exactly gather_momentum then blocksign_feedback of the same path, written to the out
    buffers only."""
    shapes = UPDATE_SIZES[sizes]
    total = sum(shapes)
    grads = [rand(k, 20 + i) for i, k in enumerate(shapes)]
    if len(grads) > 1:
        grads[1] = torch.empty(0)
    half = len(shapes) // 2
    mus = [0.9] * half + [0.5 if len(shapes) > 2 else 0.0] * (len(shapes) - half)
    nesterovs = [True] * half + [False] * (len(shapes) - half)
    offset = min(3, total - 1)
    n = total - offset - (2 if total > 8 else 0)
    blocks = split(n, min(n, 7), 8)
    segments = [(0, n // 2, 0.7), (n // 2, n - n // 3, 0.0), (n - n // 3, n, 1.25)]
    m, e = rand(n, 30), rand(n, 31)
    prev = ref.blocksign_compress(rand(n, 32), blocks) if settle else (None, None)
    for path in (cpp, ref):
        d, m_step, e_step = torch.empty(total), torch.empty(total), torch.zeros(total)
        start = 0
        for k, size in enumerate(shapes):  # the two steps apart, parameter by parameter
            current = torch.cat([torch.zeros(offset), m, torch.zeros(total - offset - n)])[start:start + size]
            path.gather_momentum(Grads([grads[k]], [size], scale), d[start:start + size],
                                 Momentum(current, m_step[start:start + size], [mus[k]], [nesterovs[k]]))
            start += size
        e_step = e.clone()
        want = path.blocksign_feedback(d[offset:offset + n].clone(), e_step, blocks, segments, *prev)
        m_in, e_in = m.clone(), e.clone()
        m_out, e_out = torch.full((n,), 7.0), torch.full((n,), 7.0)
        scales, bits, usable = path.worker_blocksign_feedback(
            Grads(grads, shapes, scale), Momentum(m_in, m_out, mus, nesterovs),
            Feedback(e_in, e_out, offset, blocks, segments, *prev))
        assert usable
        assert torch.equal(scales, want[0]) and torch.equal(bits, want[1])
        assert torch.equal(m_out, m_step[offset:offset + n]) and torch.equal(e_out, e_step)
        assert torch.equal(m_in, m) and torch.equal(e_in, e)  # the step can still be dropped


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_worker_step_in_one_pass_reports_what_is_not_finite(path, bad):
    """A non-finite gradient, or finite ones whose p overflows a block scale: not usable, nothing raised."""
    kernels = cpp if path == "cpp" else ref
    grads = [rand(100, 1), rand(50_000, 2)]
    grads[1][33_333] = bad
    args = (Momentum(torch.zeros(50_100), torch.empty(50_100), [0.9, 0.9], [True, True]),
            Feedback(torch.zeros(50_100), torch.empty(50_100), 0, [100, 50_000], [(0, 50_100, 1.0)]))

    def grads_of(tensors):
        return Grads(tensors, [100, 50_000])
    assert not kernels.worker_blocksign_feedback(grads_of(grads), *args)[2]
    huge = [torch.full((100,), 3e38), torch.full((50_000,), 3e38)]
    assert not kernels.worker_blocksign_feedback(grads_of(huge), *args)[2]  # d = g + μ·m' overflows to inf
    assert kernels.worker_blocksign_feedback(grads_of([rand(100, 1), rand(50_000, 2)]), *args)[2]


def test_kernels_release_the_gil():
    """A kernel running on one thread (the bucket pipeline's, say) lets Python run on another (backward's
    hooks): the main thread wakes from a short sleep and runs while one long kernel call is still on."""
    import threading
    import time

    m, numel = 64, 8_000_000
    scales = [torch.rand(1) for _ in range(m)]
    bits = [torch.randint(0, 256, ((numel + 7) // 8,), dtype=torch.uint8) for _ in range(m)]
    started = threading.Event()

    def kernel():
        started.set()
        cpp.blocksign_decompress_mean(scales, bits, [numel], numel)

    thread = threading.Thread(target=kernel)
    thread.start()
    started.wait()
    time.sleep(0.02)  # the kernel is on by now; the call lasts far longer (64 payloads of 8M elements)
    ran_meanwhile = sum(range(1000)) == 499500 and thread.is_alive()
    thread.join()
    assert ran_meanwhile, "the main thread could not run while the kernel did: the kernel holds the GIL"
