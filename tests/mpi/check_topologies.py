"""Multi-rank checks of the topologies of SPEC §3 (run under mpirun with 2, 3 and 4 ranks)."""
import math

import torch

import reference
from common import (COMM, assert_identical_across_ranks, flat, grads_at, hypers_of, make_model, sgd_two_groups,
                    train_step, wrap)
from harness import run

import hvd_distef

RANK, M = COMM.rank, COMM.size
MILESTONES = [5, 10]


def _train(topology, compression="blocksign", steps=15, **sgd):
    model = make_model()
    opt = wrap(model, sgd_two_groups(model, **sgd), compression=compression, topology=topology)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, gamma=0.1)
    for t in range(steps):
        train_step(model, opt, RANK, t)
        sched.step()
        assert_identical_across_ranks(model.parameters(), f"{topology} step {t}")
    return model, opt


def sharded_equals_ps():
    """Whole blocks within shards: `sharded` computes exactly what `ps` does, LR drops included."""
    a, _ = _train("ps")
    b, opt = _train("sharded")
    diff = (flat(a.parameters()) - flat(b.parameters())).abs().max().item()
    assert diff == 0.0, f"sharded differs from ps by {diff:.3g}"
    return f"bitwise equal; shard sizes {[s.numel for s in opt.buckets[0].topology.shards]}"


def _against(ref, topology, compression, steps=15, tol=2e-6, **sgd):
    model = make_model()
    opt = wrap(model, sgd_two_groups(model, **sgd), compression=compression, topology=topology)
    ref = ref(list(model.parameters()), hypers_of(opt))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, gamma=0.1)
    worst = 0.0
    for t in range(steps):
        ref.step([grads_at(ref.x, i, t) for i in range(M)], {gi: g["lr"] for gi, g in enumerate(opt.param_groups)})
        train_step(model, opt, RANK, t)
        sched.step()
        assert_identical_across_ranks(model.parameters())
        worst = max(worst, (flat(model.parameters()) - flat(ref.x)).abs().max().item())
        assert worst <= tol, f"step {t}: off by {worst:.3g}"
    return f"max |x - x_ref| = {worst:.3g}"


#: a few float32 roundings of parameters below 1 in magnitude (sums taken in another order: seen 3e-8)
ROUNDING = 2e-7


def _lockstep(make_opts, steps=15, tol=ROUNDING):
    """Models trained side by side on the same batches, each by its own optimizer from ``make_opts``
    (name -> (model, SGD) -> optimizer; the SGD itself is fed the mean of the ranks' gradients), the
    first one the reference; after every step each is within ``tol`` of it."""
    models = {name: make_model() for name in make_opts}
    opts = {name: make(models[name], sgd_two_groups(models[name])) for name, make in make_opts.items()}
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, MILESTONES, gamma=0.1) for o in opts.values()]
    first = next(iter(make_opts))
    worst = dict.fromkeys(list(make_opts)[1:], 0.0)
    for t in range(steps):
        for name, opt in opts.items():
            if isinstance(opt, hvd_distef.DistributedOptimizer):
                train_step(models[name], opt, RANK, t)
                assert_identical_across_ranks(models[name].parameters(), f"{name} step {t}")
            else:  # torch's SGD on the mean of the ranks' gradients, computed here from their batches
                grads = [grads_at(list(models[name].parameters()), i, t) for i in range(M)]
                for j, p in enumerate(models[name].parameters()):
                    p.grad = sum(g[j] for g in grads) / M
                opt.step()
        for sched in scheds:
            sched.step()
        for name in worst:
            diff = (flat(models[name].parameters()) - flat(models[first].parameters())).abs().max().item()
            worst[name] = max(worst[name], diff)
            assert diff <= tol, f"step {t}: {name} is {diff:.3g} from {first}"
    return "; ".join(f"max |x_{name} - x_{first}| = {w:.3g}" for name, w in worst.items())


def _uncompressed(topology):
    return lambda model, sgd: wrap(model, sgd, compression="none", topology=topology)


def ps_none_equals_torch_sgd():
    """With Compression.none, C(p) = p: no error is left (e = p − p = 0), Δ̃ = (1/M)Σ_i d_i = μ·m̄ + ḡ
    with m̄ the momentum of the mean gradient, and w's momentum adds to m̄ into torch's one buffer:
    `ps` is torch's SGD (Nesterov, weight decay, two groups, LR drops) on the mean gradient, to
    float rounding (SPEC §1)."""
    return _lockstep({"torch_sgd": lambda model, sgd: sgd, "ps": _uncompressed("ps")})


def tree_none_equals_ps():
    """`tree` with Compression.none recompresses nothing away: its partial sums are exact, so it is
    `ps`'s arithmetic, summed in another order (to float rounding)."""
    return _lockstep({"ps": _uncompressed("ps"), "tree": _uncompressed("tree")})


def ring_none_equals_ps():
    """`ring` with Compression.none: exact partial sums at every hop, `ps`'s arithmetic (to float rounding)."""
    return _lockstep({"ps": _uncompressed("ps"), "ring": _uncompressed("ring")})


NODE_PATHS = ("slices", "leaders")


def hierarchical_none_equals_ps():
    """`hierarchical` with Compression.none, nodes of 2 ranks where they divide M (else one rank a node):
    the mean of the nodes' means is ps's mean, to float rounding."""
    local = 2 if M % 2 == 0 else 1
    return _lockstep({"ps": _uncompressed("ps"), "hierarchical": lambda model, sgd: wrap(
        model, sgd, compression="none", topology="hierarchical", local_size=local)})


def hierarchical_every_compressor():
    """Every compressor under `hierarchical` (nodes of 2 ranks where they divide M), both data paths inside a
    node: three steps, the ranks bit-identical, the parameters finite and moved."""
    from hvd_distef.compressors import REGISTRY as COMPRESSORS
    local = 2 if M % 2 == 0 else 1
    for name in sorted(COMPRESSORS):
        for path in NODE_PATHS:
            model = make_model()
            before = flat(model.parameters()).clone()
            opt = wrap(model, sgd_two_groups(model, lr=0.01), compression=name, topology="hierarchical",
                       local_size=local, node_path=path)
            for t in range(3):
                train_step(model, opt, RANK, t)
            after = flat(model.parameters())
            assert_identical_across_ranks(model.parameters(), f"{name} {path}")
            assert torch.isfinite(after).all() and not torch.equal(before, after), f"{name} {path}"
    return ", ".join(sorted(COMPRESSORS))


def majority_vote_matches_signum_simulation():
    return _against(lambda x, h: reference.ReferenceSignum(x, h, M), "majority_vote", "sign", lr=0.01)


def allgather_matches_one_way_error_feedback():
    return _against(lambda x, h: reference.ReferenceDistEF(x, h, M, reference.blocksign_per_tensor, two_way=False),
                    "allgather", "blocksign")


def _quadratic_descent(topology):
    """f(x) = (1/M)Σ_i ½||A_i x − b_i||², full-batch gradients: EF must still drive it down."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(8, 6), (6,), (12,), (4, 5)]
    x = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    d = sum(p.numel() for p in x)
    A = [torch.randn(80, d, generator=gen) / math.sqrt(80) for _ in range(M)]
    target = torch.randn(d, generator=gen)
    b = [a @ target for a in A]

    def loss(i):
        return 0.5 * (A[i] @ torch.cat([p.reshape(-1) for p in x]) - b[i]).pow(2).sum()

    # μ = 0 (dist-EF-SGD): with heterogeneous workers and full-batch gradients, μ = 0.9 needs a far
    # smaller lr to stay stable under two-way sign compression (seen for `ps` too).
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(x, lr=0.1), compression="blocksign", topology=topology)
    with torch.no_grad():
        first = sum(loss(i).item() for i in range(M)) / M
    for _ in range(600):
        opt.zero_grad()
        loss(RANK).backward()
        opt.step()
    assert_identical_across_ranks(x)
    with torch.no_grad():
        last = sum(loss(i).item() for i in range(M)) / M
    assert last < 1e-5 * first, f"{topology}: loss {first:.3g} -> {last:.3g}"
    return f"loss {first:.3g} -> {last:.3g}"


def tree_descends_quadratic():
    return _quadratic_descent("tree")


def ring_descends_quadratic():
    return _quadratic_descent("ring")


def _stats_after(topology, compression, steps=3, **options):
    model = make_model()
    opt = wrap(model, sgd_two_groups(model, lr=0.01), compression=compression, topology=topology, **options)
    for t in range(steps):
        train_step(model, opt, RANK, t)
    return opt, opt.comm_stats(), steps


def _check(stats, steps, sent, received):
    got = (stats["bytes_sent"], stats["bytes_received"])
    want = (sent * steps, received * steps)
    assert all(math.isclose(g, w, rel_tol=1e-12) for g, w in zip(got, want)), f"counted {got}, formula {want}"
    return f"{got[0] / steps:g}/{got[1] / steps:g} per step"


def comm_stats_ps():
    """One payload per step; with overlap one per bucket, each broadcast left on the wire while the
    next bucket is gathered (MPI_Ibcast), counted alike."""
    out = []
    for options in ({}, {"overlap": True, "bucket_cap_mb": 1e-4}):
        opt, stats, T = _stats_after("ps", "blocksign", **options)
        s = sum(math.ceil(b.topology.numel / 8) + 4 * len(b.topology.block_sizes) for b in opt.buckets)
        assert len(opt.buckets) == (1 if not options else len(opt._layout.params)), len(opt.buckets)
        out.append(_check(stats, T, *(((M - 1) * s,) * 2 if RANK == 0 else (s, s))))
    return "; ".join(out)


def _shard_bytes(opt):
    return [math.ceil(sh.numel / 8) + 4 * len(sh.block_sizes) for sh in opt.buckets[0].topology.shards]


def comm_stats_sharded():
    opt, stats, T = _stats_after("sharded", "blocksign")
    s = _shard_bytes(opt)
    others = sum(s) - s[RANK]
    return _check(stats, T, others + (M - 1) * s[RANK], (M - 1) * s[RANK] + others)


def comm_stats_ring():
    opt, stats, T = _stats_after("ring", "blocksign")
    s = _shard_bytes(opt)
    # reduce-scatter sends chunks me-1, ..., me-M+1 and receives me-2, ..., me-M; allgather sends
    # me, ..., me-M+2 and receives me-1, ..., me-M+1: every chunk but one, each phase, each way.
    sent = sum(s) - s[RANK] + sum(s) - s[(RANK + 1) % M]
    received = sum(s) - s[(RANK - 1) % M] + sum(s) - s[RANK]
    return _check(stats, T, sent, received)


def comm_stats_tree():
    from hvd_distef.topologies.tree import binomial_tree
    opt, stats, T = _stats_after("tree", "blocksign")
    s = math.ceil(opt.numel / 8) + 4 * len(opt.block_sizes)
    parent, children = binomial_tree(RANK, M)
    up = 0 if parent is None else s
    return _check(stats, T, up + len(children) * s, len(children) * s + up)


def comm_stats_allgather():
    opt, stats, T = _stats_after("allgather", "blocksign")
    s = math.ceil(opt.numel / 8) + 4 * len(opt.block_sizes)
    return _check(stats, T, (M - 1) * s, (M - 1) * s)


def comm_stats_majority_vote():
    opt, stats, T = _stats_after("majority_vote", "sign")
    b = math.ceil(opt.numel / 8)
    return _check(stats, T, *((2 * (M - 1) * b, (M - 1) * b) if RANK == 0 else (b, 2 * b)))


def sharded_bytes_near_spec_formula():
    """With evenly divisible tensors, sharded's bytes are SPEC §3's 2·(M−1)/M·s within rounding."""
    x = [torch.nn.Parameter(torch.zeros(96)) for _ in range(12)]
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(x, lr=0.1), compression="blocksign", topology="sharded")
    for p in x:
        p.grad = torch.randn(96)
    opt.step()
    s = math.ceil(opt.numel / 8) + 4 * 12
    approx = 2 * (M - 1) / M * s
    got = opt.comm_stats()["bytes_sent"]
    assert abs(got - approx) <= 0.05 * approx, (got, approx)
    return f"{got} vs {approx:.1f}"


def scalars_go_raw():
    """A model of 1000 scalar parameters (one block each): blocksign sends the raw 4000 bytes, not
    ceil(1000/8) + 4·1000 = 4125, and trains bit for bit as compression `none` does, on every
    topology that carries blocksign payloads."""
    out = []
    for topology in ("ps", "sharded", "tree", "ring", "allgather", "hierarchical"):
        runs = []
        for compression in ("blocksign", "none"):
            torch.manual_seed(0)
            x = [torch.nn.Parameter(torch.randn(())) for _ in range(1000)]
            opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(x, lr=0.1, momentum=0.9), compression=compression,
                                                  topology=topology)
            for t in range(3):
                gen = torch.Generator().manual_seed(10 * t + RANK)
                for p in x:
                    p.grad = torch.randn((), generator=gen)
                opt.step()
            runs.append((flat(x), opt.comm_stats()))
        (a, stats), (b, plain) = runs
        assert torch.equal(a, b), topology
        assert stats["bytes_sent"] == plain["bytes_sent"] and stats["bytes_received"] == plain["bytes_received"]
        if topology == "ps" and RANK != 0:
            assert stats["bytes_sent"] == 3 * 4000, stats
        out.append(f"{topology}: {stats['bytes_sent']} B sent")
    return "; ".join(out)


def partial_sum_density_by_hop():
    """Nonzero fraction of the recompressed partial sums, over all ranks: dense sums are full at every
    hop of the ring (2..M terms) and at every inner node of the tree (its subtree's size); a top-k sum
    stays sparse; ps and sharded recompress no partial sum. (A rank's chunk may be empty at M = 4 on
    this small model: the check is on every rank's reports together, decided alike everywhere.)"""
    from hvd_distef.topologies.tree import subtree_size
    inner = {subtree_size(r, M) for r in range(M) if r == 0 or subtree_size(r, M) > 1}
    for topology, hops in (("ring", set(range(2, M + 1))), ("tree", inner)):
        for compression, fits in (("none", lambda v: v == 1.0),
                                  (hvd_distef.Compression.topk(ratio=0.05), lambda v: 0 < v < 0.5)):
            reports = COMM.allgather(_stats_after(topology, compression)[0].partial_sum_density())
            assert set().union(*reports) == hops and all(fits(v) for r in reports for v in r.values()), \
                (topology, compression, reports)
    for topology in ("ps", "sharded"):
        assert COMM.allgather(_stats_after(topology, "topk")[0].partial_sum_density()) == [{}] * M, topology
    return f"ring+topk: {reports}"


def _local_sizes():
    """Every way to cut the ranks into equal nodes of consecutive ranks (1 and M: one rank a node, one node)."""
    return [L for L in range(1, M + 1) if M % L == 0]


def hierarchical_matches_node_worker_simulation():
    """Algorithm 2 with one worker per node (tests/mpi/reference.py, written apart), every node size, both
    data paths inside a node: the node's mean of its ranks' d, its worker error and compression, the server
    step over nodes."""
    out = []
    for local in _local_sizes():
        for path in NODE_PATHS:
            model = make_model()
            opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="hierarchical",
                       local_size=local, node_path=path)
            ref = reference.ReferenceNodeEF(list(model.parameters()), hypers_of(opt), M, local,
                                            reference.blocksign_per_tensor)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, gamma=0.1)
            worst = 0.0
            for t in range(15):
                ref.step([grads_at(ref.x, i, t) for i in range(M)], {gi: g["lr"] for gi, g in enumerate(opt.param_groups)})
                train_step(model, opt, RANK, t)
                sched.step()
                assert_identical_across_ranks(model.parameters(), f"local_size={local} {path} step {t}")
                worst = max(worst, (flat(model.parameters()) - flat(ref.x)).abs().max().item())
                assert worst <= 2e-6, f"local_size={local} {path} step {t}: off by {worst:.3g}"
            out.append(f"local_size={local} {path}: max |x - x_ref| = {worst:.3g}")
    return "; ".join(out)


def hierarchical_one_rank_a_node_equals_sharded():
    """One rank a node: the node is the worker, and hierarchical computes exactly what sharded does."""
    a, _ = _train("sharded")
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="hierarchical", local_size=1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, gamma=0.1)
    for t in range(15):
        train_step(model, opt, RANK, t)
        sched.step()
    assert torch.equal(flat(a.parameters()), flat(model.parameters())), "hierarchical(local_size=1) is not sharded"
    return "bitwise equal"


def hierarchical_checkpoint_takes_options_as_resolved():
    """A checkpoint records what the options resolved to (the node size found, the default data path), so
    that spelling a default out, or leaving it out, loads alike; another data path is refused on every rank."""
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="hierarchical")
    for t in range(2):
        train_step(model, opt, RANK, t)
    state = opt.state_dict()
    assert state["distef"]["config"]["local_size"] == M and state["distef"]["config"]["node_path"] == "slices"
    for given in ({"local_size": M, "node_path": "slices"}, {"local_size": M}):
        other = make_model()
        wrap(other, sgd_two_groups(other), compression="blocksign", topology="hierarchical",
             **given).load_state_dict(state)
    other = make_model()
    try:
        wrap(other, sgd_two_groups(other), compression="blocksign", topology="hierarchical",
             node_path="leaders").load_state_dict(state)
    except ValueError as exc:
        assert "node_path: checkpoint 'slices', this run 'leaders'" in str(exc), exc
        return str(exc)[:120]
    raise AssertionError("a checkpoint of node_path='slices' loaded under 'leaders'")


def comm_stats_hierarchical():
    """Local rank l of each node owns slice l (``slices``; ``leaders``: local rank 0 owns the one slice), and
    slice k is cut into N shards, one a node. Through MPI: sharded's bytes over the N owners of a slice.
    Inside the node, through shared memory (counted apart): a rank's d_i (4 bytes an element) is read by the
    owner of each slice, and each owner's Δ̃ bytes by the L − 1 other ranks."""
    out = []
    for local in _local_sizes():
        for path in NODE_PATHS:
            opt, stats, T = _stats_after("hierarchical", "blocksign", local_size=local, node_path=path)
            shards, nodes = opt.buckets[0].topology.shards, M // local
            slices = local if path == "slices" else 1
            s = [math.ceil(sh.numel / 8) + 4 * len(sh.block_sizes) for sh in shards]
            assert len(shards) == nodes * slices
            d_bytes = [4 * sum(sh.numel for sh in shards[k * nodes:(k + 1) * nodes]) for k in range(slices)]
            wire = [sum(s[k * nodes:(k + 1) * nodes]) for k in range(slices)]
            mine, node = RANK % local, RANK // local
            shared = {"bytes_sent": stats["shared_memory_bytes_sent"],
                      "bytes_received": stats["shared_memory_bytes_received"]}
            if mine >= slices:  # owns no slice: shares its d_i, reads Δ̃; nothing through MPI
                out.append(_check(stats, T, 0, 0) + " MPI, " + _check(shared, T, sum(d_bytes), sum(wire)) + " shared")
                continue
            own = s[mine * nodes + node]
            across = sum(s[mine * nodes:(mine + 1) * nodes]) - own + (nodes - 1) * own
            inside_sent = sum(d_bytes) - d_bytes[mine] + (local - 1) * wire[mine]
            inside_received = (local - 1) * d_bytes[mine] + sum(wire) - wire[mine]
            out.append(_check(stats, T, across, across) + " MPI, "
                       + _check(shared, T, inside_sent, inside_received) + " shared")
    return "; ".join(out)


CASES = {f.__name__: f for f in [
    hierarchical_matches_node_worker_simulation, hierarchical_one_rank_a_node_equals_sharded,
    comm_stats_hierarchical, hierarchical_none_equals_ps, hierarchical_every_compressor,
    hierarchical_checkpoint_takes_options_as_resolved,
    sharded_equals_ps, ps_none_equals_torch_sgd, tree_none_equals_ps, ring_none_equals_ps,
    majority_vote_matches_signum_simulation, allgather_matches_one_way_error_feedback,
    tree_descends_quadratic, ring_descends_quadratic, comm_stats_ps, comm_stats_sharded,
    comm_stats_ring, comm_stats_tree, comm_stats_allgather, comm_stats_majority_vote,
    sharded_bytes_near_spec_formula, scalars_go_raw, partial_sum_density_by_hop]}

if __name__ == "__main__":
    run(CASES)
