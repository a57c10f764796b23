"""``sharded``: the server role split over all ranks (SPEC §3), with no root bottleneck.

The buffer is cut into M contiguous shards of whole blocks. Each worker compresses every shard
and sends shard j to rank j (Alltoallv); rank j averages the M payloads of shard j, runs the
server step of SPEC §1 on it with its own server error, and an Allgatherv hands every rank all
compressed Δ̃ shards. With blockwise compressors the arithmetic is exactly that of ``ps``.

Bytes per step, s_j = payload bytes of shard j, r = this rank: sent Σ_{j≠r} s_j + (M−1)·s_r,
received (M−1)·s_r + Σ_{j≠r} s_j; about 2·(M−1)/M·s each way when shards are even.
"""
from __future__ import annotations

from typing import List

import torch

from ..error_feedback import Segments
from ..payload import Payload
from .base import ShardPerRank


class Sharded(ShardPerRank):
    name = "sharded"

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        comm, me, sizes = self.comm, self.comm.rank, self.nbytes
        parts = [p.to_bytes() for p in payloads]
        send = parts[0] if len(parts) == 1 else torch.cat(parts, out=self.buffer("send", sum(sizes)))
        mine = comm.alltoallv(send, sizes, [sizes[me]] * comm.size,  # shard `me` from every worker
                              out=self.buffer("shard", comm.size * sizes[me]) if comm.size > 1 else None)
        server = self.server_reduce(self.decode_many(mine, me), segments, me)  # server step, shard `me`
        # Δ̃'s shards land where they are decompressed (``landing``); where shard `me` of a raw
        # payload is already there (the server step's scratch), it is not copied
        everything = comm.allgatherv(server.to_bytes(), sizes, out=self._landing_all())
        return self.decode_shards(everything.split(sizes))

    def _landing_all(self) -> torch.Tensor:
        """One buffer for every shard's Δ̃ bytes in order: ``self.delta`` itself where each shard is a
        float32 vector, else a kept buffer."""
        if all(self.raw(j) for j in range(len(self.shards))):
            return self.delta.view(torch.uint8)
        return self.buffer("allgather", sum(self.nbytes))
