"""Fault cases that end cleanly on every rank (run under mpirun with 3 ranks by tests/test_faults.py)."""
import copy

import torch

from common import COMM, assert_identical_across_ranks, flat, loss_of, make_model, sgd_two_groups, train_step, wrap
from harness import run

import hvd_distef

RANK, M = COMM.rank, COMM.size


def _snapshot(model, opt):
    return flat(model.parameters()).clone(), dict(copy.deepcopy(opt.state_dict()["distef"]),
                                                  prev_lrs=[g["prev_lr"] for g in opt.param_groups])


def _same_state(a, b):
    for key in ("momentum", "worker_error", "weight_decay_buffer"):
        assert torch.equal(a[key], b[key]), key
    assert a["prev_lrs"] == b["prev_lrs"] and a["steps"] == b["steps"]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a["topology"], b["topology"]) for k in x)


def _nan_step(model, opt, step):
    opt.zero_grad()
    loss_of(model, RANK, step).backward()
    if RANK == 1:
        model[2].weight.grad[0, 0] = float("nan")
    opt.step()


def nan_gradient_raises_on_every_rank_and_changes_nothing():
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps")
    for t in range(2):
        train_step(model, opt, RANK, t)
    before = _snapshot(model, opt)
    try:
        _nan_step(model, opt, 2)
    except hvd_distef.NonFiniteGradientError as exc:
        assert "rank 1: 2.weight" in str(exc), str(exc)
        after = _snapshot(model, opt)
        assert torch.equal(before[0], after[0])
        _same_state(before[1], after[1])
        return str(exc)
    raise AssertionError("no error for a NaN gradient")


def nan_gradient_skip_counts_and_continues():
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps", nonfinite="skip")
    train_step(model, opt, RANK, 0)
    before = _snapshot(model, opt)
    _nan_step(model, opt, 1)
    after = _snapshot(model, opt)
    assert torch.equal(before[0], after[0])
    _same_state(before[1], after[1])
    assert opt.comm_stats()["skipped_steps"] == 1 and opt.comm_stats()["steps"] == 1
    train_step(model, opt, RANK, 2)
    assert_identical_across_ranks(model.parameters())
    assert opt.comm_stats()["steps"] == 2
    return "skipped 1, continued"


def _expect_disagreement(build, *words):
    try:
        build()
    except ValueError as exc:
        for w in words:
            assert w in str(exc), (w, str(exc))
        return str(exc)
    raise AssertionError("ranks that disagree were not detected")


def ranks_with_different_models():
    def build():
        model = make_model() if RANK != 1 else torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                                                                    torch.nn.Linear(9, 3))
        wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression="blocksign", topology="ps")
    return _expect_disagreement(build, "ranks disagree", "parameters", "rank 1=")


def ranks_with_different_options():
    def build():
        model = make_model()
        wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), compression="blocksign",
             topology="sharded" if RANK == 2 else "ps")
    return _expect_disagreement(build, "topology", "rank 2='sharded'")


def gradient_none_on_one_rank_counts_as_zero():
    """Rank 1 has no gradient for the last bias; the same as a zero gradient, no mismatch, no hang."""
    runs = []
    for as_none in (True, False):
        model = make_model()
        opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps")
        for t in range(3):
            opt.zero_grad()
            loss_of(model, RANK, t).backward()
            if RANK == 1:
                if as_none:
                    model[2].bias.grad = None
                else:
                    model[2].bias.grad.zero_()
            opt.step()
        assert_identical_across_ranks(model.parameters())
        runs.append(flat(model.parameters()))
    assert torch.equal(runs[0], runs[1])
    return "None == zeros"


def checkpoint_from_another_configuration():
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps")
    train_step(model, opt, RANK, 0)
    state = opt.state_dict()
    other = wrap(model, sgd_two_groups(model), compression=hvd_distef.Compression.topk(ratio=0.5), topology="ps")
    try:
        other.load_state_dict(state)
    except ValueError as exc:
        assert "compression: checkpoint 'blocksign', this run 'topk'" in str(exc), str(exc)
        assert torch.count_nonzero(other.state_dict()["distef"]["worker_error"]) == 0  # untouched
        return str(exc)
    raise AssertionError("a blocksign checkpoint loaded into a topk optimizer")


def local_failure_on_one_rank_reaches_every_rank():
    """Rank 1 accumulates two backward passes with backward_passes_per_step=1: it raises its own
    error and the others name rank 1, instead of waiting in the exchange."""
    model = make_model()
    opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps")
    opt.zero_grad()
    for k in range(2 if RANK == 1 else 1):
        loss_of(model, RANK, k).backward()
    try:
        opt.step()
    except ValueError as exc:
        assert RANK == 1 and "backward_passes_per_step=1" in str(exc)
        return str(exc)
    except hvd_distef.HvdDistefError as exc:
        assert RANK != 1 and "rank 1: ValueError" in str(exc), str(exc)
        return str(exc)
    raise AssertionError("no error")


CASES = {f.__name__: f for f in [local_failure_on_one_rank_reaches_every_rank,
    nan_gradient_raises_on_every_rank_and_changes_nothing, nan_gradient_skip_counts_and_continues,
    ranks_with_different_models, ranks_with_different_options, gradient_none_on_one_rank_counts_as_zero,
    checkpoint_from_another_configuration]}

if __name__ == "__main__":
    run(CASES)
