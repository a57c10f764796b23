"""What a step must leave as it was (SPEC §5a), kept aside and put back around the exchange; and
what the buckets exchanged during backward changed, put back when the step does not go ahead.

The fused buffer has one layout for every step, so that every rank exchanges the same payload
shape. A parameter whose gradient is None on every rank takes part in that exchange with a zero
direction, and then its value, its weight-decay buffer and its worker and server errors are put
back as they were (its momentum is kept by ``fused.DoubleBuffer.keep``, which needs no clone); a
param group with lr = 0 keeps its worker and server errors (its x does not move: x − 0·u = x).
Everything is held as clones of slices of the flat buffers, so a step with nothing to keep costs
nothing.
"""
from __future__ import annotations

import copy
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


class Rollback:
    """The state that the buckets exchanged during backward (``overlap=True``) change before every
    rank has agreed on the step: worker and server errors and the compressors' random streams,
    copied bucket by bucket into buffers allocated once, and put back when the step is skipped,
    raises, or is redone (SPEC §5a: a step that does not go ahead changes nothing). The momentum
    needs nothing: the step writes it beside the current one (``fused.DoubleBuffer``).

    Args:
        worker_memory: the worker's error memory over the fused buffer, or None.
        server_memories: per bucket, the error memory this rank holds for it, or None.
        compressors: per bucket, the server role's compressor; ``worker_compressor`` the worker's.
    """

    def __init__(self, worker_memory: Optional[ErrorMemory], server_memories: Sequence[Optional[ErrorMemory]],
                 worker_compressor, compressors: Sequence):
        self._worker = worker_memory
        self._worker_copy = None if worker_memory is None else torch.zeros_like(worker_memory.error)
        self._servers = list(server_memories)
        self._server_copies = [None if m is None else torch.zeros_like(m.error) for m in self._servers]
        self._worker_compressor = worker_compressor
        self._compressors = list(compressors)
        self._undo: list = []

    def begin(self) -> None:
        """A new step: nothing kept yet but the worker compressor's stream."""
        state = copy.deepcopy(self._worker_compressor.state_dict())
        self._undo = [lambda: self._worker_compressor.load_state_dict(state)]

    def keep(self, bucket: int, start: int, stop: int) -> None:
        """Bucket ``bucket`` (fused range [start, stop)) is about to change."""
        undo = self._undo
        if self._worker is not None:
            kept = self._worker.keep(start, stop, self._worker_copy)
            undo.append(lambda: self._worker.put_back(start, stop, self._worker_copy, kept))
        server, store = self._servers[bucket], self._server_copies[bucket]
        if server is not None:
            n = store.numel()
            server_kept = server.keep(0, n, store)
            undo.append(lambda: server.put_back(0, n, store, server_kept))
        compressor = self._compressors[bucket]
        state = copy.deepcopy(compressor.state_dict())
        undo.append(lambda: compressor.load_state_dict(state))

    def restore(self) -> None:
        """Everything kept since ``begin`` back as it was."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []
