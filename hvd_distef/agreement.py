"""Collective agreement checks (SPEC §5, §5a): every rank takes the same decision, or every rank
raises the same error naming the ranks concerned — never one rank raising while the others wait in
a collective.

- At construction: each rank's local validation error and its configuration are allgathered; a
  failure anywhere, or any difference in the model or the options, raises on every rank. The
  per-group hyper-parameters may still differ there (``hvd.broadcast_optimizer_state`` aligns them,
  as in Horovod): they are agreed at every step.
- At every step: one small allreduce (element-wise max of an int vector) carries a local failure
  flag, a non-finite flag, AMP's found_inf, a redo and a voided flag (``overlap``), a digest of the step's
  hyper-parameters (and its negation: max and min) and one has-a-gradient bit per parameter. The rare paths (a failure, a
  non-finite gradient, different hyper-parameters) then allgather the details for the message.
"""
from __future__ import annotations

import zlib
from typing import List, NamedTuple, Optional, Sequence

from .comm import Comm
from .errors import HvdDistefError, NonFiniteGradientError, on_every_rank


#: a rank whose buckets of a backward pass were exchanged, then dropped by ``zero_grad()`` before ``step()``
VOIDED = ("zero_grad() was called after loss.backward() but before step() with overlap=True, on rank(s) {ranks} "
          "only: the buckets of that backward pass were exchanged with the other ranks' buckets of this step. "
          "Every rank must run the same backward passes between two steps, as with Horovod and DDP: compute "
          "diagnostic gradients with torch.autograd.grad (it leaves p.grad and the buckets alone), run them on "
          "every rank, or use overlap=False. Nothing was updated")


def check_construction(comm: Comm, config: Optional[dict], failure: Optional[Exception]) -> None:
    """Raise on every rank when some rank failed its local validation or the ranks' ``config``
    differ; the message names each rank and what it had."""
    mine = (config, None if failure is None else f"{type(failure).__name__}: {failure}")
    everyone = comm.allgather_obj(mine)
    failures = [f"rank {r}: {msg}" for r, (_, msg) in enumerate(everyone) if msg]
    if failures:
        if failure is not None:
            raise on_every_rank(failure)
        raise on_every_rank(ValueError("hvd_distef.DistributedOptimizer could not be built on another rank ("
                                       + "; ".join(failures) + ")"))
    diffs = sorted({k for conf, _ in everyone for k in set(conf) | set(config) if conf.get(k) != config.get(k)})
    if diffs:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={conf.get(k)!r}" for r, (conf, _) in enumerate(everyone))
                           for k in diffs)
        raise on_every_rank(ValueError(f"ranks disagree on the model or options ({detail})"))


class StepDecision(NamedTuple):
    """What every rank does with this step."""

    has_grad: List[bool]       #: per parameter: some rank has a gradient for it
    found_inf: bool            #: AMP's GradScaler found an inf on some rank: skip, silently
    nonfinite: Optional[NonFiniteGradientError]  #: some rank has a NaN/inf gradient: what to raise
    redo: bool = False         #: some rank's buckets exchanged during backward do not stand (overlap)


def fingerprint(value) -> int:
    """A 31-bit digest of a plain value (equal on every rank for equal values)."""
    return zlib.crc32(repr(value).encode()) & 0x7FFF_FFFF


def agree_on_step(comm: Comm, has_grad: Sequence[bool], failure: Optional[Exception],
                  nonfinite: Sequence[str], found_inf: bool, hyperparameters: Optional[List[dict]],
                  redo: bool = False, voided: bool = False) -> StepDecision:
    """One collective decision per step, before any buffer changes.

    ``failure``: this rank's local preparation error (raised here on every rank); ``nonfinite``:
    names of this rank's parameters with NaN/inf gradients (every rank gets the same
    ``NonFiniteGradientError`` to raise, naming them); ``found_inf``: AMP's GradScaler found an inf
    on this rank; ``hyperparameters``: this rank's per-group lr, momentum, ... (ranks that differ,
    a scheduler stepped on one rank say, raise ValueError on every rank naming each rank's values; None
    where each rank may step with its own, ``UpdateRule.own_hyperparameters``);
    ``redo``: this rank's buckets exchanged during backward used what the step no longer has;
    ``voided``: ``zero_grad()`` dropped this rank's buckets of a backward pass (``overlap``): on every rank,
    the step goes ahead afresh; on some only, every rank raises ``HvdDistefError`` naming them.
    """
    digest = 0 if hyperparameters is None else fingerprint(hyperparameters)
    flags = comm.max_ints([int(failure is not None), int(bool(nonfinite)), int(found_inf), int(redo),
                           digest, -digest, int(voided), -int(voided)] + [int(h) for h in has_grad])
    any_failure, any_nonfinite, any_inf, any_redo = flags[:4]
    agreed = [bool(h) for h in flags[8:]]
    if flags[6] != -flags[7]:  # some ranks, not all, dropped their buckets: they paired with real ones
        everyone = comm.allgather_obj(voided)
        raise on_every_rank(HvdDistefError(VOIDED.format(ranks=", ".join(str(r) for r, v in enumerate(everyone) if v))))
    if flags[4] != -flags[5]:  # max and min of the digests differ
        everyone = comm.allgather_obj(hyperparameters)
        raise on_every_rank(ValueError("ranks disagree on the hyper-parameters of this step (" + "; ".join(
            f"rank {r}: {h}" for r, h in enumerate(everyone)) + "); every rank applies the same update under "
            "error feedback: set them alike on every rank, or align them with "
            "hvd.broadcast_optimizer_state(opt, root_rank=0) before the step"))
    error = None
    if any_failure or any_nonfinite:
        reports = comm.allgather_obj((list(nonfinite), None if failure is None else f"{type(failure).__name__}: {failure}"))
        failures = [f"rank {r}: {msg}" for r, (_, msg) in enumerate(reports) if msg]
        if failures:
            if failure is not None:
                raise on_every_rank(failure)
            raise on_every_rank(HvdDistefError("step() failed on another rank before the exchange ("
                                               + "; ".join(failures) + ")"))
        report = "; ".join(f"rank {r}: {', '.join(bad)}" for r, (bad, _) in enumerate(reports) if bad)
        error = on_every_rank(NonFiniteGradientError(f"non-finite gradient ({report}); nothing was updated. "
                                                     f"Lower the lr, check the data, or pass nonfinite='skip'"))
    return StepDecision(has_grad=agreed, found_inf=bool(any_inf), nonfinite=error, redo=bool(any_redo))
