"""Compressor properties (SPEC §2) on random and edge inputs, single process."""
import math

import pytest
import torch

import hvd_distef
from hvd_distef import Compression, Payload
from hvd_distef._kernels import pack_signs, unpack_signs
from hvd_distef.compressors import REGISTRY, get_compressor
from hvd_distef.payload import layout_nbytes

ALL = sorted(REGISTRY)


def rand(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def ref_blocksign(x, block_sizes):
    """Independent blockwise scaled sign, one block at a time."""
    out = []
    for b in x.split(list(block_sizes)):
        out.append(b.abs().sum() / b.numel() * torch.where(b >= 0, 1.0, -1.0))
    return torch.cat(out)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_wire_round_trip(name, n):
    """to_bytes/from_bytes keeps what decompress returns; nbytes matches the layout."""
    c = get_compressor(name)
    x = rand(n, n)
    blocks = c.blocks([n])
    p = c.compress(x, blocks)
    assert p.layout == c.layout(n, blocks)
    assert p.nbytes == layout_nbytes(p.layout) == p.to_bytes().numel()
    q = Payload.from_bytes(p.to_bytes(), c.layout(n, blocks), n, blocks)
    assert torch.equal(c.decompress(p), c.decompress(q))


@pytest.mark.parametrize("n,blocks", [(1, [1]), (9, [9]), (10, [3, 7]), (1001, [500, 1, 500]), (64, [1] * 64)])
def test_blocksign_matches_reference_and_exact_error(n, blocks):
    x = rand(n, n)
    c = Compression.blocksign()
    y = c.decompress(c.compress(x, blocks))
    torch.testing.assert_close(y, ref_blocksign(x, blocks), rtol=1e-6, atol=0)
    for xb, yb in zip(x.double().split(blocks), y.double().split(blocks)):
        exact = xb.pow(2).sum() - xb.abs().sum() ** 2 / xb.numel()
        assert math.isclose((xb - yb).pow(2).sum().item(), exact.item(), rel_tol=1e-5, abs_tol=1e-9)


def test_blocksign_payload_size_formula():
    for n, blocks in [(9, [9]), (1001, [500, 1, 500]), (16, [8, 8])]:
        p = Compression.blocksign().compress(rand(n), blocks)
        assert p.nbytes == math.ceil(n / 8) + 4 * len(blocks)


def test_blocks_of_one_element_are_exact():
    x = rand(33)
    c = Compression.blocksign(block_size=1)
    assert c.blocks([33]) == [1] * 33
    assert torch.equal(c.decompress(c.compress(x, c.blocks([33]))), x)


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0])
    assert unpack_signs(pack_signs(x), 5).tolist() == [1.0, 1.0, 1.0, -1.0, 1.0]
    y = Compression.sign().decompress(Compression.sign().compress(x))
    torch.testing.assert_close(y, torch.tensor([0.4, 0.4, 0.4, -0.4, 0.4]))  # ||x||_1/d = 2/5


def test_bit_order_is_little_endian_per_byte():
    x = -torch.ones(11)
    x[0] = x[3] = x[9] = 1.0
    assert pack_signs(x).tolist() == [0b00001001, 0b00000010]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
def test_pack_round_trip(n):
    x = rand(n, n)
    bits = pack_signs(x)
    assert bits.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_signs(bits, n), torch.where(x >= 0, 1.0, -1.0))


def test_empty_vector():
    c = Compression.blocksign()
    p = c.compress(torch.zeros(0))
    assert p.nbytes == 0 and c.decompress(p).numel() == 0


@pytest.mark.parametrize("name,delta", [("sign", None), ("blocksign", None), ("topk", 0.01), ("none", 1.0)])
def test_delta_approximate(name, delta):
    """||C(x) − x||² ≤ (1 − δ)·||x||², with δ from SPEC §2's formulas."""
    for seed in range(5):
        x = rand(1000, seed) * torch.linspace(0.01, 3, 1000)
        c = get_compressor(name)
        blocks = [100] * 10
        err = (c.decompress(c.compress(x, blocks)) - x).double().pow(2).sum().item()
        if delta is None:
            xs = x.double().split(blocks if c.uses_blocks else [1000])
            delta_ = min((b.abs().sum() ** 2 / (b.numel() * b.pow(2).sum())).item() for b in xs)
        else:
            delta_ = delta
        assert err <= (1 - delta_) * x.double().pow(2).sum().item() * (1 + 1e-6)


@pytest.mark.parametrize("name", ["randomk", "qsgd"])
def test_delta_approximate_in_expectation(name):
    """Random compressors: the mean squared error over many draws stays below (1 − δ)·||x||²."""
    x = rand(400, 1)
    c = Compression.randomk(ratio=0.1) if name == "randomk" else Compression.qsgd(levels=7)
    errs = [(c.decompress(c.compress(x)) - x).double().pow(2).sum().item() for _ in range(300)]
    mean, norm2 = sum(errs) / len(errs), x.double().pow(2).sum().item()
    if name == "randomk":
        assert mean == pytest.approx(0.9 * norm2, rel=0.05)
    else:
        assert mean <= (1 - c.scale(400)) * norm2


def test_topk_keeps_largest():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3])
    y = Compression.topk(k=2).decompress(Compression.topk(k=2).compress(x))
    assert y.tolist() == [0.0, -5.0, 0.0, 3.0, 0.0]


def test_randomk_same_indices_across_instances_and_seed_on_wire():
    a, b = Compression.randomk(k=5), Compression.randomk(k=5)
    x = rand(50)
    pa, pb = a.compress(x), b.compress(x * 2)
    assert torch.equal(pa["seed"], pb["seed"])
    assert torch.equal(a.decompress(pa) != 0, b.decompress(pb) != 0)
    assert pa.nbytes == 8 + 4 * 5
    assert not torch.equal(a.compress(x)["seed"], pa["seed"])  # advances every call


def test_qsgd_is_unbiased_without_scaling():
    x = rand(50, 3)
    c = Compression.qsgd(levels=3, scaled=False)
    mean = torch.stack([c.decompress(c.compress(x)) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, x, atol=0.1 * x.norm().item() / 3, rtol=0)


def test_compress_with_feedback_keeps_the_residual():
    c = Compression.topk(k=3)
    d, e = rand(20, 1), rand(20, 2)
    e0 = e.clone()
    p = d + 0.5 * e0
    payload = c.compress_with_feedback(d, e, [20], [(0, 20, 0.5)])
    torch.testing.assert_close(c.decompress(payload) + e, p)


def test_blocksign_defers_the_residual_until_settled():
    c = Compression.blocksign()
    d, e = rand(20, 1), rand(20, 2)
    p = d + 0.5 * e
    payload = c.compress_with_feedback(d, e, [8, 12], [(0, 20, 0.5)])
    torch.testing.assert_close(e, p)  # p kept; e <- p − C(p) deferred
    c.settle(e, payload)
    torch.testing.assert_close(c.decompress(payload) + e, p)


def test_error_memory_shows_the_settled_error():
    from hvd_distef.error_feedback import ErrorMemory, Shard
    c = Compression.blocksign()
    d, d2 = rand(20, 1), rand(20, 3)
    # an empty shard shares its start with the next one (sharded topologies make them)
    shards = [Shard(0, 0, ()), Shard(0, 8, (8,)), Shard(8, 20, (12,))]
    sent = lambda payloads: torch.cat([c.decompress(p) for p in payloads])  # noqa: E731

    memory = ErrorMemory(20)
    first = sent(memory.step(c, d, [(0, 20, 1.0)], shards))
    torch.testing.assert_close(memory.error, d - first)
    torch.testing.assert_close(memory.state_dict(), d - first)

    unread = ErrorMemory(20)  # two steps with no read between: the second settles the first in its pass
    first = sent(unread.step(c, d, [(0, 20, 1.0)], shards))
    second = sent(unread.step(c, d2, [(0, 20, 1.0)], shards))
    torch.testing.assert_close(unread.error, d2 + (d - first) - second)


def test_block_options():
    assert Compression.blocksign(block_size=4).blocks([10, 3]) == [4, 4, 2, 3]
    assert Compression.blocksign(bucket_mb=16 / 2**20).blocks([2, 2, 3, 1, 5]) == [4, 4, 5]
    assert Compression.blocksign().blocks([10, 0, 3]) == [10, 3]
    assert Compression.sign().blocks([10, 3]) == [13]


@pytest.mark.parametrize("make,option", [
    (lambda: Compression.blocksign(block_size=0), "block_size"),
    (lambda: Compression.topk(k=0), "k"),
    (lambda: Compression.qsgd(levels=500), "levels"),
    (lambda: Compression.topk(k=100).layout(10, [10]), "k=100"),
    (lambda: get_compressor("nope"), "unknown compression"),
])
def test_bad_options_name_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_users_can_register_their_own():
    class Half(hvd_distef.Compressor):
        name = "test_halve"

        def layout(self, numel, block_sizes):
            return (("values", torch.float32, numel),)

        def compress(self, x, block_sizes=None):
            return Payload(x.numel(), [x.numel()], {"values": x / 2})

        def decompress(self, payload):
            return payload["values"]

    try:
        c = get_compressor("test_halve")
        assert isinstance(c, Half)
        e = torch.zeros(4)
        c.compress_with_feedback(torch.ones(4), e, [4], [(0, 4, 0.0)])
        assert e.tolist() == [0.5] * 4
    finally:
        REGISTRY.pop("test_halve")


EXTREME = {
    "near_float32_max": torch.tensor([3e38, -3e38, 3.4e38, -3.4e38, 1.0, -2.0, 3.3e38, 0.0] * 4),
    "denormals": torch.tensor([1e-45, -1e-45, 3e-42, -2e-40, 0.0, -0.0, 1e-44, 5e-39] * 4),
    "mixed": torch.tensor([3.4e38, 1e-45, -3.4e38, -1e-45, 65504.0, 1e5, -1e5, 0.0] * 4),
}


@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("case", sorted(EXTREME))
@pytest.mark.parametrize("name", ALL)
def test_every_compressor_stays_finite_on_finite_input(name, case, path, monkeypatch):
    """Issue 11: finite in, finite out — the payload, its decompression, and the error e = p − C(p)
    of an error-feedback step, on both kernel paths."""
    if path == "torch":
        monkeypatch.setattr(hvd_distef._kernels, "compiled", None)
    elif hvd_distef._kernels.compiled is None:
        pytest.skip("cpp_ops is not built")
    x = EXTREME[case].clone()
    c = get_compressor(name).for_stream(0)
    blocks = c.blocks([16, 16])
    out = c.decompress(c.compress(x, blocks))
    assert bool(torch.isfinite(out).all()), out
    error = torch.zeros_like(x)
    payload = c.compress_with_feedback(x, error, blocks, [(0, 32, 1.0)])
    if c.defers_settle:
        c.settle(error, payload)
    assert bool(torch.isfinite(c.decompress(payload)).all())
    assert bool(torch.isfinite(error).all()), error


def test_fp16_saturates_and_keeps_the_excess_as_error():
    c = get_compressor("fp16")
    x = torch.tensor([1e5, -1e5, 40000.0, 1.0])
    error = torch.zeros(4)
    payload = c.compress_with_feedback(x, error, [4], [(0, 4, 1.0)])
    assert torch.equal(c.decompress(payload), torch.tensor([65504.0, -65504.0, 40000.0, 1.0]))
    assert torch.equal(error, torch.tensor([1e5 - 65504.0, 65504.0 - 1e5, 0.0, 0.0]))


@pytest.mark.parametrize("blocks", [[1] * 1000, [1], [1, 1, 2], [2] * 5, [3, 1, 1, 1], [64, 1, 1]])
def test_blocksign_never_costs_more_than_raw(blocks):
    """Issue 12: with one block per tensor, 1000 scalars would cost ceil(1000/8) + 4·1000 = 4125 B;
    a payload whose sign form is not smaller than the raw float32 vector goes raw: exact, error 0."""
    c = get_compressor("blocksign")
    n = sum(blocks)
    x = rand(n, 3)
    payload = c.compress(x, blocks)
    assert payload.nbytes <= 4 * n
    raw = math.ceil(n / 8) + 4 * len(blocks) >= 4 * n
    assert ("values" in payload.tensors) == raw
    if raw:
        assert torch.equal(c.decompress(payload), x)
        error = rand(n, 4)
        fed = c.compress_with_feedback(x, error, blocks, [(0, n, 0.5)])
        c.settle(error, fed)
        assert torch.equal(error, torch.zeros(n)) and fed.nbytes == 4 * n
    else:
        assert torch.equal(c.decompress(payload), ref_blocksign(x, blocks))
    off = Compression.blocksign(raw_if_smaller=False).compress(x, blocks)
    assert off.nbytes == math.ceil(n / 8) + 4 * len(blocks)
