"""``ring``: ring allreduce with compression between reduce-scatter and allgather (SPEC §3).

The buffer is cut into M chunks of whole blocks (as in ``sharded``). Reduce-scatter: in M−1
hops each rank passes a compressed partial sum of one chunk to its right neighbour, which
decompresses it, adds its own Δ_i chunk and recompresses it, with NO error memory at these
hops (the accuracy loss the paper's authors point to). After the last hop rank j holds the sum
of chunk j, averages it and runs the server step of SPEC §1 with its own server error. A ring
allgather passes the compressed Δ̃ chunks around unchanged.

Bytes per step (s_j = payload bytes of chunk j): each rank sends and receives M−1 chunk
messages in each phase, about 2·(M−1)/M·s each way when chunks are even.
"""
from __future__ import annotations

from typing import List

from ..error_feedback import Segments
from ..payload import Payload
from .base import ShardPerRank


class Ring(ShardPerRank):
    name = "ring"

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        comm, me, M, sizes = self.comm, self.comm.rank, self.comm.size, self.nbytes
        right, left = (me + 1) % M, (me - 1) % M
        # Reduce-scatter: at hop k send chunk (me-k-1), receive chunk (me-k-2); rank me ends with chunk me.
        # Partial sums of chunk j are formed in chunk j's slice of Δ̃'s buffer (``scratch``), which
        # the allgather overwrites with Δ̃; what arrives waits in a kept buffer.
        outgoing = payloads[(me - 1) % M]
        for k in range(M - 1):
            in_chunk = (me - k - 2) % M
            incoming = comm.sendrecv(outgoing.to_bytes(), right, sizes[in_chunk], left,
                                     out=self.buffer(f"hop{in_chunk}", sizes[in_chunk]))
            partial = self.compressor.decompress_into(self.decode(incoming, in_chunk), self.scratch(in_chunk))
            partial.add_(self.compressor.decompress(payloads[in_chunk]))
            self.note_partial_sum(partial, k + 2)
            if k < M - 2:
                block_sizes = self.shards[in_chunk].block_sizes
                outgoing = self.compressor.compress(partial, block_sizes)  # no error memory here
        mean = partial.div_(M) if M > 1 else self.compressor.decompress_into(payloads[me], self.scratch(me))
        chunks = {me: self.server_compress(mean, segments, me).to_bytes()}
        # Allgather: at hop k send chunk (me-k), receive chunk (me-k-1).
        for k in range(M - 1):
            out_chunk, in_chunk = (me - k) % M, (me - k - 1) % M
            chunks[in_chunk] = comm.sendrecv(chunks[out_chunk], right, sizes[in_chunk], left,
                                             out=self.landing(in_chunk))
        return self.decode_shards([chunks[j] for j in range(M)])
