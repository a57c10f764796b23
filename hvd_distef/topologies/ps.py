"""``ps``: the parameter server of SPEC §3, the paper's architecture.

Rank 0 is both a worker and the server. Every rank's compressed Δ_i is gathered on rank 0, which
runs the server step of SPEC §1 (``Topology.server_reduce``: p̃ = (1/M)·Σ_i Δ_i + (η_{t-1}/η_t)·ẽ;
Δ̃ = C(p̃); ẽ <- p̃ − Δ̃) and broadcasts the compressed Δ̃; every rank (rank 0 included)
decompresses the same bytes, so all ranks apply bit-identical updates.

Bytes per step (s = payload bytes): a non-root rank sends s and receives s; rank 0 receives
(M−1)·s and sends (M−1)·s.
"""
from __future__ import annotations

from typing import List

import torch

from ..comm import Pending
from ..error_feedback import ErrorMemory, Segments
from ..payload import Payload
from .base import Topology

ROOT = 0


class ParameterServer(Topology):
    name = "ps"

    def __init__(self, comm, compressor, tensor_sizes, device="cpu", delta=None):
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        if comm.rank == ROOT:
            self.server_memory = ErrorMemory(self.numel, self.device)

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        broadcast = self.comm.bcast(self._reduce_on_root(payloads, segments), ROOT)
        return self.decode_shards([broadcast])

    def start_exchange(self, payloads: List[Payload], segments: Segments) -> Pending:
        """The gather and the server step, then the broadcast of Δ̃ left on the wire: it goes out of
        rank 0 while the next bucket's payloads come in (the link's two directions at once)."""
        broadcast = self.comm.ibcast(self._reduce_on_root(payloads, segments), ROOT)
        return Pending(lambda: self.decode_shards([broadcast.wait()]), broadcast.test)

    def _reduce_on_root(self, payloads: List[Payload], segments: Segments) -> torch.Tensor:
        """Every worker's Δ_i gathered on rank 0 and the server step there: Δ̃'s wire bytes on rank 0,
        a buffer for them elsewhere."""
        comm = self.comm
        gathered = comm.gather(payloads[0].to_bytes(), ROOT, out=self.buffer("gather", comm.size * self.nbytes[0])
                               if comm.rank == ROOT and comm.size > 1 else None)
        if comm.rank == ROOT:
            return self.server_reduce(self.decode_many(gathered), segments).to_bytes()
        return self.landing(0)
