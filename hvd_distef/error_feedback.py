"""Error memories of SPEC §1: a worker's e_i and the server's ẽ, and the η_{t-1}/η_t rescale.

Each step a role compensates its vector with its stored error, rescaled by the ratio of the
previous to the current learning rate of each param group (only the error is rescaled, never
the gradient), compresses, and keeps what the compressor did not send.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .compressors import Compressor
from .payload import Payload

Segments = List[Tuple[int, int, float]]


def lr_ratio_segments(group_bounds: Sequence[Tuple[int, int]], prev_lrs: Sequence[float],
                      lrs: Sequence[float]) -> Segments:
    """(start, stop, η_{t-1}/η_t) for each param group's slice of the fused buffer (η_{-1} = 0)."""
    segments = []
    for (start, stop), prev, lr in zip(group_bounds, prev_lrs, lrs):
        if not lr > 0:
            raise ValueError(f"lr must be > 0 under error feedback (the error is rescaled by "
                             f"η_(t-1)/η_t), got lr={lr}")
        segments.append((start, stop, prev / lr))
    return segments


def window(segments: Segments, start: int, stop: int) -> Segments:
    """The segments clipped to [start, stop), re-based to start at 0 (for a shard of the buffer)."""
    out = []
    for s, e, r in segments:
        lo, hi = max(s, start), min(e, stop)
        if lo < hi:
            out.append((lo - start, hi - start, r))
    return out


class ErrorMemory:
    """One role's error e (zeros at start) and its compensate-compress-keep step."""

    def __init__(self, numel: int, device: torch.device | str = "cpu"):
        self.error = torch.zeros(numel, dtype=torch.float32, device=device)

    def step(self, compressor: Compressor, d: torch.Tensor, block_sizes: Sequence[int],
             segments: Segments) -> Payload:
        """p = d + (η_{t-1}/η_t)·e;  Δ = C(p);  e <- p − Δ.  Returns Δ's payload."""
        return compressor.compress_with_feedback(d, self.error, block_sizes, segments)

    def state_dict(self) -> torch.Tensor:
        return self.error.clone()

    def load_state_dict(self, error: torch.Tensor) -> None:
        if error.shape != self.error.shape:
            raise ValueError(f"error memory has {error.numel()} elements, this run needs "
                             f"{self.error.numel()}: the checkpoint is from another model or topology")
        self.error.copy_(error)
