"""The step's fast paths (issue 21, item 9) under mpirun with 1, 2 and 3 ranks: identity compression
under error feedback keeps both errors exactly zero, sends d itself, and trains as averaged
Nesterov SGD computed by hand, on every topology and with Horovod's own compressor class; a
loaded non-zero error is still used; fp16 and allreduce at one rank against their plain formulas."""
import torch

import hvd_distef
from common import COMM, assert_identical_across_ranks, make_model
from harness import run

import horovod.torch as hvd

EF_TOPOLOGIES = ("ps", "sharded", "tree", "ring", "allgather")
STEPS = 6


def _grads(rank, step, shapes):
    gen = torch.Generator().manual_seed(7919 * step + rank)
    return [torch.randn(s, generator=gen) * 10 ** (step % 3 - 2) for s in shapes]


def _by_hand(params, groups, lrs, world):
    """SPEC §1 with C = identity, written out with the kernels' float order: every worker's
    d_i = g_i + μ·(μ·m_i + g_i); Δ̃ = ((d_0 + d_1) + ...)/M; w = μ·w + λ·x;
    x = x − η·((Δ̃ + μ·w) + λ·x). Both error memories stay zero, so they do not appear."""
    x = [p.detach().clone() for p in params]
    m = [[torch.zeros_like(p) for p in params] for _ in range(world)]
    w = [torch.zeros_like(p) for p in params]
    for step in range(STEPS):
        grads = [_grads(r, step, [p.shape for p in params]) for r in range(world)]
        for j, (mu, wd, group) in enumerate(groups):
            lr = lrs[step][group]
            ds = []
            for r in range(world):
                m[r][j] = m[r][j] * mu + grads[r][j]
                ds.append(grads[r][j] + m[r][j] * mu)
            mean = ds[0].clone()
            for d in ds[1:]:
                mean = mean + d
            if world > 1:
                mean = mean / world
            decay = x[j] * wd
            w[j] = w[j] * mu + decay
            x[j] = x[j] - ((mean + w[j] * mu) + decay) * lr
    return x


def _train(topology, compression, load_error=None):
    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "weight_decay": 1e-3}],
                          lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = hvd_distef.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression,
                                          topology=topology)
    if load_error is not None:  # a checkpoint whose error counts from the first step: η_{t-1} = η_t
        state = opt.state_dict()
        state["distef"]["worker_error"] = load_error(opt.numel)
        for g in state["param_groups"]:
            g["prev_lr"] = g["lr"]
        opt.load_state_dict(state)
    lrs = []
    for step in range(STEPS):
        if step == 3:
            for g in opt.param_groups:
                g["lr"] *= 0.5
        lrs.append([g["lr"] for g in opt.param_groups])
        for p, g in zip(params, _grads(COMM.rank, step, [p.shape for p in params])):
            p.grad = g
        opt.step()
    groups = [(g["momentum"], g["weight_decay"], i) for i, g in enumerate(opt.param_groups) for _ in g["params"]]
    return model, opt, params, groups, lrs


def _errors_are_zero(opt):
    assert not bool(opt.rule.memory.error.any()), "the worker error of identity compression is not zero"
    for bucket in opt.buckets:
        server = bucket.topology.server_memory
        if server is not None:
            assert not bool(server.error.any()), "the server error of identity compression is not zero"


def identity_feedback_is_averaged_sgd_by_hand():
    """Every error-feedback topology with ``none`` and with Horovod's ``hvd.Compression.none``: errors
    exactly zero after every step, parameters equal to averaged Nesterov SGD computed by hand."""
    for topology in EF_TOPOLOGIES:
        for compression in ("none", hvd.Compression.none):
            model, opt, params, groups, lrs = _train(topology, compression)
            _errors_are_zero(opt)
            expected = _by_hand(list(make_model().parameters()), groups, lrs, COMM.size)
            assert_identical_across_ranks(params, f"({topology})")
            for name, (p, e) in zip(("w0", "b0", "w2", "b2"), zip(params, expected)):
                if topology in ("tree", "ring") and COMM.size > 2:  # they add the d_i in another order
                    torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
                    continue
                assert torch.equal(p.detach(), e), (f"{topology}/{compression}: {name} differs from SGD by hand by "
                                                    f"{float((p.detach() - e).abs().max())}")


def identity_sends_d_itself_and_skips_the_memory():
    """The worker's payload under ``none`` is d in the optimizer's own buffer (no copy) and the step
    neither compensates nor subtracts anything (``ErrorMemory``'s lossless path)."""
    from hvd_distef import _kernels
    model = make_model()
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          named_parameters=model.named_parameters(), compression="none", topology="ps")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    memory = opt.rule.memory
    before = memory.error.data_ptr()
    sent = []
    original_step = memory.step

    def spy(*args, **kwargs):
        payloads = original_step(*args, **kwargs)
        sent.extend(payloads)
        return payloads

    def refuse(*args, **kwargs):
        raise AssertionError("identity compression compensated an error that is zero")
    memory.step, compensate = spy, _kernels.compensate
    _kernels.compensate = refuse
    try:
        opt.step()
        opt.step()
    finally:
        _kernels.compensate = compensate
        memory.step = original_step
    assert sent and all(p["values"].data_ptr() == opt.rule.grad[:p.numel].data_ptr() for p in sent[:1]), \
        "the payload of identity compression is a copy of d"
    assert memory.error.data_ptr() == before and not bool(memory.error.any())


def loaded_nonzero_error_is_used():
    """A non-zero worker error loaded from a checkpoint is compensated on the next step (the lossless
    path is for errors known to be zero) and is zero after it: p = d + (η_{t-1}/η_t)·e is sent."""
    error = lambda n: torch.full((n,), 0.25)  # noqa: E731
    model, opt, params, groups, lrs = _train("ps", "none", load_error=error)
    _errors_are_zero(opt)
    plain, *_ = _train("ps", "none")
    assert not torch.equal(torch.cat([p.detach().reshape(-1) for p in params]),
                           torch.cat([p.detach().reshape(-1) for p in plain.parameters()])), \
        "the loaded error made no difference: it was skipped"


def fp16_feedback_is_the_generic_step():
    """fp16's fused error steps (worker and server) against SPEC §1's error step written out with
    fp16's cast (p = x + r·e, the product rounded first; Δ = float16(clamp(p, ±65504)); e = p − Δ; the
    server's x = ((Δ_0 + Δ_1) + ...)/M), bit for bit, on both kernel paths."""
    from hvd_distef import _kernels
    from hvd_distef.compressors import get_compressor
    c = get_compressor("fp16")
    gen = torch.Generator().manual_seed(3)
    n = 10_007
    d = torch.randn(n, generator=gen) * torch.logspace(-6, 6, n)
    d[:8] = torch.tensor([1e5, -1e5, 65519.0, 65520.0, -65536.0, 0.0, -0.0, 3e38])
    error = torch.randn(n, generator=gen) * 100
    segments = [(0, 4000, 0.5), (4000, 7000, 0.0), (7000, n, 2.0)]

    def by_hand(x, e):
        p = x.clone()
        for a, b, r in segments:
            if r:
                p[a:b] = p[a:b] + e[a:b] * r
        h = p.clamp(-65504.0, 65504.0).to(torch.float16)
        return h, p - h.to(torch.float32)

    payloads = [c.compress(d * k) for k in (1.0, -0.5, 3.0)]
    mean = (payloads[0]["values"].float() + payloads[1]["values"].float() + payloads[2]["values"].float()) / 3
    saved = _kernels.compiled
    try:
        for compiled in (saved, None):
            _kernels.compiled = compiled
            e = error.clone()
            h = c.compress_with_feedback(d, e, [n], segments)["values"]
            h_ref, e_ref = by_hand(d, error)
            assert torch.equal(h, h_ref) and torch.equal(e, e_ref), f"worker step, compiled={compiled is not None}"
            for some, x in ((payloads[:1], payloads[0]["values"].float()), (payloads, mean)):
                e = error.clone()
                h = c.mean_with_feedback(some, e, [n], segments)["values"]
                h_ref, e_ref = by_hand(x, error)
                assert torch.equal(h, h_ref) and torch.equal(e, e_ref), \
                    f"server step of {len(some)}, compiled={compiled is not None}"
    finally:
        _kernels.compiled = saved


def allreduce_unscales_at_one_rank():
    """``allreduce`` at one rank leaves p.grad alone (its average is itself) but still unscales it
    under AMP's loss scale: the update equals torch's SGD on the unscaled gradient."""
    if COMM.size != 1:
        return "one rank only"
    model, stock_model = make_model(), make_model()
    hyper = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), **hyper),
                                          named_parameters=model.named_parameters(), compression="none",
                                          topology="allreduce")
    stock = torch.optim.SGD(stock_model.parameters(), **hyper)
    for step in range(3):
        grads = _grads(0, step, [p.shape for p in model.parameters()])
        scale = 2.0 ** (step + 1)
        for p, q, g in zip(model.parameters(), stock_model.parameters(), grads):
            p.grad, q.grad = g * scale, g.clone()
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        stock.step()
        for p, q in zip(model.parameters(), stock_model.parameters()):
            assert torch.equal(p.grad, q.grad), "p.grad was not unscaled"
            assert torch.equal(p.detach(), q.detach()), "the update differs from torch's SGD on the unscaled gradient"


CASES = {f.__name__: f for f in (identity_feedback_is_averaged_sgd_by_hand,
                                  identity_sends_d_itself_and_skips_the_memory, loaded_nonzero_error_is_used,
                                  fp16_feedback_is_the_generic_step, allreduce_unscales_at_one_rank)}

if __name__ == "__main__":
    run(CASES)
