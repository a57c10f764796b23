"""Training patterns users write beyond one model and one optimizer (issue 22): two optimizers with
overlap in one loop (a GAN), gradients set by hand with a first batch masked out on one rank, a
``torch.optim.SGD`` subclass with its own ``step()``, a backward pass on one rank only under overlap,
options aligned by ``hvd.broadcast_optimizer_state``, one checkpoint file for the job. Each case is bit
for bit its plain counterpart or an error on every rank. Run under mpirun with 2 and 3 ranks by
tests/test_patterns.py."""
import os
import tempfile

import horovod.torch as hvd
import torch

from check_overlap import CAP_MB, EVERY_TOPOLOGY
from common import COMM, assert_identical_across_ranks, flat, loss_of, make_model, train_step, wrap
from harness import run

import hvd_distef

RANK, M = COMM.rank, COMM.size


def _gan(overlap, topology, compression, steps=4):
    """A discriminator D and a generator G, each wrapped, stepped in turn as DCGAN's loop does: G's backward
    runs through D (D's gradients too, which the next D step drops), so D's buckets are in flight while G
    steps."""
    torch.manual_seed(1)
    gen, disc = torch.nn.Linear(4, 6), torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                                           torch.nn.Linear(8, 1))
    opts = [wrap(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 compression=compression, topology=topology, overlap=overlap,
                 # ring's chunks follow the buckets: with several, its partial sums run in another order
                 bucket_cap_mb=25.0 if topology == "ring" else CAP_MB)
            for m in (disc, gen)]
    opt_d, opt_g = opts
    for t in range(steps):
        noise = torch.Generator().manual_seed(11 * t + RANK)
        z, real = torch.randn(8, 4, generator=noise), torch.randn(8, 6, generator=noise) + 1
        disc.zero_grad()  # the module's, as DCGAN's loop: D's gradients from G's pass below are dropped
        loss_d = disc(real).mean() - disc(gen(z).detach()).mean()
        loss_d.backward()
        opt_d.step()
        gen.zero_grad()
        disc(gen(z)).mean().backward()  # D's buckets go out here too, while G steps below
        opt_g.step()
    return flat(list(disc.parameters()) + list(gen.parameters()))


def two_optimizers_with_overlap_equal_the_plain_loop():
    for topology, compression in EVERY_TOPOLOGY:
        plain, overlapped = _gan(False, topology, compression), _gan(True, topology, compression)
        assert torch.equal(plain, overlapped), f"{topology}/{compression}: overlap changed the GAN loop"
        assert_identical_across_ranks([overlapped], topology)
    return f"{len(EVERY_TOPOLOGY)} topologies bit-identical"


def _by_hand(hand, topology, compression, overlap):
    """Gradients from torch.autograd.grad set into p.grad (functorch, opacus), or from backward(); rank
    1's first batch masked out (all-zero gradients)."""
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
               compression=compression, topology=topology, overlap=overlap, bucket_cap_mb=CAP_MB)
    for t in range(3):
        opt.zero_grad()
        loss = loss_of(model, RANK, t) * (0.0 if (t == 0 and RANK == 1) else 1.0)
        if hand:
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                p.grad = g
        else:
            loss.backward()
        opt.step()
    assert opt.comm_stats()["steps"] == 3, opt.comm_stats()
    return flat(model.parameters())


def gradients_set_by_hand_with_a_masked_first_batch():
    for topology, compression in EVERY_TOPOLOGY:
        for overlap in (False, True):
            hand, backward = (_by_hand(h, topology, compression, overlap) for h in (True, False))
            assert torch.equal(hand, backward), f"{topology}/{compression} overlap={overlap}"
            assert_identical_across_ranks([hand], f"{topology} overlap={overlap}")
    return "bit-identical to backward() on every topology"


class Clipped(torch.optim.SGD):
    """SGD that clips after its own update: its step would never run inside the wrapper."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.clamp_(-1, 1)
        return loss


class Renamed(torch.optim.SGD):
    """A subclass that keeps SGD's step: accepted."""


def sgd_subclass_with_its_own_step_is_refused():
    model = make_model()
    wrap(model, Renamed(model.parameters(), lr=0.1), topology="ps")
    try:
        wrap(model, Clipped(model.parameters(), lr=0.1), topology="ps")
    except TypeError as exc:
        assert "Clipped overrides torch.optim.SGD.step" in str(exc), str(exc)
        return str(exc)
    raise AssertionError("a subclass with its own step() was accepted")


def _state(model, opt):
    """Parameters, then this rank's momentum, worker error and weight-decay buffer where the rule keeps them."""
    distef = opt.state_dict()["distef"]
    return [flat(model.parameters())] + [distef[k] for k in ("momentum", "worker_error", "weight_decay_buffer")
                                         if torch.is_tensor(distef.get(k))]


def _equal(a, b, what):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), what


def _diagnosed(topology, compression, fault, steps=4):
    """Overlapped training; with ``fault``, rank 0 alone runs a backward pass on a held-out batch before
    step 2 (a diagnostic gradient norm), then zero_grad(), and every rank then allreduces a metric with
    Horovod before the step (its bucket exchanges are still unpaired then). A step that raises is taken
    again."""
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
               compression=compression, topology=topology, overlap=True, bucket_cap_mb=CAP_MB)
    errors = []
    for t in range(steps):
        before = [x.clone() for x in _state(model, opt)]
        if fault and t == 2 and RANK == 0:
            loss_of(model, 1000, t).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            opt.zero_grad()
        if t == 2:
            hvd.allreduce(torch.ones(1), name=f"metric.{topology}.{fault}")
        for attempt in range(2):
            opt.zero_grad()
            loss_of(model, RANK, t).backward()
            try:
                opt.step()
                break
            except hvd_distef.HvdDistefError as exc:
                errors.append((t, attempt, str(exc)))
                _equal(before, _state(model, opt), f"{topology}: the failed step changed the state")
    return _state(model, opt), errors


def backward_on_one_rank_under_overlap_is_an_error_on_every_rank():
    """Rank 0's extra backward pairs its buckets with the other ranks' real ones: its zero_grad() neither
    raises there alone nor waits for them (an evaluation's allreduce comes first); the step raises
    HvdDistefError on every rank naming rank 0, changes nothing, and the step taken again gives exactly
    the run without the extra pass (every topology)."""
    hvd.init()
    for topology, compression in EVERY_TOPOLOGY:
        clean, none = _diagnosed(topology, compression, fault=False)
        faulty, errors = _diagnosed(topology, compression, fault=True)
        assert none == [] and [(t, a) for t, a, _ in errors] == [(2, 0)], f"{topology}: {errors}"
        assert "on rank(s) 0 only" in errors[0][2] and "torch.autograd.grad" in errors[0][2], errors[0][2]
        _equal(clean, faulty, f"{topology}: the run after the error differs from the clean run")
        assert_identical_across_ranks([faulty[0]], topology)
    return errors[0][2]


#: rank 0's options, and the other ranks' (Horovod's test_broadcast_state_options, for SGD)
OPTIONS = [dict(lr=0.1, momentum=0.8, weight_decay=0.2, nesterov=True),
           dict(lr=0.2, momentum=0.9, weight_decay=0.1, nesterov=False)]


def _with_options(topology, compression, options, broadcast, steps=3):
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), **options), compression=compression, topology=topology)
    if broadcast:
        hvd.broadcast_optimizer_state(opt, root_rank=0)
    for t in range(steps):
        opt.zero_grad()
        loss_of(model, RANK, t).backward()
        opt.step()
    return model, opt


def options_are_aligned_by_broadcast_or_refused_at_the_step():
    """Ranks built with different options (Horovod's test_broadcast_state_options): after
    hvd.broadcast_optimizer_state every rank has rank 0's and trains bit for bit as ranks built alike;
    without it, a step under error feedback or signum raises ValueError on every rank naming each rank's
    values, and under allreduce each rank steps with its own, as stock Horovod does (bit for bit)."""
    hvd.init()
    mine = OPTIONS[min(RANK, 1)]
    for topology, compression in EVERY_TOPOLOGY:
        model, opt = _with_options(topology, compression, mine, broadcast=True)
        assert {k: opt.param_groups[0][k] for k in OPTIONS[0]} == OPTIONS[0], opt.param_groups[0]
        alike, _ = _with_options(topology, compression, OPTIONS[0], broadcast=False)
        assert torch.equal(flat(model.parameters()), flat(alike.parameters())), topology
        if topology == "allreduce":
            ours, _ = _with_options(topology, compression, mine, broadcast=False)
            stock = make_model()
            stock_opt = hvd.DistributedOptimizer(torch.optim.SGD(stock.parameters(), **mine),
                                                 named_parameters=stock.named_parameters())
            for t in range(3):
                stock_opt.zero_grad()
                loss_of(stock, RANK, t).backward()
                stock_opt.step()
            assert torch.equal(flat(ours.parameters()), flat(stock.parameters())), "allreduce: not stock Horovod's"
            continue
        try:
            _with_options(topology, compression, mine, broadcast=False)
        except ValueError as exc:
            assert "ranks disagree on the hyper-parameters" in str(exc) and "'lr': 0.2" in str(exc), str(exc)
            message = str(exc)
            continue
        raise AssertionError(f"{topology}: ranks with different options stepped")
    return message


def _resumed(topology, compression, save, load_on_every_rank=True):
    """Two steps, a checkpoint (``save(opt)`` gives what rank 0 writes), a fresh model and optimizer that
    load it, two more steps; returns the state at the end."""
    model = make_model()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
               compression=compression, topology=topology)
    for t in range(2):
        train_step(model, opt, RANK, t)
    path = os.path.join(COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None), "job.pt")
    state = save(opt)
    if RANK == 0:
        torch.save({"model": model.state_dict(), "optimizer": state}, path)
    COMM.Barrier()
    model = make_model(seed=5)
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
               compression=compression, topology=topology)
    checkpoint = torch.load(path, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    for t in range(2, 4):
        train_step(model, opt, RANK, t)
    return _state(model, opt)


def one_checkpoint_file_for_the_job():
    """torch DDP's recipe (rank 0 saves, every rank loads the file): with opt.gathered_state_dict() every
    rank takes its own part and the run equals the uninterrupted one bit for bit, every topology; with
    rank 0's own state_dict() it does under allreduce, and under error feedback the next step raises on
    every rank, saying what to do."""
    message = None
    for topology, compression in EVERY_TOPOLOGY:
        model = make_model()
        opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
                   compression=compression, topology=topology)
        for t in range(4):
            train_step(model, opt, RANK, t)
        whole = _state(model, opt)
        _equal(whole, _resumed(topology, compression, lambda o: o.gathered_state_dict()), f"{topology}: gathered")
        try:
            resumed = _resumed(topology, compression, lambda o: o.state_dict())
        except hvd_distef.HvdDistefError as exc:
            assert topology != "allreduce" and "loaded the state dict of rank 0" in str(exc), str(exc)
            assert "gathered_state_dict()" in str(exc), str(exc)
            message = str(exc)
            continue
        assert topology == "allreduce", f"{topology}: rank 0's state dict was taken by every rank"
        _equal(whole, resumed, "allreduce: rank 0's file")
    return message


CASES = {f.__name__: f for f in [two_optimizers_with_overlap_equal_the_plain_loop,
                                 gradients_set_by_hand_with_a_masked_first_batch,
                                 sgd_subclass_with_its_own_step_is_refused,
                                 backward_on_one_rank_under_overlap_is_an_error_on_every_rank,
                                 options_are_aligned_by_broadcast_or_refused_at_the_step,
                                 one_checkpoint_file_for_the_job]}

if __name__ == "__main__":
    run(CASES)
