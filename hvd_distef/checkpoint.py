"""The optimizer's state dict (SPEC §4, §5a): torch's SGD state dict plus a ``distef`` entry holding the
configuration it was written by, the step counters, the update rule's buffers (momentum m_i, weight-decay
buffer w, worker error e_i), each bucket's server error where this rank holds it, and the compressors'
random streams. Everything is validated before anything is loaded: a checkpoint that does not fit
changes nothing. Works on a ``DistributedOptimizer`` given as an argument; imports no optimizer.

Two recipes (README, "Checkpoints"):
- one file per rank: ``opt.state_dict()`` on every rank, each rank loading its own;
- one file for the job: ``gathered`` (``opt.gathered_state_dict()``) on every rank gathers every rank's
  state dict at the root, which writes it; every rank loads that file and takes its own part. Under
  ``allreduce`` every rank's state is torch's SGD state of the same averaged gradients, so rank 0's own
  state dict serves every rank, as in torch DDP's recipe.
A rank that loads another rank's state dict under error feedback (DDP's recipe without ``gathered``)
changes nothing; its next step raises on every rank (``OtherRanksState``), saying what to do."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .errors import HvdDistefError

NOT_OURS = ("this is not a hvd_distef.DistributedOptimizer state dict (no 'distef' entry) of this model: a "
            "torch.optim.SGD or horovod.torch checkpoint has no worker or server errors. Resume it with "
            "topology='allreduce' (same param groups), or start afresh")


#: what a rank that calls ``gathered`` alone is told
COLLECTIVE = ("a collective: call it on every rank of the optimizer, then save on rank 0 only "
              "(state = opt.gathered_state_dict(); if rank == 0: torch.save(state, path))")
#: the key of a job's state dict holding every rank's state dict, in rank order
JOB = "distef_ranks"


class OtherRanksState(HvdDistefError):
    """A rank loaded a state dict that another rank wrote; raised by its next step on every rank."""


def gathered(opt, root_rank: int = 0) -> Optional[dict]:
    """The job's state dict at ``root_rank`` of ``opt``'s ranks (None on the others), collective over them:
    torch's ``state`` and ``param_groups`` of the root (what torch tools read) and ``distef_ranks``, every
    rank's ``opt.state_dict()`` in rank order. Raises ValueError on every rank for a root out of range."""
    if not 0 <= root_rank < opt.comm.size:
        raise ValueError(f"root_rank must be in [0, {opt.comm.size}), got {root_rank!r}")
    try:
        parts = opt.comm.gather_obj(opt.state_dict(), root_rank, purpose=f" of gathered_state_dict(), {COLLECTIVE}")
    except opt.comm.MPI.Exception as exc:  # paired with another collective of the other ranks
        raise HvdDistefError(f"gathered_state_dict() failed in MPI ({exc}): {COLLECTIVE}") from exc
    if parts is None:
        return None
    return {"state": parts[root_rank]["state"], "param_groups": parts[root_rank]["param_groups"], JOB: parts}


def this_ranks(opt, state_dict: dict) -> dict:
    """This rank's part of a job's state dict (``gathered``), or ``state_dict`` itself. Raises ValueError
    (alike on every rank that reads the same file) when the job had another number of ranks."""
    if JOB not in state_dict:
        return state_dict
    parts = state_dict[JOB]
    if not isinstance(parts, list) or len(parts) != opt.comm.size:
        raise ValueError(f"the checkpoint holds the state of {len(parts) if isinstance(parts, list) else '?'} "
                         f"ranks, this optimizer has {opt.comm.size}: resume with as many ranks as wrote it")
    return parts[opt.comm.rank]


def raise_deferred(opt) -> None:
    """What ``load`` kept for this step to raise on every rank (``OtherRanksState``), once."""
    failure, opt._load_failure = getattr(opt, "_load_failure", None), None
    if failure is not None:
        raise failure


def distef_entry(opt) -> dict:
    """The ``distef`` entry of ``opt``'s state dict."""
    return {"config": dict(opt.config(), rank=opt.comm.rank),
            "steps": opt.stats.steps, "skipped_steps": opt.stats.skipped_steps, **opt.rule.state_dict(),
            "topology": [b.topology.state_dict() for b in opt.buckets],
            "server_compressor": [b.topology.compressor.state_dict() for b in opt.buckets]}


def validated(opt, state_dict: dict) -> Optional[dict]:
    """The ``distef`` entry of ``state_dict`` (None for a plain torch/Horovod SGD checkpoint where the
    rule keeps torch's state), after checking that all of it fits ``opt``; raises ValueError naming the
    mismatch otherwise. Changes nothing."""
    sizes = [len(g["params"]) for g in state_dict.get("param_groups", [])]
    mine = [len(g["params"]) for g in opt.param_groups]
    if opt.rule.torch_state:
        check_torch_state(opt, state_dict.get("state", {}))
    if "distef" not in state_dict:
        if opt.rule.torch_state and sizes == mine:
            return None
        raise ValueError(NOT_OURS)
    ours = state_dict["distef"]
    saved, config = ours["config"], dict(opt.config(), rank=opt.comm.rank)
    if opt.rule.torch_state:  # torch's SGD state of the same averaged gradients: alike on every rank
        config["rank"] = saved.get("rank")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {config[k]!r}" for k in config if saved.get(k) != config[k]]
    if diffs == [f"rank: checkpoint {saved.get('rank')!r}, this run {opt.comm.rank!r}"]:
        raise OtherRanksState(
            f"rank {opt.comm.rank} loaded the state dict of rank {saved.get('rank')}: under error feedback each "
            f"rank's momentum and worker error are its own (SPEC §1), so nothing was loaded here. Save one file "
            f"for the job with state = opt.gathered_state_dict() on every rank (rank 0 writes it; every rank "
            f"loads it and takes its own part), or one file per rank from opt.state_dict(); or load on rank 0 "
            f"only and call hvd.broadcast_optimizer_state(opt, root_rank=0) (the other ranks' worker errors "
            f"then start at zero)")
    if diffs:
        raise ValueError("the checkpoint comes from another configuration (" + "; ".join(diffs) + ")")
    if sizes != mine:
        raise ValueError("the checkpoint's param groups do not have this optimizer's sizes")
    opt.rule.check_state(ours)
    for key in ("topology", "server_compressor"):
        if not isinstance(ours.get(key), list) or len(ours[key]) != len(opt.buckets):
            raise ValueError(f"the checkpoint's {key} is not a list of {len(opt.buckets)} buckets")
    for bucket, topology in zip(opt.buckets, ours["topology"]):
        bucket.topology.check_state(topology)
    for key in ("steps", "skipped_steps"):
        if not isinstance(ours.get(key), int) or ours[key] < 0:
            raise ValueError(f"the checkpoint's {key} is {ours.get(key)!r}, not a count")
    streams = [("worker_compressor", opt.rule.worker_compressor, ours.get("worker_compressor"))]
    streams += [("server_compressor", b.topology.compressor, saved) for b, saved in zip(opt.buckets,
                                                                                        ours["server_compressor"])]
    for key, compressor, saved in streams:
        if not isinstance(saved, dict) or set(saved) != set(compressor.state_dict()):
            raise ValueError(f"the checkpoint's {key} state {saved!r} does not fit {compressor!r}")
        try:
            copy.deepcopy(compressor).load_state_dict(saved)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the checkpoint's {key} state does not load: {exc}") from exc
    return ours


def load(opt, state_dict: dict) -> None:
    """``state_dict`` (this rank's, or this rank's part of a job's) into ``opt`` once ``validated``: torch's part (the param groups' hyper-parameters,
    and torch's per-parameter state where the rule keeps it) into the param group dicts the wrapped SGD
    shares, then the rule's buffers, the server errors, the streams and the step counters."""
    state_dict = this_ranks(opt, state_dict)
    try:
        ours = validated(opt, state_dict)
    except OtherRanksState as exc:  # the other ranks may have loaded theirs: every rank raises at the step
        opt._load_failure = exc
        return
    groups = opt.param_groups
    torch.optim.Optimizer.load_state_dict(opt, {"state": state_dict["state"] if opt.rule.torch_state else {},
                                                "param_groups": state_dict["param_groups"]})
    for mine, loaded in zip(groups, opt.param_groups):
        mine.update(loaded)
        mine.setdefault("prev_lr", 0.0)
    opt.param_groups = groups
    if ours is None:
        return
    opt.rule.load_state_dict(ours)
    for bucket, topology, compressor in zip(opt.buckets, ours["topology"], ours["server_compressor"]):
        bucket.topology.load_state_dict(topology)
        bucket.topology.compressor.load_state_dict(compressor)
    opt.stats.steps, opt.stats.skipped_steps = ours["steps"], ours["skipped_steps"]


def check_torch_state(opt, state: dict) -> None:
    """torch's per-parameter state (by index over the groups) must fit the parameters' shapes."""
    everything = [p for g in opt.param_groups for p in g["params"]]
    for index, entries in state.items():
        if not isinstance(index, int) or not 0 <= index < len(everything):
            raise ValueError(f"the checkpoint has state for parameter {index!r}, this optimizer has "
                             f"{len(everything)} parameters")
        p = everything[index]
        for name, value in entries.items():
            if torch.is_tensor(value) and value.shape != p.shape:
                raise ValueError(f"the checkpoint's {name} of parameter {index} ({opt._parameter_names[p]}) has "
                                 f"shape {tuple(value.shape)}, the parameter {tuple(p.shape)}: it comes from "
                                 f"another model")
