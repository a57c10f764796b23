"""What a step must leave as it was (SPEC §5a), kept aside and put back around the exchange.

The fused buffer has one layout for every step, so that every rank exchanges the same payload
shape. A parameter whose gradient is None on every rank takes part in that exchange with a zero
direction, and then its value, its weight-decay buffer and its worker and server errors are put
back as they were (its momentum is kept by ``fused.DoubleBuffer.keep``, which needs no clone); a
param group with lr = 0 keeps its worker and server errors (its x does not move: x − 0·u = x).
Everything is held as clones of slices of the flat buffers, so a step with nothing to keep costs
nothing.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .error_feedback import ErrorMemory
from .fused import Range


class Untouched:
    """Slices of flat buffers and whole parameters to restore after a step.

    Args:
        ranges: (start, stop) slices of the fused buffer, in its coordinates.
        buffers: flat float32 buffers in the fused buffer's coordinates (momentum, weight decay).
        memories: (ErrorMemory, offset) pairs: an error memory that covers the fused buffer from
            ``offset`` on (a worker's: 0; a server shard's: the shard's start).
        params: parameters to restore whole.
    """

    def __init__(self, ranges: Sequence[Range], buffers: Sequence[Optional[torch.Tensor]] = (),
                 memories: Sequence[Tuple[Optional[ErrorMemory], int]] = (), params: Sequence[torch.Tensor] = ()):
        self._saved: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._memories: List[Tuple[ErrorMemory, int, int, torch.Tensor]] = []
        if not ranges and not params:
            return
        for buf in buffers:
            if buf is not None:
                self._saved += [(buf[a:b], buf[a:b].clone()) for a, b in ranges]
        for memory, offset in memories:
            if memory is None:
                continue
            error, n = memory.error, memory.error.numel()
            for a, b in ranges:
                lo, hi = max(a - offset, 0), min(b - offset, n)
                if lo < hi:
                    self._memories.append((memory, lo, hi, error[lo:hi].clone()))
        self._saved += [(p, p.detach().clone()) for p in params]

    def restore(self) -> None:
        for view, saved in self._saved:
            view.copy_(saved)
        for memory, lo, hi, saved in self._memories:
            memory.error[lo:hi].copy_(saved)
