"""``tree``: binomial-tree allreduce with compression between the reduce and the broadcast (SPEC §3).

Reduce: every node decompresses its children's messages, adds its own Δ_i, recompresses the
partial sum and sends it to its parent. Inner nodes keep NO error memory, so each recompression
loses accuracy for good: this is the cost the paper's authors point to, measured, not hidden.
The root averages, runs the server step of SPEC §1 (the server error lives on rank 0) and Δ̃
goes down the same tree, compressed and unchanged.

Bytes per step (s = payload bytes, c = this node's number of children): a node sends s to its
parent (not the root) and c·s to its children, and receives c·s from its children and s from
its parent (not the root).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ..error_feedback import Segments
from ..payload import Payload
from .base import RootServer


def binomial_tree(rank: int, size: int) -> Tuple[Optional[int], List[int]]:
    """(parent, children) of ``rank`` in the binomial tree rooted at rank 0."""
    children, mask = [], 1
    while mask < size:
        if rank & mask:
            return rank - mask, children
        if rank + mask < size:
            children.append(rank + mask)
        mask <<= 1
    return None, children


def subtree_size(rank: int, size: int) -> int:
    """How many ranks the binomial subtree of ``rank`` holds (itself included)."""
    return 1 + sum(subtree_size(child, size) for child in binomial_tree(rank, size)[1])


class Tree(RootServer):
    name = "tree"

    def __init__(self, comm, compressor, tensor_sizes, device="cpu", delta=None):
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        self.parent, self.children = binomial_tree(comm.rank, comm.size)
        self.subtree_size = subtree_size(comm.rank, comm.size)

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        comm, s = self.comm, self.nbytes[0]
        message = payloads[0]
        if self.children or self.parent is None:
            # the partial sum in Δ̃'s buffer (``scratch``), which Δ̃ overwrites once it comes down
            partial = self.compressor.decompress_into(message, self.scratch())
            for child in self.children:
                partial.add_(self.compressor.decompress(self.decode(comm.recv(s, child, self.device,
                                                                              out=self.buffer("child", s)))))
            self.note_partial_sum(partial, self.subtree_size)
            if self.parent is None:
                message = self.server_compress(partial.div_(comm.size) if comm.size > 1 else partial, segments)
            else:
                message = self.compressor.compress(partial, self.block_sizes)  # no error memory here
        if self.parent is not None:
            comm.send(message.to_bytes(), self.parent)  # returns once sent: ``partial`` is free again
            down = comm.recv(s, self.parent, self.device, out=self.landing(0))
        else:
            down = message.to_bytes()
        for child in reversed(self.children):
            comm.send(down, child)
        return self.decode_shards([down])
