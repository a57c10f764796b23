"""``hierarchical``: raw float32 inside a node, compressed across nodes (SPEC §3; issue 24). The node is
the worker of Algorithm 2, as BytePS and Horovod's hierarchical allreduce treat it across the network.

Each rank keeps its own momentum m_i and sends its d_i raw (the update rule's worker compresses nothing,
``compresses_on_worker``). Inside node n of L ranks the d_i are summed on the node's leader (its local
rank 0: MPI_Reduce), whose mean d_n = (1/L)·Σ_i d_i is the node worker's d: p_n = d_n + (η_{t-1}/η_t)·e_n;
Δ_n = C(p_n); e_n <- p_n − Δ_n, with the node's worker error e_n held on the leader. The leaders then run
``sharded`` among themselves (N nodes: leader j holds the server error of shard j; Alltoallv of the
Δ_n, the server step, Allgatherv of Δ̃), and each leader broadcasts Δ̃'s compressed bytes inside its node.
Every rank decompresses the same bytes: bit-identical updates everywhere.

Data path: node leaders only. Inside a node the reduce and broadcast move d and Δ̃ over shared memory
(one or two orders of magnitude faster than the network); across nodes each node sends one payload of the
whole vector, so what the network carries scales with nodes, not ranks, and no node talks to more than
N − 1 peers. Every local rank owning a slice across nodes (Horovod's hierarchical allreduce) sends the same
bytes per node across the network but spreads the node's compression and server step over its L ranks;
it is not built, so the two are not yet measured against each other (BENCHMARKS.md has the leaders' path
on emulated nodes).

Bytes per step (s_j = payload bytes of shard j over N nodes, B = 4·numel): a non-leader sends B and
receives Σ_j s_j; a leader receives (L−1)·B and sends (L−1)·Σ_j s_j inside the node, and across nodes
sends and receives ``sharded``'s (N−1)·s_me + Σ_{j≠me} s_j each way.

``local_size`` (ranks per node): by default the ranks that share memory (MPI's shared-memory split),
equal on every node; settable (nodes of consecutive ranks) so that tests and the emulated cluster can
make nodes on one machine.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..comm import Comm
from ..compressors import Compressor
from ..error_feedback import ErrorMemory, Segments
from ..payload import Payload
from .base import ShardPerRank


def node_of(comm: Comm, local_size: Optional[int]) -> Tuple[int, int]:
    """(this rank's node, ranks per node): consecutive blocks of ``local_size`` ranks, or the ranks that
    share memory. Raises ValueError, alike on every rank, where the ranks do not split into equal nodes."""
    if local_size is not None:
        if not isinstance(local_size, int) or isinstance(local_size, bool) or local_size < 1:
            raise ValueError(f"local_size must be a positive int (ranks per node), got {local_size!r}")
        if comm.size % local_size:
            raise ValueError(f"local_size={local_size} does not divide the {comm.size} ranks into equal nodes")
        return comm.rank // local_size, local_size
    shared = comm.mpi.Split_type(comm.MPI.COMM_TYPE_SHARED, key=comm.rank)
    leader = comm.rank if shared.Get_rank() == 0 else -1
    size = shared.Get_size()
    leader = shared.bcast(leader, root=0)
    shared.Free()
    everyone = comm.allgather_obj((leader, size))
    sizes = sorted({s for _, s in everyone})
    if len(sizes) > 1:
        raise ValueError(f"the nodes hold {sizes} ranks: hierarchical needs as many ranks on every node (give "
                         f"local_size= to make nodes of consecutive ranks)")
    leaders = sorted({leader for leader, _ in everyone})
    return leaders.index(everyone[comm.rank][0]), size


class Hierarchical(ShardPerRank):
    name = "hierarchical"
    options = ("local_size",)
    compresses_on_worker = False

    def __init__(self, comm: Comm, compressor: Compressor, tensor_sizes, device="cpu", delta=None,
                 local_size: Optional[int] = None):
        node, self.local_size = node_of(comm, local_size)
        self.nodes = comm.size // self.local_size
        self.local = comm.split(node, comm.rank)          # the ranks of this node; its rank 0 leads it
        self.leader = self.local.rank == 0
        self.across = comm.split(0 if self.leader else comm.MPI.UNDEFINED, comm.rank)  # the leaders
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        self.node_memory: Optional[ErrorMemory] = None  # e_n, on the leader
        self.node_compressor = compressor.for_stream(comm.rank)
        if self.leader:
            self.node_memory = ErrorMemory(self.numel, self.device)
            self.node_sum = torch.zeros(self.numel, dtype=torch.float32, device=self.device)

    @property
    def servers(self) -> Optional[Comm]:
        return self.across

    def make_shards(self, tensor_sizes):
        return self.split_shards(tensor_sizes, self.nodes)

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        """``payloads``: this rank's d_i, raw, one per shard. Δ̃'s payloads, the same bytes on every rank."""
        d = self.node_sum if self.leader else self.buffer("d", 4 * self.numel).view(torch.float32)
        for payload, s in zip(payloads, self.shards):
            d[s.start:s.stop].copy_(payload["values"])
        self.local.reduce_sum_(d, 0)
        wire = self.landing_all()
        if self.leader:
            d.div_(self.local_size)  # d_n, the node worker's d; then its error feedback and compression
            node = self.node_memory.step(self.node_compressor, d, segments, self.shards, d_is_scratch=True)
            wire = self.exchange_shards(node, segments)
        wire = self.local.bcast(wire, 0)
        return self.decode_shards(wire.split(self.nbytes))

    def memories(self) -> List[Tuple[ErrorMemory, int]]:
        return super().memories() + ([] if self.node_memory is None else [(self.node_memory, 0)])

    def streams(self) -> List[Compressor]:
        return [self.compressor, self.node_compressor]

    def state_dict(self) -> dict:
        """The server error and the node's worker error and compressor stream where this rank holds them."""
        state = super().state_dict()
        if self.node_memory is not None:
            state.update(node_error=self.node_memory.state_dict(), node_compressor=self.node_compressor.state_dict())
        return state

    def check_state(self, state: dict) -> None:
        super().check_state(state)
        if (self.node_memory is None) != (state.get("node_error") is None):
            raise ValueError(f"rank {self.comm.rank} {'holds' if self.node_memory else 'does not hold'} a node's "
                             f"worker error under 'hierarchical' with local_size={self.local_size}, the checkpoint "
                             f"does not fit: it comes from another topology, rank or node size")
        if self.node_memory is not None:
            self.node_memory.check_state(state["node_error"])

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.node_memory is not None:
            self.node_memory.load_state_dict(state["node_error"])
            self.node_compressor.load_state_dict(state["node_compressor"])
