"""Multi-rank checks of SPEC §1 for `ps`, of the virtual iterate on every topology that keeps all its
errors, and of the `allreduce` baseline (run under mpirun by pytest)."""
import functools
import math

import torch

import reference
from common import (COMM, assert_identical_across_ranks, flat, grads_at, hypers_of, loss_of, make_model, roundtrip,
                    sgd_two_groups, train_step, wrap)
from harness import run

import hvd_distef

RANK, M = COMM.rank, COMM.size
STEPS, MILESTONES = 20, [7, 14]  # two LR drops


def _against_reference(compression, ref_compress, momentum=0.9, nesterov=True, weight_decay=5e-4, tol=2e-6,
                       error_decay=None):
    model = make_model()
    opt = wrap(model, sgd_two_groups(model, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
               compression=compression, topology="ps", error_decay=error_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, gamma=0.1)
    ref = reference.ReferenceDistEF(list(model.parameters()), hypers_of(opt), M, ref_compress,
                                    error_decay=error_decay)
    worst = 0.0
    for t in range(STEPS):
        lrs = {gi: g["lr"] for gi, g in enumerate(opt.param_groups)}
        ref.step([grads_at(ref.x, i, t) for i in range(M)], lrs)
        train_step(model, opt, RANK, t)
        sched.step()
        assert_identical_across_ranks(model.parameters(), f"after step {t}")
        diff = (flat(model.parameters()) - flat(ref.x)).abs().max().item()
        worst = max(worst, diff)
        assert diff <= tol, f"step {t}: max |x - x_ref| = {diff:.3g} > {tol}"
    return f"max |x - x_ref| over {STEPS} steps = {worst:.3g}"


def ps_blocksign_nesterov_matches_reference():
    return _against_reference("blocksign", reference.blocksign_per_tensor)


def ps_blocksign_heavy_ball_matches_reference():
    return _against_reference(hvd_distef.Compression.blocksign, reference.blocksign_per_tensor, nesterov=False)


def ps_sign_no_momentum_matches_reference():
    return _against_reference(hvd_distef.Compression.sign(), reference.sign_whole, momentum=0.0, nesterov=False,
                              weight_decay=0.0)


def ps_none_matches_reference():
    return _against_reference("none", reference.identity)


def ps_error_decay_matches_reference():
    """error_decay=β: both errors decay by β each step across the LR drops (Wu et al. 2018's rule);
    refused where there are no errors, or outside [0, 1]."""
    for topology, beta in (("allreduce", 0.9), ("ps", 1.5)):
        try:
            model = make_model()
            wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), topology=topology, error_decay=beta)
            raise AssertionError(f"error_decay={beta} accepted under {topology}")
        except ValueError as exc:
            assert "error_decay" in str(exc), exc
    return _against_reference("blocksign", reference.blocksign_per_tensor, error_decay=0.9)


def _per_element(opt, key):
    """The param groups' ``key`` for every element of the fused buffer, float64."""
    return torch.cat([torch.full((p.numel(),), float(g[key]), dtype=torch.float64)
                      for g in opt.param_groups for p in g["params"]])


def _errors(opt):
    """ẽ_t + (1/M)·Σ_i e_{t,i} over the whole fused buffer, on every rank: the server error from
    wherever the topology keeps it (rank 0, or one shard per rank), each rank's worker error."""
    state = opt.state_dict()["distef"]
    held = torch.zeros(opt.numel, dtype=torch.float64)
    for bucket, part in zip(opt.buckets, state["topology"]):
        if part.get("server_error") is not None:
            start = bucket.start + bucket.topology.server_start
            held[start:start + part["server_error"].numel()] = part["server_error"].double()
    held += state["worker_error"].double() / M
    return torch.from_numpy(COMM.allreduce(held.numpy()))


def _virtual_iterate_identity(topology):
    """x̃_t = x_t − η_{t−1}(ẽ_t + ē_t) obeys x̃_{t+1} = x̃_t − η_t·d̄_t across LR changes (SPEC §1,
    λ = 0), d̄_t = (1/M)Σ_i d_i computed here from the ranks' gradients by the momentum recurrence
    (m_i = μ·m_i + g_i, d_i = μ·m_i + g_i), not read from the optimizer."""
    model = make_model()
    opt = wrap(model, sgd_two_groups(model, weight_decay=0.0), compression="blocksign", topology=topology)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, gamma=0.1)
    assert all(g["nesterov"] for g in opt.param_groups)
    mu = _per_element(opt, "momentum")
    m = torch.zeros(opt.numel, dtype=torch.float64)  # this rank's m_i, kept here
    prev_lr = torch.zeros(opt.numel, dtype=torch.float64)
    worst = 0.0
    for t in range(STEPS):
        lr = _per_element(opt, "lr")
        x_virtual = flat(model.parameters()).double() - prev_lr * _errors(opt)
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        g = flat([p.grad for p in model.parameters()]).double()
        opt.step()
        m = mu * m + g
        d_mean = torch.from_numpy(COMM.allreduce((mu * m + g).numpy())) / M
        x_next = flat(model.parameters()).double() - lr * _errors(opt)
        gap = (x_next - (x_virtual - lr * d_mean)).abs().max().item()
        worst = max(worst, gap)
        assert gap < 2e-7, f"step {t}: virtual iterate off by {gap:.3g}"  # float32 state: seen 2e-8
        prev_lr = lr
        sched.step()
    return f"max deviation {worst:.3g}"


#: the topologies whose every error is kept (no partial sum recompressed away, as tree and ring do)
VIRTUAL_ITERATE = {f"virtual_iterate_identity_{t}": functools.partial(_virtual_iterate_identity, t)
                   for t in ("ps", "sharded", "allgather")}


def allreduce_matches_torch_sgd():
    """`allreduce` + none is torch's SGD on the mean gradient (stock allreduce SGDM)."""
    model, ref_model = make_model(), make_model()
    opt = wrap(model, sgd_two_groups(model), compression="none", topology="allreduce")
    ref_opt = sgd_two_groups(ref_model)
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, MILESTONES, gamma=0.1) for o in (opt, ref_opt)]
    for t in range(STEPS):
        train_step(model, opt, RANK, t)
        grads = [grads_at(list(ref_model.parameters()), i, t) for i in range(M)]
        for j, p in enumerate(ref_model.parameters()):
            p.grad = sum(g[j] for g in grads) / M
        ref_opt.step()
        for s in scheds:
            s.step()
        assert_identical_across_ranks(model.parameters())
        diff = (flat(model.parameters()) - flat(ref_model.parameters())).abs().max().item()
        assert diff < 1e-6, f"step {t}: {diff}"
    return "ok"


def _resume_equals_uninterrupted(**kw):
    def run_from(start_state, steps):
        model = make_model()
        opt = wrap(model, sgd_two_groups(model), **kw)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 8], gamma=0.1)
        first = 0
        if start_state is not None:
            model.load_state_dict(start_state["model"])
            opt.load_state_dict(start_state["opt"])
            sched.load_state_dict(start_state["sched"])
            first = start_state["step"]
        saved = None
        for t in range(first, steps):
            if t == 6:
                saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(),
                                   "sched": sched.state_dict(), "step": t})
            train_step(model, opt, RANK, t)
            sched.step()
        return flat(model.parameters()), opt.state_dict(), saved

    full, full_state, saved = run_from(None, 12)
    resumed, resumed_state, _ = run_from(saved, 12)
    assert torch.equal(full, resumed), f"resumed run differs by {(full - resumed).abs().max().item():.3g}"
    for key in ("momentum", "worker_error", "weight_decay_buffer"):
        a, b = full_state["distef"][key], resumed_state["distef"][key]
        assert (a is None and b is None) or torch.equal(a, b), key
    a, b = full_state["distef"]["topology"], resumed_state["distef"]["topology"]
    assert len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))
    return "bitwise equal"


def resume_ps_blocksign():
    return _resume_equals_uninterrupted(compression="blocksign", topology="ps")


def resume_ps_randomk():
    return _resume_equals_uninterrupted(compression=hvd_distef.Compression.randomk(ratio=0.3), topology="ps")


def resume_allreduce():
    return _resume_equals_uninterrupted(compression="none", topology="allreduce")


def comm_stats_match_formulas():
    """`ps` + blocksign, whose buffers we hand to MPI ourselves: the bytes counted are SPEC §3's. (The
    `allreduce` baseline's bytes are the ring formula, not a count: nothing to test against it.)"""
    T = 5
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps")
    for t in range(T):
        train_step(model, opt, RANK, t)
    d = sum(p.numel() for p in model.parameters())
    stats = opt.comm_stats()
    s = math.ceil(d / 8) + 4 * 4  # 4 tensors, one block each
    expect = (M - 1) * s * T if RANK == 0 else s * T
    assert stats["bytes_sent"] == expect and stats["bytes_received"] == expect, (stats, expect)
    assert stats["steps"] == T
    return f"ps: {stats}"


def backward_passes_sum():
    """backward_passes_per_step=4 uses p.grad as the passes left it (their sum, as torch and Horovod do),
    bit for bit a step on the sum of the passes' gradients computed apart; zero_grad() resets the
    count (7 batches an epoch, two epochs); a short last step (3 passes) uses what it has; a fifth
    pass raises."""
    a, b = make_model(), make_model()
    opt_a = wrap(a, sgd_two_groups(a), compression="blocksign", backward_passes_per_step=4)
    opt_b = wrap(b, sgd_two_groups(b), compression="blocksign")
    for epoch in range(2):
        opt_a.zero_grad()
        for start in (0, 4):
            batches = [7 * epoch + start + k for k in range(4 if start == 0 else 3)]
            for t in batches:
                loss_of(a, RANK, t).backward()
            opt_a.step()
            opt_a.zero_grad()
            parts = [grads_at(list(b.parameters()), RANK, t) for t in batches]
            for j, p in enumerate(b.parameters()):
                p.grad = parts[0][j].clone()
                for more in parts[1:]:
                    p.grad += more[j]
            opt_b.step()
            assert torch.equal(flat(a.parameters()), flat(b.parameters())), f"epoch {epoch}, from batch {start}"
    for t in range(3):  # passes abandoned by model.zero_grad() (grads set to None) do not count
        loss_of(a, RANK, t).backward()
    a.zero_grad()
    for t in range(4):
        loss_of(a, RANK, t).backward()
    opt_a.step()
    opt_a.zero_grad()
    for k in range(5):
        loss_of(a, RANK, k).backward()
    try:
        opt_a.step()
    except ValueError as exc:
        assert "backward_passes_per_step=4" in str(exc)
        return f"bitwise equal over 2 epochs; too many passes: {exc}"
    raise AssertionError("five backward passes with backward_passes_per_step=4 did not raise")


CASES = {f.__name__: f for f in [
    ps_blocksign_nesterov_matches_reference, ps_blocksign_heavy_ball_matches_reference,
    ps_sign_no_momentum_matches_reference, ps_none_matches_reference, ps_error_decay_matches_reference,
    allreduce_matches_torch_sgd, resume_ps_blocksign, resume_ps_randomk, resume_allreduce,
    comm_stats_match_formulas, backward_passes_sum]} | VIRTUAL_ITERATE

if __name__ == "__main__":
    run(CASES)
