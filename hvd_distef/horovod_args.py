"""horovod.torch.DistributedOptimizer's constructor arguments, with Horovod's meaning where our
algorithm has one, refused with the reason where it has none (SPEC §5a; README "Porting a Horovod
script").

- ``compression=hvd.Compression.none`` / ``.fp16``: Horovod's own compressor classes stand for our
  ``none`` / ``fp16``.
- ``op=hvd.Average`` (the default) everywhere; ``op=hvd.Sum`` under ``topology="allreduce"`` only
  (the server of SPEC §1 averages); ``op=hvd.Adasum``: refused.
- ``gradient_predivide_factor=f``: under ``allreduce``, Horovod's split of the averaging (scale by
  1/f before the sum, f/M after); under error feedback the server averages decompressed payloads
  in float32 and f changes nothing.
- ``num_groups=`` / ``groups=``: validated as Horovod does; we always fuse every gradient into one
  exchange, which is what grouping approximates.
- ``sparse_as_dense=``: sparse gradients are always densified.

And the one call Horovod makes into the optimizer on its own: ``broadcast_optimizer_state``'s step() that
creates torch's state (``creating_state``).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch

_HOROVOD_COMPRESSORS = {"NoneCompressor": "none", "FP16Compressor": "fp16"}


def creating_state(depth: int = 16) -> bool:
    """Whether the step() being run was called by ``horovod.torch``'s ``broadcast_optimizer_state`` (to
    create torch's per-parameter state on a rank whose optimizer has none), within ``depth`` frames."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "broadcast_optimizer_state" and "horovod" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def compression_name(spec: Any) -> Any:
    """Horovod's ``Compression.none``/``.fp16`` (class or instance) as our compressor names; anything
    else is returned as given."""
    cls = spec if isinstance(spec, type) else type(spec)
    if cls.__module__.startswith("horovod."):
        if cls.__name__ not in _HOROVOD_COMPRESSORS:
            raise ValueError(f"Horovod compressor {cls.__name__} has no hvd_distef counterpart; use "
                             f"hvd.Compression.none/fp16 or one of hvd_distef.Compression")
        return _HOROVOD_COMPRESSORS[cls.__name__]
    return spec


def reduce_op(op: Any, sums: bool) -> str:
    """"average" or "sum" for Horovod's op (None: average); ``sums``: whether the update rule can take a
    sum (torch's SGD on the allreduced gradient) rather than SPEC §1's server average."""
    if op is None:
        return "average"
    import horovod.torch as hvd
    if op == hvd.Average:
        return "average"
    if op == hvd.Sum:
        if not sums:
            raise ValueError("op=hvd.Sum: the server of SPEC §1 averages the workers' Δ_i; op=Sum is "
                             "accepted with topology='allreduce' only")
        return "sum"
    if op == hvd.Adasum:
        raise ValueError("op=hvd.Adasum is not supported: Adasum combines raw gradients pairwise and cannot "
                         "carry compressed payloads with error feedback; use hvd.DistributedOptimizer for "
                         "Adasum, or op=hvd.Average")
    raise ValueError(f"unknown op {op!r}; use hvd.Average (or hvd.Sum with topology='allreduce')")


def check_predivide(factor: float, op: str) -> float:
    if not factor > 0:
        raise ValueError(f"gradient_predivide_factor must be positive, got {factor!r}")
    if factor != 1.0 and op != "average":
        raise ValueError("gradient_predivide_factor not equal to 1 requires op=hvd.Average (as in Horovod)")
    return float(factor)


def check_groups(num_groups: int, groups: Optional[Any]) -> None:
    """Horovod's checks of ``num_groups``/``groups``; the grouping itself is moot (one fused exchange)."""
    if groups is None:
        groups = num_groups or None
    if groups is None:
        return
    if not (isinstance(groups, list) or (isinstance(groups, int) and groups >= 0)):
        raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
    if isinstance(groups, list):
        seen = set()
        for group in groups:
            for p in group:
                if not isinstance(p, torch.Tensor):
                    raise ValueError("groups must consist of torch.Tensor.")
                if id(p) in seen:
                    raise ValueError("A parameter can only appear once in groups.")
                seen.add(id(p))
