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

from ..error_feedback import Segments
from ..payload import Payload
from .base import ShardPerRank


class Sharded(ShardPerRank):
    name = "sharded"

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        return self.decode_shards(self.exchange_shards(payloads, segments).split(self.nbytes))
