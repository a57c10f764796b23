"""The optimizer's options (SPEC §5): what a user may pass, turned into objects and checked on each rank
before any communication (``configure``), and what every rank must agree on: ``config`` (the structure a
checkpoint must match) and the per-group hyper-parameters. May import the floors below the optimizer."""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import List, Optional

import torch

from . import buckets, horovod_args
from .compressors import get_compressor
from .fused import FusedLayout
from .passes import BackwardPasses, check_passes
from .rules import REGISTRY as RULES
from .topologies import get_topology
from .topologies.hierarchical import NODE_PATHS

NONFINITE_POLICIES = ("raise", "skip", "propagate")
HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


def configure(opt, optimizer, named_parameters, compression, topology: str, backward_passes_per_step, nonfinite,
              overlap, bucket_cap_mb, error_decay_beta, op, gradient_predivide_factor, num_groups, groups,
              local_size=None, node_path=None):
    """``opt``'s options from ``DistributedOptimizer``'s arguments (its docstring), on this rank alone:
    ``opt`` becomes a ``torch.optim.SGD`` over ``optimizer``'s own param group dicts, with its compressor,
    fused layout, backward-pass counter and resolved options. Returns the topology and update-rule classes.
    Raises TypeError or ValueError naming the bad argument."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"hvd_distef.DistributedOptimizer wraps torch.optim.SGD (the algorithm of SPEC §1 is SGD "
                        f"with momentum), got {type(optimizer).__name__}")
    check_own_step(type(optimizer))
    passes = check_passes(backward_passes_per_step)
    opt._building = True
    torch.optim.SGD.__init__(opt, optimizer.param_groups, **optimizer.defaults)  # the same group dicts (SPEC §5a)
    opt._building = False
    opt.compressor = get_compressor(horovod_args.compression_name(compression))
    topology_cls, opt._topology_name = get_topology(topology), topology
    rule_cls = RULES[topology_cls.update_rule]
    opt.nonfinite = nonfinite_policy(nonfinite, rule_cls, topology)
    opt._layout = FusedLayout(opt.param_groups, named_parameters)
    opt._parameter_names = opt._layout.names_by_param  # horovod.torch's attribute
    opt._passes = BackwardPasses(opt._layout.params, passes)
    opt.numel, opt.device = opt._layout.numel, opt._layout.device
    check_hyperparameters(opt.param_groups, rule_cls)
    for g in opt.param_groups:
        g.setdefault("prev_lr", 0.0)  # η_{t-1} of SPEC §1: the last non-zero lr this group stepped with
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be True or False, got {overlap!r}")
    opt.overlap, opt.bucket_cap_mb = overlap, float(bucket_cap_mb) if overlap else None
    buckets.plan(opt._layout.sizes, opt.bucket_cap_mb)  # refuses a bad cap here
    opt.error_decay = error_decay(error_decay_beta, rule_cls, topology)
    opt._op = horovod_args.reduce_op(op, sums=rule_cls.torch_state)
    opt._predivide = horovod_args.check_predivide(gradient_predivide_factor, opt._op)
    horovod_args.check_groups(num_groups, groups)
    if local_size is not None and "local_size" not in topology_cls.options:
        raise ValueError(f"local_size= (ranks per node) is for topology='hierarchical', not {topology!r}")
    if node_path is not None and node_path not in NODE_PATHS:
        raise ValueError(f"node_path must be one of {NODE_PATHS}, got {node_path!r}")
    if node_path is not None and "node_path" not in topology_cls.options:
        raise ValueError(f"node_path= (how a node's ranks share the work) is for topology='hierarchical', not "
                         f"{topology!r}")
    opt.local_size, opt.node_path = local_size, node_path
    return topology_cls, rule_cls


def topology_options(opt, topology_cls) -> dict:
    """The optimizer's options that the topology takes (``Topology.options``), by keyword."""
    every = {"op": opt._op, "predivide": opt._predivide, "local_size": opt.local_size, "node_path": opt.node_path}
    return {name: every[name] for name in topology_cls.options}


def check_own_step(cls: type) -> None:
    """Refuse a ``torch.optim.SGD`` subclass that overrides ``step`` (LARS-like, or clipping after SGD's
    update): the wrapper's step replaces it, and it would never run. Raises TypeError naming the class."""
    # torch wraps a subclass's step in its profiling hook on the first instance: compare what runs
    own = next(k for k in cls.__mro__ if "step" in vars(k))
    if inspect.unwrap(vars(own)["step"]) is inspect.unwrap(vars(torch.optim.SGD)["step"]):
        return
    raise TypeError(f"{cls.__module__}.{cls.__qualname__} overrides torch.optim.SGD.step (in "
                    f"{own.__qualname__}); DistributedOptimizer applies SPEC §1's update in its own step(), so "
                    f"that step would never run. Wrap a plain torch.optim.SGD, and put what the override does "
                    f"around opt.step() (or between opt.synchronize() and opt.step() inside "
                    f"opt.skip_synchronize())")


def nonfinite_policy(nonfinite: Optional[str], rule, topology: str) -> str:
    """What a NaN or inf gradient does: the given policy, or the rule's default."""
    if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    nonfinite = nonfinite or rule.nonfinite_default
    if nonfinite == "propagate" and not rule.allows_propagate:
        raise ValueError(f"nonfinite='propagate' is for topology='allreduce': under {topology!r} a NaN would "
                         f"stay in the error memories for good; use 'raise' or 'skip'")
    return nonfinite


def error_decay(beta: Optional[float], rule, topology: str) -> Optional[float]:
    """Wu et al.'s fixed decay β of both errors, for error-feedback rules only, or None."""
    if beta is None:
        return None
    if not 0 <= beta <= 1:
        raise ValueError(f"error_decay must be in [0, 1], got {beta!r}")
    if not rule.keeps_errors:
        raise ValueError(f"error_decay is for error-feedback topologies; {topology!r} keeps no errors")
    return float(beta)


def check_hyperparameters(groups: List[dict], rule) -> None:
    """Each param group's lr, momentum and weight decay in range; dampening and maximize only where the
    rule is torch's own SGD."""
    for i, g in enumerate(groups):
        where = f"param group {i}"
        if not g["lr"] >= 0:
            raise ValueError(f"lr must be >= 0 in {where}, got {g['lr']}")
        if not 0 <= g["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1) in {where}, got {g['momentum']}")
        if not g["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0 in {where}, got {g['weight_decay']}")
        if not rule.torch_state and (g["dampening"] != 0 or g.get("maximize", False)):
            raise ValueError(f"dampening and maximize are not part of SPEC §1; {where} sets them")


def hyperparameters(groups: List[dict]) -> list:
    """The per-group hyper-parameters every rank must share at each step."""
    return [{k: g.get(k) for k in HYPERPARAMETERS} for g in groups]


def config(opt) -> dict:
    """The structure every rank must share and a checkpoint must match: once the topology is built, with the
    values its options resolved to (``hierarchical``'s node size and data path), not the arguments as given."""
    layout = opt._layout
    built = opt.buckets[0].topology if getattr(opt, "buckets", None) else None
    shapes = [(n, tuple(p.shape)) for n, p in zip(layout.names, layout.params)]
    return {
        "world_size": opt.comm.size,
        "compression": opt.compressor.name, "compression_options": opt.compressor.config(),
        "topology": opt._topology_name, "backward_passes_per_step": opt.backward_passes_per_step,
        "overlap": opt.overlap, "bucket_cap_mb": opt.bucket_cap_mb, "error_decay": opt.error_decay,
        "local_size": getattr(built, "local_size", opt.local_size),
        "node_path": getattr(built, "node_path", opt.node_path),
        "parameters": hashlib.sha1(json.dumps(shapes).encode()).hexdigest(),
        "numel": opt.numel, "num_params": len(layout.params),
        "group_sizes": [len(ps) for ps in layout.group_params],
    }
