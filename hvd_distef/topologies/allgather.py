"""``allgather``: the one-way error-feedback baseline of GRACE-style frameworks (SPEC §3).

Workers keep their error memory and compress; every rank gathers all payloads and averages them
locally. There is no server role: no server compression and no server error.

Bytes per step (s = payload bytes): every rank sends (M−1)·s and receives (M−1)·s.
"""
from __future__ import annotations

from typing import List

import torch

from ..error_feedback import Segments
from ..payload import Payload
from .base import Topology


class Allgather(Topology):
    name = "allgather"

    def exchange(self, payloads: List[Payload], segments: Segments) -> torch.Tensor:
        comm, s = self.comm, self.nbytes[0]
        everything = comm.allgatherv(payloads[0].to_bytes(), [s] * comm.size,
                                     out=self.buffer("allgather", comm.size * s) if comm.size > 1 else None)
        return self.compressor.decompress_mean(self.decode_many(everything), out=self.delta)
