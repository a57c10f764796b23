"""The named structures the hot loops take (what a kernel reads, what it writes, its options), the same for
the compiled ``cpp_ops`` (bindings.cpp reads these fields), the torch path and the Triton path. Imports
only torch's types.

Every tensor is a flat float32 vector unless said otherwise; "the fused range" is the consecutive
parameters' elements end to end."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

#: (start, stop, ratio) per param group: the η_{t-1}/η_t factor of the error over [start, stop)
Segments = List[Tuple[int, int, float]]


class Grads(NamedTuple):
    """Read: the gradients of consecutive fused parameters where backward left them (each a contiguous
    float32 tensor of ``sizes[k]`` elements, or an empty tensor for a parameter without one: zeros),
    times ``inv_scale`` (AMP's unscale) when given."""

    grads: Sequence[torch.Tensor]
    sizes: Sequence[int]
    inv_scale: Optional[float] = None


class Momentum(NamedTuple):
    """SPEC §1's momentum: m' = μ·m + g is written to ``next`` (``current`` is read and left as it was; the
    same tensor for an in-place step), d = g + μ·m' (nesterov) or m'; μ and nesterov per parameter of the
    ``Grads`` (μ = 0: d = g and m' = m). Both buffers cover the elements the kernel computes."""

    current: torch.Tensor
    next: torch.Tensor
    mus: Sequence[float]
    nesterovs: Sequence[bool]


class Feedback(NamedTuple):
    """A worker's error step on one shard: e is read from ``error`` and p = d + r·(e − C_prev) written to
    ``error_out`` (C_prev: ``prev_scales``/``prev_bits``, the previous payload still to subtract, or None);
    the shard is elements [start, start + len(error)) of the fused range, cut into ``block_sizes``; r per
    ``segments`` of the shard."""

    error: torch.Tensor
    error_out: torch.Tensor
    start: int
    block_sizes: Sequence[int]
    segments: Segments
    prev_scales: Optional[torch.Tensor] = None
    prev_bits: Optional[torch.Tensor] = None


class Descent(NamedTuple):
    """The update's options (SPEC §1): lr η, the weight decay's momentum μ, weight decay λ, nesterov."""

    lr: float
    mu: float
    weight_decay: float
    nesterov: bool


class Pieces(NamedTuple):
    """Read: Δ̃ of a param group as blocksign payloads: piece k (``scales[k]``, ``bits[k]`` uint8,
    ``block_sizes[k]``) decompresses to elements [starts[k], starts[k] + its numel) of the group (it may
    begin before 0 or end after the group); in order, the pieces leave no gap."""

    starts: Sequence[int]
    scales: Sequence[torch.Tensor]
    bits: Sequence[torch.Tensor]
    block_sizes: Sequence[Sequence[int]]
