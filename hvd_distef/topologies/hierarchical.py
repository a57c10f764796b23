"""``hierarchical``: raw float32 inside a node, compressed across nodes (SPEC §3; issue 24). The node is
the worker of Algorithm 2, as BytePS and Horovod's hierarchical allreduce treat it across the network.

Each rank keeps its own momentum m_i and sends its d_i raw (the update rule's worker compresses nothing,
``compresses_on_worker``). A node of L ranks is one worker: its d_n = (1/L)·Σ_i d_i (summed in local rank
order), p_n = d_n + (η_{t-1}/η_t)·e_n, Δ_n = C(p_n), e_n <- p_n − Δ_n, and the server step runs across the
N nodes as in ``sharded``. Every rank decompresses the same Δ̃ bytes: bit-identical updates everywhere.

Data path (``node_path``):

- ``"slices"`` (the default; Horovod's hierarchical allreduce): the vector is cut into L slices, and local
  rank l owns slice l of its node. Each rank writes its d_i into memory its node shares
  (``shared_memory.NodeBuffer``); after a node barrier, rank l sums slice l of the L vectors, runs the node's
  worker error feedback on it (its slice of e_n), and ``sharded`` runs among the N ranks that own slice l
  (one per node: slice l is cut into N shards, one server error each); their Allgatherv lands Δ̃'s slice
  in the node's shared memory, and after a second barrier every rank reads all of Δ̃. A node's compression,
  server steps and cross-node traffic are spread over its L ranks: L streams, each about 1/L of the node's
  bytes. Slices and shards keep the compressor's blocks whole (as ``sharded``'s shards do): a model of
  fewer blocks than L·N (blocksign's default is a block a tensor) leaves some ranks without a share; give
  ``Compression.blocksign(block_size=...)`` to cut large tensors into blocks.
- ``"leaders"``: one slice, owned by each node's local rank 0, which sums, compresses and exchanges the
  whole vector among the leaders while the other ranks wait.

Both send across the network one payload of the whole vector per node, not one per rank, and no rank
talks to more than N − 1 peers: what the network carries scales with nodes. BENCHMARKS.md ("Nodes") has
the two measured against each other and against the flat topologies.

Bytes per step (``comm_stats()``): through MPI (``bytes_sent``/``bytes_received``), each slice's
``sharded`` bytes over N ranks (s_j = payload bytes of shard j). Inside the node, through shared memory
(``shared_memory_bytes_sent``/``_received``), counted as the bytes they stand for: rank r sends the slices
of its d_i that other ranks sum (4 bytes an element) and the Δ̃ wire bytes of the slices it owns to each
of the L − 1 others, and receives the converse.

``local_size`` (ranks per node): by default the ranks that share memory (MPI's shared-memory split),
equal on every node; settable (nodes of consecutive ranks on one host) so that tests and the emulated
cluster can make nodes on one machine. The node's shared memory holds L·4·d bytes (plus Δ̃'s wire).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..comm import Comm
from ..compressors import Compressor
from ..error_feedback import ErrorMemory, Segments, Shard, window
from ..payload import Payload
from ..shared_memory import NodeBuffer
from .base import ShardPerRank

NODE_PATHS = ("slices", "leaders")


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
    options = ("local_size", "node_path")
    compresses_on_worker = False

    def __init__(self, comm: Comm, compressor: Compressor, tensor_sizes, device="cpu", delta=None,
                 local_size: Optional[int] = None, node_path: Optional[str] = None):
        self.node_path = NODE_PATHS[0] if node_path is None else node_path
        if self.node_path not in NODE_PATHS:
            raise ValueError(f"node_path must be one of {NODE_PATHS}, got {node_path!r}")
        node, self.local_size = node_of(comm, local_size)
        self.nodes = comm.size // self.local_size
        self.slices = self.local_size if self.node_path == "slices" else 1
        self.local = comm.split(node, comm.rank)  # the ranks of this node, by local rank
        #: the slice this rank owns, or None
        self.slice = self.local.rank if self.local.rank < self.slices else None
        # the owners of one slice, one a node, ranked by node
        self.across = comm.split(comm.MPI.UNDEFINED if self.slice is None else self.slice, comm.rank)
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        L, B = self.local_size, 4 * self.numel
        self.shared = NodeBuffer(self.local, comm, L * B + sum(self.nbytes), "topology='hierarchical'")
        self.d_slots = self.shared.data[:L * B].view(torch.float32).view(L, self.numel)  # d_i of local rank i
        self.wire = self.shared.data[L * B:L * B + sum(self.nbytes)]  # Δ̃'s wire bytes, every shard in order
        #: where each slice lies in the fused buffer
        self.bounds = [(self.shards[l * self.nodes].start, self.shards[(l + 1) * self.nodes - 1].stop)
                       for l in range(self.slices)]
        self.node_bytes = self.shared_bytes()
        self.node_memory: Optional[ErrorMemory] = None  # this rank's slice of e_n
        self.node_compressor = compressor.for_stream(comm.rank)
        if self.slice is not None:
            start, stop = self.bounds[self.slice]
            self.node_memory = ErrorMemory(stop - start, self.device)
            self.node_d = torch.empty(stop - start, dtype=torch.float32, device=self.device)

    @property
    def servers(self) -> Optional[Comm]:
        return self.across

    @property
    def first_shard(self) -> int:
        return 0 if self.slice is None else self.slice * self.nodes

    def make_shards(self, tensor_sizes):
        return self.split_shards(tensor_sizes, self.nodes * self.slices)

    def wire_bounds(self, l: int) -> Tuple[int, int]:
        """Where slice ``l``'s Δ̃ wire bytes lie in ``wire``."""
        first = l * self.nodes
        return sum(self.nbytes[:first]), sum(self.nbytes[:first + self.nodes])

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        """``payloads``: this rank's d_i, raw, one per shard. Δ̃'s payloads, the same bytes on every rank."""
        mine = self.d_slots[self.local.rank]
        for payload, s in zip(payloads, self.shards):
            mine[s.start:s.stop].copy_(payload["values"])
        self.local.barrier("hierarchical: the node's d_i written")
        if self.slice is not None:
            start, stop = self.bounds[self.slice]
            d = self.node_slice_sum(start, stop)
            d.div_(self.local_size)  # d_n on this slice; then the node's worker error feedback and compression
            first = self.first_shard
            shards = [Shard(s.start - start, s.stop - start, s.block_sizes)
                      for s in self.shards[first:first + self.nodes]]
            node = self.node_memory.step(self.node_compressor, d, window(segments, start, stop), shards,
                                         d_is_scratch=True)
            at, end = self.wire_bounds(self.slice)
            landed = self.exchange_shards(node, segments, out=self.wire[at:end])
            if landed.data_ptr() != self.wire[at:].data_ptr():  # one node: its own bytes
                self.wire[at:end].copy_(landed)
        self.local.barrier("hierarchical: Δ̃ written")
        self.local.count_shared(*self.node_bytes)
        return self.decode_shards(self.wire.split(self.nbytes))

    def node_slice_sum(self, start: int, stop: int) -> torch.Tensor:
        """Σ_i d_i over the node's ranks on [start, stop), added in local rank order, into ``node_d``."""
        slots, d = self.d_slots[:, start:stop], self.node_d
        if self.device.type != "cpu":
            slots = slots.to(self.device)
        if self.local_size == 1:
            return d.copy_(slots[0])
        torch.add(slots[0], slots[1], out=d)
        for i in range(2, self.local_size):
            d.add_(slots[i])
        return d

    def shared_bytes(self) -> Tuple[int, int]:
        """(sent, received): what a step moves through the node's shared memory on this rank (module
        docstring): the others' reads of its d_i and of its slice's Δ̃ bytes, its reads of theirs."""
        L = self.local_size
        d_bytes = [4 * (stop - start) for start, stop in self.bounds]
        wire = [end - at for at, end in map(self.wire_bounds, range(self.slices))]
        mine_d = d_bytes[self.slice] if self.slice is not None else 0
        mine_wire = wire[self.slice] if self.slice is not None else 0
        return (sum(d_bytes) - mine_d + (L - 1) * mine_wire, (L - 1) * mine_d + sum(wire) - mine_wire)

    def memories(self) -> List[Tuple[ErrorMemory, int]]:
        mine = [] if self.node_memory is None else [(self.node_memory, self.bounds[self.slice][0])]
        return super().memories() + mine

    def streams(self) -> List[Compressor]:
        return [self.compressor, self.node_compressor]

    def state_dict(self) -> dict:
        """The server error, and this rank's slice of its node's worker error and compressor stream, where
        it holds them."""
        state = super().state_dict()
        if self.node_memory is not None:
            state.update(node_error=self.node_memory.state_dict(), node_compressor=self.node_compressor.state_dict())
        return state

    def check_state(self, state: dict) -> None:
        super().check_state(state)
        if (self.node_memory is None) != (state.get("node_error") is None):
            raise ValueError(f"rank {self.comm.rank} {'holds' if self.node_memory else 'does not hold'} a node's "
                             f"worker error under 'hierarchical' with local_size={self.local_size}, the checkpoint "
                             f"does not fit: it comes from another topology, rank, node size or node_path")
        if self.node_memory is not None:
            self.node_memory.check_state(state["node_error"])

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.node_memory is not None:
            self.node_memory.load_state_dict(state["node_error"])
            self.node_compressor.load_state_dict(state["node_compressor"])
