"""``ps``: the parameter server of SPEC §3, the paper's architecture.

Rank 0 is both a worker and the server. Every rank's compressed Δ_i is gathered on rank 0, which
runs the server step of SPEC §1 and broadcasts the compressed Δ̃; every rank (rank 0 included)
decompresses the same bytes, so all ranks apply bit-identical updates.

Bytes per step (s = payload bytes): a non-root rank sends s and receives s; rank 0 receives
(M−1)·s and sends (M−1)·s (gather and broadcast counted as flat trees).
"""
from __future__ import annotations

import torch

from ..error_feedback import ErrorMemory, Segments
from ..payload import Payload
from .base import Topology

ROOT = 0


class ParameterServer(Topology):
    name = "ps"

    def __init__(self, comm, compressor, numel, block_sizes, device="cpu"):
        super().__init__(comm, compressor, numel, block_sizes, device)
        self.server_memory = ErrorMemory(numel, self.device) if comm.rank == ROOT else None

    def exchange(self, payload: Payload, segments: Segments) -> torch.Tensor:
        comm, s = self.comm, self.payload_nbytes
        gathered = comm.gather(payload.to_bytes(), ROOT)
        if comm.rank == ROOT:
            broadcast = self.server_step(self.decode_many(gathered), segments).to_bytes()
        else:
            broadcast = torch.empty(s, dtype=torch.uint8)
        comm.bcast(broadcast, ROOT)
        peers = (comm.size - 1) * s
        comm.count(sent=peers if comm.rank == ROOT else s, received=peers if comm.rank == ROOT else s)
        return self.compressor.decompress(self.decode(broadcast))

    def server_step(self, payloads, segments: Segments) -> Payload:
        """SPEC §1, server: p̃ = (1/M)·Σ_i Δ_i + (η_{t-1}/η_t)·ẽ;  Δ̃ = C(p̃);  ẽ <- p̃ − Δ̃."""
        mean = self.compressor.decompress_mean(payloads)
        return self.server_memory.step(self.compressor, mean, self.block_sizes, segments)

    def state_dict(self) -> dict:
        return {} if self.server_memory is None else {"server_error": self.server_memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.server_memory is None:
            if state:
                raise ValueError(f"rank {self.comm.rank} holds no server error under 'ps', "
                                 f"but the checkpoint gives it one")
            return
        if "server_error" not in state:
            raise ValueError("the checkpoint has no server error for rank 0 under 'ps'; "
                             "it comes from another topology or rank")
        self.server_memory.load_state_dict(state["server_error"])
