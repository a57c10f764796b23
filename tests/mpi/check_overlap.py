"""Overlap (issue 12 item 1, hvd_distef/buckets.py): buckets exchanged during backward give exactly
the step of ``overlap=False`` on every topology, also where the step must redo them or leave
everything as it was. Run under mpirun with 2 and 3 ranks by tests/test_overlap.py."""
import threading
import time

import torch

from common import COMM, flat, roundtrip, wrap
from harness import run
from check_parity import Frozen

import hvd_distef

RANK, M = COMM.rank, COMM.size
CAP_MB = 0.0001  # 26 floats: the Frozen model gets 5 buckets
#: every topology, with blocks that never span tensors (then overlap is bit-identical)
EVERY_TOPOLOGY = [("ps", "blocksign"), ("ps", hvd_distef.Compression.blocksign(block_size=5)),
                  ("sharded", "blocksign"), ("tree", "blocksign"), ("ring", "blocksign"),
                  ("allgather", "blocksign"), ("ps", "fp16"), ("majority_vote", "sign"), ("allreduce", "none"),
                  ("hierarchical", "blocksign")]


def _batch(t):
    gen = torch.Generator().manual_seed(7 * t + RANK)
    return torch.randn(16, 6, generator=gen), torch.arange(16) % 3


def _train(overlap, topology, compression, steps=5, passes=1, between=None, scaler=None, model=None, opt=None,
           start=0):
    """Train the Frozen model (frozen layers, a layer idle on odd steps, one only rank 0 uses);
    ``between(opt, model, t)`` runs after backward and before step()."""
    model = model or Frozen()
    opt = opt or wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                             weight_decay=1e-2),
                      compression=compression, topology=topology, backward_passes_per_step=passes,
                      overlap=overlap, bucket_cap_mb=CAP_MB)
    for t in range(start, start + steps):
        opt.sent_before_step = opt.comm.bytes_sent
        opt.zero_grad()
        for k in range(passes):
            x, y = _batch(10 * t + k)
            loss = torch.nn.functional.cross_entropy(model(x, t), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
        if between is not None:
            between(opt, model, t)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return model, opt


def _state(model, opt):
    """Parameters, momentum, worker error and the server errors (of every bucket, in the fused
    order; not where each rank holds a shard of each bucket: those lie per bucket), as flat tensors."""
    distef = opt.state_dict()["distef"]
    parts = [flat(model.parameters())]
    parts += [distef[k] for k in ("momentum", "worker_error", "weight_decay_buffer") if distef[k] is not None]
    servers = [t["server_error"] for _, t in sorted(zip(opt.buckets, distef["topology"]), key=lambda bt: bt[0].start)
               if "server_error" in t and opt.config()["topology"] not in ("sharded", "ring", "hierarchical")]
    return parts + ([torch.cat(servers)] if servers else [])


def _equal(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: part {i} differs by {(x - y).abs().max().item():.3g}"


def overlap_equals_the_fused_step_every_topology():
    """Bit for bit, with frozen, idle and one-rank-only parameters and two backward passes per step
    (``ring`` at 2 ranks only)."""
    done = []
    for topology, compression in EVERY_TOPOLOGY:
        if topology == "ring" and M > 2:
            continue  # each bucket's ring starts its chunks at other ranks: other sums to recompress (README)
        for passes in (1, 2):
            fused_model, fused = _train(False, topology, compression, passes=passes)
            model, opt = _train(True, topology, compression, passes=passes)
            assert len(opt.buckets) >= 3 and len(fused.buckets) == 1, len(opt.buckets)
            _equal(_state(fused_model, fused), _state(model, opt), f"{topology}, {passes} passes")
            stats = opt.comm_stats()
            # odd steps have an idle layer (redone without overlap semantics' help); even steps keep the work
            assert stats["redone_steps"] == (2 if topology != "allreduce" else 0), stats
        done.append(f"{topology}+{getattr(compression, 'name', compression)}: {len(opt.buckets)} buckets")
    return "; ".join(done)


class Plain(torch.nn.Module):
    """Every parameter has a gradient on every rank (every bucket completes during backward)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x, step):
        return self.layers(x)


def _wait_for_first_bucket(opt, seconds=60):
    """Until this step's first bucket has left (the change that follows comes after it was read)."""
    if not opt.overlap:
        return
    sent = opt.sent_before_step
    deadline = time.monotonic() + seconds
    while opt.comm.bytes_sent == sent and time.monotonic() < deadline:
        time.sleep(0.001)


def changes_after_backward_are_redone():
    """lr set after backward, gradients clipped in place, GradScaler.unscale_: the step redoes the
    buckets with what it has, bit for bit as without overlap."""
    def set_lr(opt, model, t):
        _wait_for_first_bucket(opt)
        for g in opt.param_groups:
            g["lr"] = 0.1 / (t + 2)

    def clip(opt, model, t):
        _wait_for_first_bucket(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)

    out = []
    for name, between in (("lr", set_lr), ("clip", clip)):
        for topology, compression in (("ps", "blocksign"), ("sharded", "blocksign"), ("majority_vote", "sign")):
            a = _train(False, topology, compression, between=between, model=Plain())
            b = _train(True, topology, compression, between=between, model=Plain())
            _equal(_state(*a), _state(*b), f"{name}/{topology}")
            assert b[1].comm_stats()["redone_steps"] == 5, b[1].comm_stats()
        out.append(name)
    return ", ".join(out)


def grad_scaler_under_overlap():
    """AMP: the first step and every change of the loss scale redo; an inf on one rank skips the
    step on every rank and changes nothing; results equal the fused step's."""
    def inf_on_rank1(opt, model, t):
        if t == 2 and RANK == 1:
            model.head.weight.grad[0, 0] = float("inf")

    runs = []
    for overlap in (False, True):
        scaler = hvd_distef.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        runs.append(_train(overlap, "ps", "blocksign", steps=6, between=inf_on_rank1, scaler=scaler) + (scaler,))
    (fm, fo, fs), (m, o, s) = runs
    _equal(_state(fm, fo), _state(m, o), "amp")
    assert fs.get_scale() == s.get_scale() and o.comm_stats()["skipped_steps"] == 1 == fo.comm_stats()["skipped_steps"]
    return f"scale {s.get_scale()}, redone {o.comm_stats()['redone_steps']} of 6"


def nonfinite_gradient_raises_and_changes_nothing():
    """A NaN on rank 1 under overlap: every rank raises before anything changes, then trains on as
    a twin that never saw that step."""
    for topology in ("ps", "sharded", "ring"):
        model, opt = _train(True, topology, "blocksign", steps=2)
        twin_model, twin = _train(True, topology, "blocksign", steps=2)
        before = [t.clone() for t in _state(model, opt)]
        opt.zero_grad()
        x, y = _batch(99)
        loss = torch.nn.functional.cross_entropy(model(x, 2), y) * (float("nan") if RANK == 1 else 1.0)
        loss.backward()
        try:
            opt.step()
            raise AssertionError("no NonFiniteGradientError")
        except hvd_distef.NonFiniteGradientError:
            pass
        _equal(before, _state(model, opt), f"{topology} after the NaN")
        _train(True, topology, "blocksign", steps=2, model=model, opt=opt, start=2)
        _train(True, topology, "blocksign", steps=2, model=twin_model, opt=twin, start=2)
        _equal(_state(twin_model, twin), _state(model, opt), f"{topology} after")
    return "ok"


def zero_grad_between_backward_and_step_on_every_rank_redoes_the_step():
    """Every rank drops a backward pass with zero_grad() (its buckets went out): the next step puts the
    pass's changes back, and after a second backward equals overlap=False's, bit for bit, every topology."""
    done = []
    for topology, compression in EVERY_TOPOLOGY:
        if topology == "ring" and M > 2:
            continue  # several buckets (README)
        model, opt = _train(True, topology, compression, steps=2)
        twin_model, twin = _train(False, topology, compression, steps=2)
        x, y = _batch(5)
        torch.nn.functional.cross_entropy(model(x, 0), y).backward()
        opt.zero_grad()
        _train(True, topology, compression, steps=2, model=model, opt=opt, start=2)
        _train(False, topology, compression, steps=2, model=twin_model, opt=twin, start=2)
        _equal(_state(twin_model, twin), _state(model, opt), f"{topology}: after")
        done.append(topology)
    return f"bit-identical to overlap=False: {', '.join(done)}"


class _WaitForBytes(torch.autograd.Function):
    """Identity whose backward waits until ``opt`` has sent bytes this step (at most 60 s)."""

    @staticmethod
    def forward(ctx, x, opt, sent):
        ctx.opt, ctx.sent = opt, sent
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        deadline = time.monotonic() + 60
        while ctx.opt.comm.bytes_sent == ctx.sent and time.monotonic() < deadline:
            time.sleep(0.001)
        ctx.opt.seen_during_backward = ctx.opt.comm.bytes_sent > ctx.sent
        return grad, None, None


def buckets_go_out_during_backward():
    """The last layers' bucket is on the wire before backward reaches the first layer."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(6, 64), torch.nn.Linear(64, 3)
    model = torch.nn.Sequential(first, last)
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), topology="ps", overlap=True,
               bucket_cap_mb=0.0008)  # 209 floats: the last layer, then the first
    assert len(opt.buckets) == 3 and opt.buckets[0].first == 2, opt.buckets
    for t in range(3):
        opt.zero_grad()
        x, y = _batch(t)
        hidden = _WaitForBytes.apply(first(x), opt, opt.comm.bytes_sent)
        torch.nn.functional.cross_entropy(last(torch.tanh(hidden)), y).backward()
        assert opt.seen_during_backward, f"step {t}: nothing was sent during backward"
        opt.step()
    assert opt.comm_stats()["redone_steps"] == 0
    return "ok"


def checkpoint_resumes_under_overlap():
    """Resuming equals the uninterrupted run; an overlap=False optimizer refuses the checkpoint."""
    full_model, full = _train(True, "sharded", "blocksign", steps=4)
    model, opt = _train(True, "sharded", "blocksign", steps=2)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model = Frozen()
    model.load_state_dict(saved["model"])
    _, opt = _train(True, "sharded", "blocksign", steps=0, model=model)
    opt.load_state_dict(saved["opt"])
    _train(True, "sharded", "blocksign", steps=2, model=model, opt=opt, start=2)
    _equal(_state(full_model, full), _state(model, opt), "resumed")
    _, plain = _train(False, "sharded", "blocksign", steps=0)
    try:
        plain.load_state_dict(saved["opt"])
        raise AssertionError("an overlap=False optimizer loaded an overlap=True checkpoint")
    except ValueError as exc:
        assert "overlap" in str(exc), exc
    return "ok"


def a_failure_on_one_rank_raises_everywhere_and_changes_nothing():
    """A frozen parameter given a gradient on rank 1 after its buckets went out: step() raises on
    every rank and every bucket's changes are put back."""
    model, opt = _train(True, "ps", "blocksign", steps=1)
    before = [t.clone() for t in _state(model, opt)]
    x, y = _batch(3)
    torch.nn.functional.cross_entropy(model(x, 0), y).backward()
    if RANK == 1:
        model.backbone.weight.grad = torch.ones_like(model.backbone.weight)
    try:
        opt.step()
        raise AssertionError("step() did not raise")
    except (ValueError, hvd_distef.HvdDistefError) as exc:
        assert "requires_grad=False" in str(exc) or "another rank" in str(exc), exc
    model.backbone.weight.grad = None
    _equal(before, _state(model, opt), "after the failure")
    threads = [t.name for t in threading.enumerate() if t.name == "hvd_distef-buckets"]
    assert not threads, threads
    return "ok"


CASES = {f.__name__: f for f in [
    overlap_equals_the_fused_step_every_topology, changes_after_backward_are_redone, grad_scaler_under_overlap,
    nonfinite_gradient_raises_and_changes_nothing, zero_grad_between_backward_and_step_on_every_rank_redoes_the_step,
    buckets_go_out_during_backward, checkpoint_resumes_under_overlap,
    a_failure_on_one_rank_raises_everywhere_and_changes_nothing]}

if __name__ == "__main__":
    run(CASES)
