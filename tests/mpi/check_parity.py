"""Drop-in parity (SPEC §5a, issue 11): each case checks an exact right value against an independent
computation (stock horovod.torch on the same script, plain torch SGD, hand-computed floats), on
every topology where it applies. Run under mpirun with 2 and 3 ranks by tests/test_parity.py."""
import contextlib
import threading
import warnings

import horovod.torch as hvd
import torch

from common import COMM, assert_identical_across_ranks, flat, loss_of, make_model, roundtrip, sgd_two_groups, wrap
from harness import run

import hvd_distef
from hvd_distef import _kernels

RANK, M = COMM.rank, COMM.size
#: (topology, compression) pairs: every topology, and the compressors whose blocks span tensors
EVERY_WAY = [("ps", "blocksign"), ("ps", "sign"), ("ps", hvd_distef.Compression.blocksign(bucket_mb=1)),
             ("ps", "topk"), ("ps", "fp16"), ("sharded", "blocksign"), ("tree", "sign"), ("ring", "blocksign"),
             ("allgather", "qsgd"), ("majority_vote", "sign"), ("allreduce", "none"), ("allreduce", "fp16")]


class Frozen(torch.nn.Module):
    """A frozen float32 layer and an int32 parameter in the optimizer's list, a layer that no rank
    uses on odd steps, and a layer that only rank 0 uses."""

    def __init__(self, idle_on_odd_steps=True):
        super().__init__()
        torch.manual_seed(0)
        self.idle_on_odd_steps = idle_on_odd_steps
        self.backbone = torch.nn.Linear(6, 8)
        self.backbone.requires_grad_(False)
        self.index = torch.nn.Parameter(torch.tensor([1, 3], dtype=torch.int32), requires_grad=False)
        self.head = torch.nn.Linear(8, 3)
        self.sometimes = torch.nn.Linear(8, 3)
        self.rank0_only = torch.nn.Linear(8, 3)

    def forward(self, x, step):
        h = torch.tanh(self.backbone(x))
        out = self.head(h)
        if step % 2 == 0 or not self.idle_on_odd_steps:
            out = out + self.sometimes(h)
        if RANK == 0:
            out = out + self.rank0_only(h)
        return out


def _frozen_run(topology, compression, steps=4, idle_on_odd_steps=True):
    model = Frozen(idle_on_odd_steps)
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
               compression=compression, topology=topology)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    for t in range(steps):
        before = {n: p.clone() for n, p in model.named_parameters()}
        state = _state(opt)
        opt.zero_grad()
        x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(7 * t + RANK)), torch.arange(16) % 3
        torch.nn.functional.cross_entropy(model(x, t), y).backward()
        opt.step()
        named = dict(model.named_parameters())
        for n, p in frozen.items():
            assert torch.equal(p, named[n]), f"frozen {n} moved at step {t}"
        if t % 2 == 1 and idle_on_odd_steps:  # no rank has a gradient for `sometimes`: untouched, its state too
            for n in ("sometimes.weight", "sometimes.bias"):
                assert torch.equal(before[n], dict(model.named_parameters())[n]), f"{n} moved at step {t}"
            after = _state(opt)
            for key in state:
                lo, hi = _slice(opt, "sometimes")
                assert torch.equal(state[key][lo:hi], after[key][lo:hi]), f"{key} of `sometimes` changed at step {t}"
        assert_identical_across_ranks(model.parameters(), f"step {t}")
    return model, opt


def _state(opt):
    """The flat per-element state that a step may change (settled errors)."""
    out = {}
    buffers = getattr(opt.rule, "buffers", None)
    if buffers is not None:
        out["momentum"], out["weight_decay_buffer"] = buffers.momentum.current.clone(), buffers.wd.clone()
    if opt.rule.memory is not None:
        out["worker_error"] = opt.rule.memory.error.clone()
    server = opt.buckets[0].topology.server_memory
    if server is not None and opt.buckets[0].topology.server_start == 0 and server.error.numel() == opt.numel:
        out["server_error"] = server.error.clone()
    return out


def _slice(opt, prefix):
    layout = opt._layout
    idx = [i for i, n in enumerate(layout.names) if n.startswith(prefix)]
    return layout.bounds[idx[0]][0], layout.bounds[idx[-1]][1]


def frozen_and_gradless_parameters_untouched_every_way():
    done = []
    for topology, compression in EVERY_WAY:
        _frozen_run(topology, compression)
        done.append(f"{topology}+{getattr(compression, 'name', compression)}")
    return "; ".join(done)


def frozen_parameters_under_allreduce_equal_stock_horovod():
    """`allreduce`+none on a model with frozen layers (a float32 and an int32 parameter) and a layer
    only rank 0 uses equals stock hvd.DistributedOptimizer on the same script, bit for bit. (A layer
    that no rank uses gets zeros from stock Horovod, which torch's SGD then decays; we leave it
    alone, SPEC §5a: the case above.)"""
    ours, _ = _frozen_run("allreduce", "none", idle_on_odd_steps=False)
    model = Frozen(idle_on_odd_steps=False)
    stock = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                                     weight_decay=1e-2), named_parameters=model.named_parameters())
    for t in range(4):
        stock.zero_grad()
        x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(7 * t + RANK)), torch.arange(16) % 3
        torch.nn.functional.cross_entropy(model(x, t), y).backward()
        stock.step()
    diff = (flat(ours.parameters()) - flat(model.parameters())).abs().max().item()
    assert diff == 0.0, f"differs from stock Horovod by {diff:.3g}"
    return "bitwise equal to stock Horovod"


def step_with_no_gradients_changes_nothing():
    for topology, compression in EVERY_WAY:
        model = make_model()
        opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
                   compression=compression, topology=topology)
        before = flat(model.parameters()).clone()
        opt.zero_grad()
        opt.step()
        assert torch.equal(before, flat(model.parameters())), topology
        assert opt.comm_stats()["steps"] == 0 and opt.comm_stats()["bytes_sent"] == 0, opt.comm_stats()
    return "unchanged, nothing sent"


def param_groups_are_shared():
    """A scheduler built on the inner SGD before wrapping drives the wrapper (horovod.torch: lr 0.01
    after one StepLR(gamma=0.1) step), and one built on the wrapper drives the inner SGD."""
    for topology, compression in (("ps", "blocksign"), ("allreduce", "none")):
        model = make_model()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(sgd, 1, gamma=0.1)
        opt = wrap(model, sgd, compression=compression, topology=topology)
        assert opt.param_groups[0] is sgd.param_groups[0]
        for t in range(2):
            opt.zero_grad()
            loss_of(model, RANK, t).backward()
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == 0.1 * 0.1 * 0.1
        assert opt.param_groups[0]["prev_lr"] == 0.1 * 0.1
    return "shared"


def _twin_runs(topology, compression, schedule, steps=8, momentum=0.0, weight_decay=0.0, switch=None):
    """The same script with our optimizer and with stock Horovod (allreduce) or our `none` run."""
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt = wrap(model, sgd, compression=compression, topology=topology)
    sched = schedule(opt)
    lrs = []
    for t in range(steps):
        if switch is not None and t == steps // 2:
            switch(opt)
        before = flat(model.parameters()).clone()
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
        assert_identical_across_ranks(model.parameters())
        if lrs[-1] == 0:
            assert torch.equal(before, flat(model.parameters())), f"lr = 0 moved x at step {t}"
    return model, opt, lrs


def _stock_twin(schedule, steps=8, momentum=0.0, weight_decay=0.0, switch=None):
    model = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum,
                                                   weight_decay=weight_decay),
                                   named_parameters=model.named_parameters())
    sched = schedule(opt)
    for t in range(steps):
        if switch is not None and t == steps // 2:
            switch(opt)
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        opt.step()
        sched.step()
    return model


SCHEDULES = {
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=8),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.3, step_size_up=2),
    "LambdaLR warm-up s/4": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 4)),
    "CosineAnnealingLR eta_min=0": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3, eta_min=0),
}


def hyperparameters_change_at_run_time():
    """Momentum cycled from an SGD built with momentum 0, weight decay switched on half-way, lr = 0
    steps: under `allreduce` bit for bit stock Horovod; under error feedback every step runs, lr = 0
    leaves x as it was, and the ranks stay identical."""
    def decay_on(o):
        o.param_groups[0]["weight_decay"] = 1e-2
    out = []
    for name, schedule in SCHEDULES.items():
        ours, _, lrs = _twin_runs("allreduce", "none", schedule, switch=decay_on)
        stock = _stock_twin(schedule, switch=decay_on)
        diff = (flat(ours.parameters()) - flat(stock.parameters())).abs().max().item()
        assert diff == 0.0, f"{name}: differs from stock Horovod by {diff:.3g}"
        for topology, compression in (("ps", "blocksign"), ("sharded", "blocksign"), ("majority_vote", "sign")):
            _twin_runs(topology, compression, schedule, switch=decay_on)
        out.append(f"{name}: lrs {[round(x, 4) for x in lrs[:4]]}...")
    return "; ".join(out)


def zero_lr_keeps_errors_and_rescales_by_last_nonzero():
    """lr = 0 leaves x, e_i and ẽ as they were; the next step rescales by η_last_nonzero/η_t (SPEC §5a)."""
    for topology in ("ps", "sharded", "ring", "tree"):
        _zero_lr_run(topology)
    return "ok"


def _zero_lr_run(topology):
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), compression="blocksign",
               topology=topology)
    server_before = None
    for t, lr in enumerate([0.1, 0.1, 0.0, 0.05]):
        opt.param_groups[0]["lr"] = lr
        x, state = flat(model.parameters()).clone(), _state(opt)
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        opt.step()
        if lr == 0:
            after = _state(opt)
            assert torch.equal(x, flat(model.parameters()))
            for key in ("worker_error", "server_error"):
                if key in state:
                    assert torch.equal(state[key], after[key]), key
            server = opt.buckets[0].topology.server_memory
            if server is not None:  # this rank's server error (a shard under sharded/ring)
                assert torch.equal(server_before, server.error), "server error changed"
            assert opt.param_groups[0]["prev_lr"] == 0.1
        server = opt.buckets[0].topology.server_memory
        server_before = None if server is None else server.error.clone()
    assert opt.param_groups[0]["prev_lr"] == 0.05


def comm_subset_restricts_allreduce():
    """`allreduce` over comm= (a split of the world): the mean over that communicator's ranks only."""
    sub = COMM.Split(RANK % 2, RANK)
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression="none", topology="allreduce", comm=sub)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, RANK, 0).backward()
    grads = sub.allgather([p.grad.clone() for p in model.parameters()])
    opt.step()
    for j, (p, x) in enumerate(zip(model.parameters(), before)):
        mean = sum(g[j] for g in grads) / sub.Get_size()
        torch.testing.assert_close(p.detach(), x - 0.1 * mean, rtol=0, atol=1e-7)
    size = sub.Get_size()
    sub.Free()
    return f"mean over {size} of {M} ranks"


def _checkpointed(topology, compression):
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
               compression=compression, topology=topology)
    for t in range(3):
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        opt.step()
    return model, opt


def broadcast_optimizer_state_takes_no_step():
    """On a fresh optimizer: parameters, steps and bytes unchanged, and the next steps bit for bit
    those of a run without the call. Horovod's resume recipe (only rank 0 loads, then broadcasts):
    no deadlock, rank 0's momentum and options on every rank, parameters unchanged."""
    out = []
    for topology, compression in (("ps", "blocksign"), ("sharded", "blocksign"), ("allreduce", "none"),
                                  ("majority_vote", "sign")):
        runs = []
        for call in (True, False):
            model = make_model()
            opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                       compression=compression, topology=topology)
            if call:
                before = flat(model.parameters()).clone()
                hvd.broadcast_optimizer_state(opt, root_rank=0)
                assert torch.equal(before, flat(model.parameters()))
                assert opt.comm_stats()["steps"] == 0 and opt.comm_stats()["bytes_sent"] == 0
            for t in range(3):
                opt.zero_grad()
                loss_of(model, RANK, t).backward()
                opt.step()
            runs.append(flat(model.parameters()))
        assert torch.equal(runs[0], runs[1]), f"{topology}: the call changed training"
        saved_model, saved_opt = _checkpointed(topology, compression)
        checkpoint = {"model": saved_model.state_dict(), "opt": saved_opt.state_dict()}
        model = make_model()
        opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                   compression=compression, topology=topology)
        if RANK == 0:
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["opt"])
            opt.param_groups[0]["lr"] = 0.05
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        before = flat(model.parameters()).clone()
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        assert torch.equal(before, flat(model.parameters()))
        assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["prev_lr"] == 0.1
        momentum = [v["momentum_buffer"] for v in opt.state_dict()["state"].values()]
        everyone = COMM.allgather([None if m is None else m.clone() for m in momentum])
        assert all(all((a is None and b is None) or torch.equal(a, b) for a, b in zip(everyone[0], other))
                   for other in everyone), f"{topology}: momentum not broadcast"
        opt.zero_grad()
        loss_of(model, RANK, 9).backward()
        opt.step()
        assert_identical_across_ranks(model.parameters())
        out.append(topology)
    return "no step, resume recipe ok: " + ", ".join(out)


def _scaled_backward(model, opt, scaler, t):
    """zero_grad() and a scaled backward pass whose gradients are non-finite on rank 1 at step 1 (the
    inf is in the loss, not written into p.grad afterwards: stock Horovod's hooks may already have
    sent the gradient by then)."""
    opt.zero_grad()
    loss = loss_of(model, RANK, t)
    if t == 1 and RANK == 1:
        loss = loss * float("inf")
    scaler.scale(loss).backward()


def grad_scaler_skips_on_every_rank():
    """An inf on rank 1 only at step 1: every rank skips that step, no hang, identical parameters, and
    the scales stay identical on every rank, with torch's stock GradScaler (our step writes the ranks'
    decision where its update() reads it) as with hvd_distef.GradScaler: 2048, 1024, 2048, 4096 (growth
    every step). Without infs an AMP run equals the plain run bit for bit (scaling by powers of two is
    exact)."""
    out = []
    for topology, compression in (("ps", "blocksign"), ("allreduce", "none"), ("sharded", "blocksign"),
                                  ("tree", "blocksign"), ("ring", "blocksign"), ("allgather", "blocksign"),
                                  ("majority_vote", "sign")):
        for scaler_cls in (torch.amp.GradScaler, hvd_distef.GradScaler):
            model = make_model()
            opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                       compression=compression, topology=topology)
            scaler = scaler_cls("cpu", init_scale=2.0 ** 10, growth_interval=1)
            plain = make_model()
            plain_opt = wrap(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
                             compression=compression, topology=topology)
            for t in range(4):
                before = flat(model.parameters()).clone()
                _scaled_backward(model, opt, scaler, t)
                scaler.step(opt)
                scaler.update()
                assert COMM.allgather(scaler.get_scale()) == [[2048.0, 1024.0, 2048.0, 4096.0][t]] * M, \
                    f"{topology}/{scaler_cls.__module__} step {t}: scales {COMM.allgather(scaler.get_scale())}"
                assert_identical_across_ranks(model.parameters(), f"step {t}")
                if t == 1:
                    assert torch.equal(before, flat(model.parameters())), "the inf step moved x"
                else:
                    plain_opt.zero_grad()
                    loss_of(plain, RANK, t).backward()
                    plain_opt.step()
                    assert torch.equal(flat(plain.parameters()), flat(model.parameters())), f"step {t}"
            assert opt.comm_stats()["skipped_steps"] == 1
            out.append(f"{topology}/{scaler_cls.__module__}")
    return "equal scales: " + ", ".join(out)


def horovod_amp_recipe_skips_alike():
    """Horovod's AMP recipe (synchronize(); scaler.unscale_(opt); with skip_synchronize(): scaler.step(opt))
    with the stock torch.amp.GradScaler and an inf on rank 1 only: every rank skips, the scales stay
    equal, and under `allreduce` everything is bit for bit stock Horovod's. Without a scaler the same
    synchronize() makes step() raise NonFiniteGradientError on every rank, nothing updated, under error
    feedback (or nonfinite="raise"); under `allreduce` the NaN propagates as in stock Horovod."""
    out = []
    for flavour in ("stock", "allreduce", "ps"):
        model = make_model()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = (hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters()) if flavour == "stock"
               else wrap(model, sgd, compression="none" if flavour == "allreduce" else "blocksign", topology=flavour))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for t in range(4):
            before = flat(model.parameters()).clone()
            _scaled_backward(model, opt, scaler, t)
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
            assert_identical_across_ranks(model.parameters(), f"{flavour} step {t}")
            if t == 1:
                assert torch.equal(before, flat(model.parameters())), f"{flavour}: the inf step moved x"
        scales = COMM.allgather(scaler.get_scale())
        assert len(set(scales)) == 1 and scales[0] == 2.0 ** 9, (flavour, scales)
        out.append(flat(model.parameters()))
    assert torch.equal(out[0], out[1]), "allreduce differs from stock Horovod"
    nan_runs = []
    for flavour, kw in (("stock", None), ("allreduce", {}), ("allreduce", {"nonfinite": "raise"}), ("ps", {})):
        model = make_model()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = (hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters()) if kw is None
               else wrap(model, sgd, compression="none" if flavour == "allreduce" else "blocksign", topology=flavour,
                         **kw))
        before = flat(model.parameters()).clone()
        opt.zero_grad()
        (loss_of(model, RANK, 0) * (float("nan") if RANK == 1 else 1.0)).backward()  # in the loss: see above
        opt.synchronize()
        try:
            with opt.skip_synchronize():
                opt.step()
        except hvd_distef.NonFiniteGradientError as exc:
            assert flavour == "ps" or kw, f"{flavour} {kw} raised"
            assert "rank 1: 0.weight" in str(exc), str(exc)
            assert torch.equal(before, flat(model.parameters()))
            continue
        assert kw is None or (flavour == "allreduce" and not kw), f"{flavour} {kw}: no error for a NaN gradient"
        nan_runs.append(flat(model.parameters()).clone())
    # allreduce's default (torch's and Horovod's meaning): the NaN reaches every rank's parameters alike
    stock, ours = nan_runs
    assert bool(torch.isnan(ours).any()) and torch.equal(stock.nan_to_num(nan=7.0), ours.nan_to_num(nan=7.0))
    return "skipped alike, scales equal; without a scaler NaN propagates (allreduce) or raises (ps, 'raise')"


def stock_checkpoint_resumes_under_allreduce():
    """A horovod.torch (torch.optim.SGD) checkpoint loads into our `allreduce` optimizer and the run
    goes on bit for bit as stock Horovod's; under error feedback it is refused with the reason, and
    opt.state[p] holds live views of the momentum."""
    def train(opt, model, steps):
        for t in steps:
            opt.zero_grad()
            loss_of(model, RANK, t).backward()
            opt.step()
    model = make_model()
    stock = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                                     named_parameters=model.named_parameters())
    train(stock, model, range(3))
    checkpoint = roundtrip({"model": model.state_dict(), "opt": stock.state_dict()})
    train(stock, model, range(3, 6))
    resumed = make_model()
    resumed.load_state_dict(checkpoint["model"])
    ours = wrap(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                compression="none", topology="allreduce")
    ours.load_state_dict(checkpoint["opt"])
    train(ours, resumed, range(3, 6))
    assert torch.equal(flat(model.parameters()), flat(resumed.parameters()))
    ef = wrap(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9), compression="blocksign")
    try:
        ef.load_state_dict(checkpoint["opt"])
    except ValueError as exc:
        assert "topology='allreduce'" in str(exc)
    else:
        raise AssertionError("a torch checkpoint was accepted under error feedback")
    train(ef, resumed, range(2))
    for p in resumed.parameters():
        m = ef.state[p]["momentum_buffer"]
        assert m.shape == p.shape and m.data_ptr() in range(ef.rule.buffers.momentum.current.data_ptr(),
                                                            ef.rule.buffers.momentum.current.data_ptr() + 4 * ef.numel)
    assert bool(ef.rule.buffers.momentum.current.abs().sum() > 0)
    return "bitwise equal to stock Horovod"


def fp16_on_the_wire_stays_finite():
    """`allreduce`+fp16, gradient 40000 on every rank: w = x − 0.1·40000 as torch computes it (the
    fp16 sum of 40000s would overflow). `ps`+fp16 with gradient 1e5: the cast saturates at 65504,
    the worker error carries 1e5 − 65504 = 34496, the server error 0, x = x − 0.1·65504."""
    for topology, g, sent in (("allreduce", 40000.0, 40000.0), ("ps", 1e5, 65504.0)):
        w = torch.nn.Parameter(torch.zeros(4))
        opt = hvd_distef.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), compression="fp16", topology=topology)
        w.grad = torch.full((4,), g)
        opt.step()
        expect = torch.zeros(4).sub_(torch.full((4,), sent).mul(0.1))
        assert torch.equal(w.detach(), expect), (topology, w)
        if topology == "ps":
            assert torch.equal(opt.rule.memory.error, torch.full((4,), 1e5 - 65504.0))
            if RANK == 0:
                assert torch.equal(opt.buckets[0].topology.server_memory.error, torch.zeros(4))
    return "finite"


def ranks_that_disagree_raise_on_every_rank():
    """nonfinite; a float64 model, a misspelt compressor or another node_path on one rank only: every rank raises at
    construction, naming the rank (no hang). Different lr may be built (broadcast_optimizer_state aligns
    them): check_patterns.options_are_aligned_by_broadcast_or_refused_at_the_step."""
    cases = {
        "nonfinite": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1), {"nonfinite": "raise" if RANK else "skip"}),
        "float64": lambda m: (torch.optim.SGD((m.double() if RANK == 1 else m).parameters(), lr=0.1), {}),
        "compressor": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                                 {"compression": "blocksign" if RANK != 1 else "blocksing"}),
        "node_path": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                                {"topology": "hierarchical", "node_path": "leaders" if RANK != 1 else "slices"}),
        "node_path misspelt": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                                         {"topology": "hierarchical", "node_path": "slices" if RANK != 1 else "slice"}),
        "node_path elsewhere": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                                          {"topology": "sharded", "node_path": None if RANK != 1 else "leaders"}),
    }
    out = []
    for name, build in cases.items():
        model = make_model()
        sgd, kw = build(model)
        try:
            wrap(model, sgd, **kw)
        except (ValueError, TypeError) as exc:
            text = str(exc)
            assert "rank 1" in text or RANK == 1, f"{name}: {text}"
            out.append(name)
            continue
        raise AssertionError(f"{name}: no error on rank {RANK}")
    return "raised everywhere: " + ", ".join(out)


def _damaged(checkpoint, damage):
    damaged = roundtrip(checkpoint)
    damage(damaged)
    damaged["param_groups"][0]["lr"] = 123.0
    return damaged


def _swap_first_two_momenta(ck):
    state = ck["state"]
    state[0]["momentum_buffer"], state[1]["momentum_buffer"] = state[1]["momentum_buffer"], state[0]["momentum_buffer"]


DAMAGE = {
    "another topology": ("ps", "blocksign", lambda ck: ck.update(_checkpointed("sharded", "blocksign")[1].state_dict())),
    "no step count": ("ps", "randomk", lambda ck: ck["distef"].pop("steps")),
    "no skipped count": ("sharded", "blocksign", lambda ck: ck["distef"].pop("skipped_steps")),
    "bogus compressor stream": ("ps", "randomk", lambda ck: ck["distef"].update(worker_compressor={"bogus": 1})),
    "no server compressor": ("sharded", "blocksign", lambda ck: ck["distef"].update(server_compressor=None)),
    "swapped momenta": ("allreduce", "none", _swap_first_two_momenta),
}


def rejected_checkpoint_changes_nothing():
    """load_state_dict validates everything first: a checkpoint from another topology, or one with a
    missing or damaged entry, raises ValueError and leaves the hyper-parameters and every buffer
    as they were; training goes on."""
    out = []
    for what, (topology, compression, damage) in DAMAGE.items():
        model, opt = _checkpointed(topology, compression)
        checkpoint = _damaged(opt.state_dict(), damage)
        opt.zero_grad()
        loss_of(model, RANK, 4).backward()
        opt.step()
        before = (opt.param_groups[0]["lr"], _state(opt), roundtrip(opt.state_dict()))
        try:
            opt.load_state_dict(checkpoint)
        except ValueError as exc:
            after = roundtrip(opt.state_dict())
            assert opt.param_groups[0]["lr"] == before[0], what
            assert all(torch.equal(before[1][k], v) for k, v in _state(opt).items()), what
            assert after["distef"]["steps"] == before[2]["distef"]["steps"], what
            assert after["distef"]["worker_compressor"] == before[2]["distef"]["worker_compressor"], what
            opt.zero_grad()
            loss_of(model, RANK, 5).backward()
            opt.step()
            out.append(f"{what}: {str(exc)[:60]}")
            continue
        raise AssertionError(f"a checkpoint with {what} was accepted")
    return "; ".join(out)


def an_error_leaves_the_next_step_intact():
    """After step() raised on every rank (a NaN on one rank, too many backward passes, hyper-parameters
    changed on one rank, a parameter cast to float64 on one rank, and under blocksign finite
    gradients whose compensated vector overflows float32 on one rank, found before the ranks agree:
    in the step taken ahead, or in the bucket exchanged during backward with ``overlap=True``), the
    next step is a whole step: x = 0 − 0.1·1 exactly."""
    out = []
    for topology, compression, overlap in (("ps", "none", False), ("allreduce", "none", False),
                                           ("sharded", "none", False), ("ps", "blocksign", False),
                                           ("sharded", "blocksign", False), ("ps", "blocksign", True),
                                           ("sharded", "blocksign", True)):
        # under allreduce each rank steps with its own lr, as in Horovod: not a fault there
        for fault in ("nan", "passes", "float64") + (("lr",) if topology != "allreduce" else ()) + \
                (("overflow",) if compression == "blocksign" else ()):
            p = torch.nn.Parameter(torch.zeros(4))
            opt = hvd_distef.DistributedOptimizer(torch.optim.SGD([p], lr=0.1), named_parameters=[("p", p)],
                                                  compression=compression, topology=topology, nonfinite="raise",
                                                  overlap=overlap)
            p.grad = torch.ones(4)
            if fault == "nan" and RANK == 1:
                p.grad[0] = float("nan")
            if fault == "passes":
                for _ in range(2):
                    (p * 1.0).sum().backward()
            if fault == "lr" and RANK == 1:
                opt.param_groups[0]["lr"] = 0.2
            if fault == "float64" and RANK == 1:
                p.data = p.data.double()
                p.grad = torch.ones(4, dtype=torch.float64)
            if fault == "overflow":  # d = g + 0.9·(0.9·0 + g) is inf for g = 3e38
                opt.param_groups[0].update(momentum=0.9, nesterov=True)
                p.grad = None  # from backward, so that overlap=True exchanges the bucket during it
                (p * (3e38 if RANK == 1 else 1.0)).sum().backward()
            try:
                opt.step()
            except (ValueError, hvd_distef.HvdDistefError) as exc:
                assert "rank 1" in str(exc) or fault == "passes" or RANK == 1, (fault, str(exc))
                assert fault != "overflow" or "overflowed float32" in str(exc), str(exc)
            else:
                raise AssertionError(f"{topology}, {fault}: no error")
            assert torch.equal(p.detach().float(), torch.zeros(4)), (topology, fault)
            opt.param_groups[0].update(lr=0.1, momentum=0.0, nesterov=False)
            p.data = p.data.float()
            opt.zero_grad()
            p.grad = torch.ones(4)
            opt.step()
            assert torch.equal(p.detach(), torch.full((4,), -0.1)), (topology, fault, p)
            assert opt.comm_stats()["steps"] == 1
        out.append(f"{topology}+{compression}{' overlapped' if overlap else ''}")
    return "whole next step: " + ", ".join(out)


def gradient_clipping_recipe():
    """Horovod's recipe: synchronize(); clip_grad_norm_(); with skip_synchronize(): step(). Under
    `allreduce`: bit for bit stock Horovod. Under `ps`: p.grad holds Δ̃ (identical on every rank)
    and the step applies the clipped Δ̃: x − lr·clip(Δ̃) exactly (μ = 0, λ = 0)."""
    results = []
    for flavour in ("stock", "allreduce", "ps"):
        model = make_model()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = (hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters()) if flavour == "stock"
               else wrap(model, sgd, compression="none" if flavour == "allreduce" else "blocksign", topology=flavour))
        for t in range(3):
            opt.zero_grad()
            loss_of(model, RANK, t).backward()
            opt.synchronize()
            assert_identical_across_ranks([p.grad for p in model.parameters()], "p.grad after synchronize")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            expect = [p.detach() - torch.mul(p.grad, 0.1) for p in model.parameters()]
            with opt.skip_synchronize():
                opt.step()
            if flavour == "ps":
                assert all(torch.equal(e, p) for e, p in zip(expect, model.parameters()))
        results.append(flat(model.parameters()))
    assert torch.equal(results[0], results[1]), "allreduce differs from stock Horovod"
    return "ok"


#: the two cases below compare the compiled kernels' way with the torch path's: without the extension
#: they would compare the torch path with itself (tests/test_parity.py skips them where it is forced off)
NEEDS_COMPILED = f"cpp_ops did not load ({_kernels.import_error}): nothing to compare the torch path with"


def update_decompressing_payloads_equals_decompressed_update():
    """Δ̃ left compressed and decompressed slice by slice inside the update (a plain step() on the
    CPU) against Δ̃ decompressed in full (synchronize(), then step() reads it back from p.grad): bit
    for bit on every error-feedback topology, blocks of 5 cut across parameters and param groups."""
    assert _kernels.compiled is not None, NEEDS_COMPILED
    for topology in ("ps", "sharded", "ring", "tree"):
        finals = []
        for exposed in (False, True):
            model = make_model()
            opt = wrap(model, sgd_two_groups(model), compression=hvd_distef.Compression.blocksign(block_size=5),
                       topology=topology)
            assert opt.rule.fused_update, "a plain step() on the CPU decompresses Δ̃ in full"
            for t in range(3):
                opt.zero_grad()
                loss_of(model, RANK, t).backward()
                if exposed:
                    opt.synchronize()
                with opt.skip_synchronize() if exposed else contextlib.nullcontext():
                    opt.step()
            finals.append(flat(model.parameters()))
        assert torch.equal(finals[0], finals[1]), f"{topology}: the update that decompresses Δ̃ itself differs"
    return "bitwise equal"


def worker_step_ahead_equals_the_two_passes():
    """The worker's momentum and error step taken in one pass before the ranks agree (the default on
    the CPU with the compiled kernels) against the two passes after the agreement: bit for bit on
    every error-feedback topology and two param groups, through a step with a parameter no rank
    has a gradient for (redone in two passes), one that only rank 0 has, a NaN on the last rank
    (skipped), and an lr change (the error rescale) in a step after synchronize()."""
    assert _kernels.compiled is not None, NEEDS_COMPILED
    for topology in ("ps", "sharded", "ring", "tree"):
        for compression in (hvd_distef.Compression.blocksign(block_size=5), hvd_distef.Compression.blocksign()):
            finals = []
            for ahead in (True, False):
                model = Frozen()
                groups = [{"params": [model.head.weight, model.sometimes.weight], "lr": 0.1},
                          {"params": [model.head.bias, model.sometimes.bias, model.rank0_only.weight,
                                      model.rank0_only.bias], "lr": 0.05, "momentum": 0.5, "nesterov": False}]
                opt = wrap(model, torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
                           compression=compression, topology=topology, nonfinite="skip")
                assert opt.rule.steps_ahead, "the worker step is not taken ahead on the CPU"
                opt.rule.steps_ahead = ahead
                for t in range(7):
                    opt.zero_grad()
                    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(7 * t + RANK))
                    torch.nn.functional.cross_entropy(model(x, t), torch.arange(16) % 3).backward()
                    if t == 2 and RANK == M - 1:
                        model.head.weight.grad[0, 0] = float("nan")
                    if t == 4:
                        opt.param_groups[0]["lr"] = 0.03
                    if t == 4:
                        opt.synchronize()
                    with opt.skip_synchronize() if t == 4 else contextlib.nullcontext():
                        opt.step()
                assert opt.comm_stats()["skipped_steps"] == 1
                finals.append((flat(model.parameters()), _state(opt)))
            (x_ahead, state_ahead), (x_apart, state_apart) = finals
            name = f"{topology}+blocksign({compression.block_size})"
            assert torch.equal(x_ahead, x_apart), f"{name}: the step taken ahead moved the parameters otherwise"
            for key in state_apart:
                assert torch.equal(state_ahead[key], state_apart[key]), f"{name}: {key} differs"
    return "bitwise equal"


def synchronize_then_step_warns_once():
    for topology, compression in (("allreduce", "none"), ("ps", "blocksign")):
        model = make_model()
        opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression=compression, topology=topology)
        opt.zero_grad()
        loss_of(model, RANK, 0).backward()
        opt.synchronize()
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            opt.step()
        assert len(ws) == 1 and "optimizer.step() called without optimizer.skip_synchronize()" in str(ws[0].message)
        assert opt.comm_stats()["steps"] == 1
    return "one warning"


def horovod_arguments_accepted_or_refused():
    model = make_model()
    for compression in (hvd.Compression.none, hvd.Compression.fp16):
        for topology in ("allreduce", "ps"):
            opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                  named_parameters=model.named_parameters(), compression=compression,
                                                  op=hvd.Average, gradient_predivide_factor=1.0, num_groups=2,
                                                  sparse_as_dense=True, topology=topology)
            assert opt.compressor.name == {hvd.Compression.none: "none", hvd.Compression.fp16: "fp16"}[compression]
    try:
        hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)
    except ValueError as exc:
        assert "Adasum" in str(exc)
    else:
        raise AssertionError("op=hvd.Adasum accepted")
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.set_backward_passes_per_step(2)
    assert opt.backward_passes_per_step == 2
    names = opt._parameter_names
    assert len(set(names.values())) == len(names)
    return "ok"


def predivide_and_sum_under_allreduce_equal_stock_horovod():
    out = []
    for kw in ({"gradient_predivide_factor": 2.0}, {"op": hvd.Sum}):
        runs = []
        for ours in (True, False):
            model = make_model()
            sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            opt = (wrap(model, sgd, compression="none", topology="allreduce", **kw) if ours
                   else hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), **kw))
            for t in range(3):
                opt.zero_grad()
                loss_of(model, RANK, t).backward()
                opt.step()
            runs.append(flat(model.parameters()))
        assert torch.equal(runs[0], runs[1]), kw
        out.append(str(kw))
    return "bitwise equal: " + ", ".join(out)


def sparse_gradients_are_densified():
    """nn.Embedding(sparse=True) trains exactly as its dense twin (Horovod's sparse_as_dense)."""
    for topology, compression in (("ps", "blocksign"), ("allreduce", "none")):
        runs = []
        for sparse in (True, False):
            torch.manual_seed(0)
            emb = torch.nn.Embedding(10, 3, sparse=sparse)
            opt = wrap(emb, torch.optim.SGD(emb.parameters(), lr=0.1), compression=compression, topology=topology)
            for t in range(3):
                opt.zero_grad()
                emb(torch.tensor([[1, 2, 4], [4, 3, RANK]])).sum().backward()
                opt.step()
            runs.append(emb.weight.detach().clone())
        assert torch.equal(runs[0], runs[1]), topology
    return "equal to dense"


def step_hooks_run_once_per_step():
    for topology, compression in (("allreduce", "none"), ("ps", "blocksign")):
        model = make_model()
        opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression=compression, topology=topology)
        calls = []
        opt.register_step_pre_hook(lambda *a: calls.append("pre"))
        opt.register_step_post_hook(lambda *a: calls.append("post"))
        for t in range(3):
            opt.zero_grad()
            loss_of(model, RANK, t).backward()
            opt.step()
        assert calls == ["pre", "post"] * 3, (topology, calls)
    return "once"


def many_optimizers_share_one_communicator():
    from hvd_distef import comm as comm_module
    threads, duplicates = threading.active_count(), comm_module.PROCESS.duplicates
    for _ in range(20):
        model = make_model()
        wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression="blocksign", topology="ps")
    assert threading.active_count() == threads, threading.enumerate()  # no thread per optimizer
    added = comm_module.PROCESS.duplicates - duplicates
    assert added <= 1, added  # COMM_WORLD's, where no earlier optimizer made it (overlap=True ones get their own)
    return "no thread, one duplicate"


class Scaled(hvd_distef.Compressor):
    """A user compressor with arbitrary attributes (a tensor, a function, a dict)."""

    name = "test_scaled_identity"

    def __init__(self):
        self.weights = torch.arange(3.0)
        self.transform = lambda x: x
        self.options = {"a": 1, "b": [1, 2]}

    def layout(self, numel, block_sizes):
        return (("values", torch.float32, numel),)

    def compress(self, x, block_sizes=None):
        return hvd_distef.Payload(x.numel(), block_sizes or (x.numel(),), {"values": self.transform(x).clone()})

    def decompress(self, payload):
        return payload["values"]


def user_compressor_with_arbitrary_attributes():
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression=Scaled(), topology="ps")
    for t in range(2):
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        opt.step()
    assert_identical_across_ranks(model.parameters())
    return repr(opt.compressor)


CASES = {f.__name__: f for f in [
    frozen_and_gradless_parameters_untouched_every_way, frozen_parameters_under_allreduce_equal_stock_horovod,
    step_with_no_gradients_changes_nothing, param_groups_are_shared, hyperparameters_change_at_run_time,
    zero_lr_keeps_errors_and_rescales_by_last_nonzero, broadcast_optimizer_state_takes_no_step,
    grad_scaler_skips_on_every_rank, horovod_amp_recipe_skips_alike, stock_checkpoint_resumes_under_allreduce,
    fp16_on_the_wire_stays_finite, ranks_that_disagree_raise_on_every_rank,
    rejected_checkpoint_changes_nothing, an_error_leaves_the_next_step_intact, comm_subset_restricts_allreduce, gradient_clipping_recipe,
    update_decompressing_payloads_equals_decompressed_update, worker_step_ahead_equals_the_two_passes,
    synchronize_then_step_warns_once,
    horovod_arguments_accepted_or_refused, predivide_and_sum_under_allreduce_equal_stock_horovod,
    sparse_gradients_are_densified, step_hooks_run_once_per_step,
    many_optimizers_share_one_communicator, user_compressor_with_arbitrary_attributes]}

if __name__ == "__main__":
    run(CASES)
