"""The topology interface (SPEC §3): how the workers' Δ_i reach the server role and Δ̃ comes back.

Error-feedback topologies cut the fused buffer into ``shards`` (one, or one per rank), receive the
worker's payload for each, run the server step of SPEC §1 where their server role lives, and
return Δ̃. Baselines that replace the update rule say so in ``update_rule`` ("sgd" for stock
allreduce SGDM, "signum" for majority vote) and exchange what that rule needs.

Byte counters are measured, not computed, wherever a topology hands its buffers to MPI's
point-to-point and rooted collectives itself: ``Comm`` counts the bytes of every buffer that leaves
or reaches this rank (gather, broadcast and allgather as the flat trees of point-to-point messages
they stand for); the tests hold them to SPEC §3's formulas. What an allreduce moves inside Horovod
or MPI cannot be counted by us: such a topology says so in ``bytes_source`` (SPEC §5b).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ..comm import Comm, Pending
from ..compressors import Compressor
from ..error_feedback import ErrorMemory, Segments, Shard, window
from ..payload import Payload, layout_nbytes
from ..registry import Registry

REGISTRY = Registry("topology")
#: the rank where a ``RootServer``'s server role lives
ROOT = 0
#: ``Topology.bytes_source``: counted at the MPI boundary, or SPEC §3's ring-allreduce volume
MEASURED = "measured"
RING_FORMULA = "computed (ring formula)"


class Topology:
    name: ClassVar[str] = ""
    #: which update the optimizer applies to what ``exchange`` returns: "ef" (SPEC §1), "sgd", "signum"
    update_rule: ClassVar[str] = "ef"
    #: where ``comm_stats()``'s bytes come from: MEASURED, or a formula (``RING_FORMULA``)
    bytes_source: ClassVar[str] = MEASURED
    #: the optimizer's options the constructor takes by keyword: Horovod's ``op`` and
    #: ``gradient_predivide_factor`` (``op``, ``predivide``), the ranks of a node (``local_size``)
    options: ClassVar[Tuple[str, ...]] = ()
    #: whether the worker compresses Δ_i itself (SPEC §1); else it sends d_i raw and the topology runs the
    #: worker's error feedback where it should be (``hierarchical``: once per node)
    compresses_on_worker: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY.register(cls)

    def __init__(self, comm: Comm, compressor: Compressor, tensor_sizes: Sequence[int],
                 device: torch.device | str = "cpu", delta: Optional[torch.Tensor] = None):
        self.comm = comm
        self.device = torch.device(device)
        # The server role compresses with its own copy (its own random stream, SPEC §2).
        self.compressor = compressor.for_stream(-1)
        self.numel = sum(tensor_sizes)
        self.block_sizes = tuple(compressor.blocks(tensor_sizes))
        self.shards: List[Shard] = self.make_shards(tensor_sizes)
        self.layouts = [compressor.layout(s.numel, s.block_sizes) for s in self.shards]
        self.nbytes = [layout_nbytes(layout) for layout in self.layouts]
        self.server_memory: Optional[ErrorMemory] = None  # set where this rank holds a server error
        self.server_start = 0  # where that server error starts in the fused buffer
        # Δ̃ is decompressed into this buffer every step (no page-faulting allocation per step):
        # ``delta`` when given (the topology's bucket of the optimizer's flat update), else its own.
        # What ``exchange`` returns is valid until the next exchange.
        self.delta = torch.zeros(self.numel, dtype=torch.float32, device=self.device) if delta is None else delta
        # terms -> [nonzeros, elements] of the partial sums of that many workers' Δ_i that this rank
        # recompressed (ring and tree hops; the server's full sum too): how dense they get
        self.partial_sums: Dict[int, List[int]] = {}
        self._buffers: Dict[str, torch.Tensor] = {}  # ``buffer``: receive buffers kept across steps

    def make_shards(self, tensor_sizes: Sequence[int]) -> List[Shard]:
        """How a worker's vector is cut into payloads: one shard by default."""
        return [Shard(0, self.numel, self.block_sizes)]

    def split_shards(self, tensor_sizes: Sequence[int], parts: int) -> List[Shard]:
        """``parts`` contiguous shards of about equal size that keep the compressor's blocks whole.

        Shards cut between blocks; for compressors without blocks, between tensors, and each shard
        is then compressed on its own (e.g. one sign scale per shard).
        """
        units = list(self.block_sizes) if self.compressor.uses_blocks else [n for n in tensor_sizes if n > 0]
        members: List[List[int]] = [[] for _ in range(parts)]
        offset = 0
        for n in units:
            # a unit goes to the shard where its midpoint falls
            members[min(parts - 1, (2 * offset + n) * parts // (2 * max(self.numel, 1)))].append(n)
            offset += n
        shards, start = [], 0
        for units_j in members:
            size = sum(units_j)
            shards.append(Shard(start, start + size, tuple(self.compressor.blocks(units_j))))
            start += size
        return shards

    def exchange(self, payloads: List[Payload], segments: Segments) -> torch.Tensor:
        """Send this worker's Δ_i (one payload per shard); return Δ̃, bit-identical on every rank
        (float32 [numel], in ``self.delta``: valid until the next exchange)."""
        return self.decompress_shards(self.exchange_compressed(payloads, segments))

    def exchange_compressed(self, payloads: List[Payload], segments: Segments) -> List[Payload]:
        """``exchange`` up to Δ̃'s wire bytes: Δ̃ as one payload per shard, the same bytes on every rank
        (the optimizer may decompress them inside its update). Topologies whose result is not that
        (``allgather``, the baselines) override ``exchange`` instead."""
        raise NotImplementedError

    def start_exchange(self, payloads: List[Payload], segments: Segments) -> Pending:
        """``exchange_compressed`` with its last transfer possibly still on the wire, so that the next
        bucket's can start meanwhile (``overlap=True``: SPEC §4); its ``wait()`` gives Δ̃'s payloads.
        Here the whole exchange, done."""
        done = self.exchange_compressed(payloads, segments)
        return Pending(lambda: done, lambda: True)

    @property
    def delivers_payloads(self) -> bool:
        """Whether ``exchange_compressed`` gives Δ̃ (this class does not override ``exchange``)."""
        return type(self).exchange is Topology.exchange

    # --- shared pieces -------------------------------------------------------------------------
    def buffer(self, key: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` for what this topology receives as ``key``, allocated once and
        reused every step (a fresh one of a gradient's size page-faults every step: more time than
        the arithmetic). What was received in it is valid until the next exchange."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != nbytes:
            buf = self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    def landing(self, shard: int) -> torch.Tensor:
        """Where Δ̃'s wire bytes of ``shard`` are received: straight into its slice of ``self.delta``
        where the payload is the float32 vector itself (``none``; a raw blocksign shard), so that
        decompressing it is no copy; else a kept buffer."""
        s = self.shards[shard]
        if self.raw(shard):
            return self.delta[s.start:s.stop].view(torch.uint8)
        return self.buffer(f"delta{shard}", self.nbytes[shard])

    def raw(self, shard: int) -> bool:
        """Whether ``shard``'s payload is its float32 vector itself (and not empty)."""
        s = self.shards[shard]
        return s.numel > 0 and self.layouts[shard] == (("values", torch.float32, s.numel),)

    def scratch(self, shard: int = 0) -> torch.Tensor:
        """A float32 vector of ``shard``'s length for the server step's mean and p̃ (and a reduction's
        partial sums): its slice of ``self.delta``, which holds nothing yet (Δ̃ is decompressed into it
        last)."""
        s = self.shards[shard]
        return self.delta[s.start:s.stop]

    def note_partial_sum(self, partial: torch.Tensor, terms: int) -> None:
        """Count the nonzeros of a partial sum of ``terms`` workers' Δ_i about to be compressed."""
        entry = self.partial_sums.setdefault(terms, [0, 0])
        entry[0] += int(torch.count_nonzero(partial))
        entry[1] += partial.numel()

    def decode(self, buf: torch.Tensor, shard: int = 0) -> Payload:
        """A shard's payload from its wire bytes."""
        s = self.shards[shard]
        return Payload.from_bytes(buf, self.layouts[shard], s.numel, s.block_sizes, self.device)

    def decode_many(self, buf: torch.Tensor, shard: int = 0, count: Optional[int] = None) -> List[Payload]:
        """``count`` (default: the ranks) equal-size payloads of one shard concatenated on the wire, in order."""
        n = self.nbytes[shard]
        return [self.decode(buf[i * n:(i + 1) * n], shard) for i in range(self.comm.size if count is None else count)]

    def server_compress(self, mean: torch.Tensor, segments: Segments, shard: int = 0) -> Payload:
        """The server step on a mean already computed (by a reduction tree or ring), on one shard;
        ``mean`` is scratch (p̃ may be written over it)."""
        s = self.shards[shard]
        return self.server_memory.step(self.compressor, mean, window(segments, s.start, s.stop),
                                       [Shard(0, s.numel, s.block_sizes)], d_is_scratch=True)[0]

    def decode_shards(self, bufs: List[torch.Tensor]) -> List[Payload]:
        """The payload of every shard from its wire bytes, in shard order."""
        return [self.decode(buf, j) for j, buf in enumerate(bufs)]

    def decompress_shards(self, payloads: List[Payload]) -> torch.Tensor:
        """Δ̃ from the payload of every shard, into ``self.delta``."""
        for payload, s in zip(payloads, self.shards):
            self.compressor.decompress_into(payload, self.delta[s.start:s.stop])
        return self.delta

    def server_reduce(self, payloads: List[Payload], segments: Segments, shard: int = 0) -> Payload:
        """SPEC §1, server: p̃ = (1/M)·Σ_i Δ_i + (η_{t-1}/η_t)·ẽ;  Δ̃ = C(p̃);  ẽ <- p̃ − Δ̃, on one shard."""
        s = self.shards[shard]
        return self.server_memory.mean_step(self.compressor, payloads, window(segments, s.start, s.stop),
                                            s.block_sizes, scratch=self.scratch(shard))

    def memories(self) -> List[Tuple[ErrorMemory, int]]:
        """The error memories this rank holds for the bucket, each with where it starts in the bucket: what
        a step that does not go ahead puts back (``overlap.Rollback``, ``untouched``)."""
        return [] if self.server_memory is None else [(self.server_memory, self.server_start)]

    def streams(self) -> List[Compressor]:
        """The compressors whose random streams this rank's share of the exchange advances."""
        return [self.compressor]

    def state_dict(self) -> dict:
        """The server error where this rank holds one."""
        return {} if self.server_memory is None else {"server_error": self.server_memory.state_dict()}

    def check_state(self, state: dict) -> None:
        """Raise unless ``state`` (from ``state_dict``) fits this rank (changes nothing)."""
        if self.server_memory is None:
            if state.get("server_error") is not None:
                raise ValueError(f"rank {self.comm.rank} holds no server error under {self.name!r}, but the "
                                 f"checkpoint gives it one: it comes from another topology or rank")
            return
        if state.get("server_error") is None:
            raise ValueError(f"the checkpoint has no server error for rank {self.comm.rank} under {self.name!r}: "
                             f"it comes from another topology or rank")
        self.server_memory.check_state(state["server_error"])

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        if self.server_memory is not None:
            self.server_memory.load_state_dict(state["server_error"])


class ShardPerRank(Topology):
    """The server role split over the ranks of ``servers`` (every rank: ``sharded`` and ``ring``; the ranks of
    one slice across nodes: ``hierarchical``): one shard of whole blocks each, rank j of them holding the
    server error of shard ``first_shard`` + j."""

    def __init__(self, comm, compressor, tensor_sizes, device="cpu", delta=None):
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        if self.servers is not None:
            mine = self.shards[self.first_shard + self.servers.rank]
            self.server_memory = ErrorMemory(mine.numel, self.device)
            self.server_start = mine.start

    @property
    def servers(self) -> Optional[Comm]:
        """The ranks among which the server role of ``servers.size`` consecutive shards is split (None on a
        rank that holds none of it)."""
        return self.comm

    @property
    def first_shard(self) -> int:
        """The first of the shards that ``servers`` exchange."""
        return 0

    def make_shards(self, tensor_sizes):
        return self.split_shards(tensor_sizes, self.comm.size)

    def exchange_shards(self, payloads: List[Payload], segments: Segments,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sharded exchange among ``servers`` of their shards (``payloads``: one per shard, from
        ``first_shard`` on): each sends shard j to rank j (Alltoallv), rank j averages the payloads of its
        shard and runs the server step on it with its own server error, and an Allgatherv hands every one
        of them all those compressed Δ̃ shards: their wire bytes, in order, in ``out`` where given (else in
        ``landing_all``; a world of one returns its own bytes)."""
        comm, first = self.servers, self.first_shard
        sizes = self.nbytes[first:first + comm.size]
        me = first + comm.rank
        parts = [p.to_bytes() for p in payloads]
        send = parts[0] if len(parts) == 1 else torch.cat(parts, out=self.buffer("send", sum(sizes)))
        mine = comm.alltoallv(send, sizes, [self.nbytes[me]] * comm.size,  # shard `me` from every worker
                              out=self.buffer("shard", comm.size * self.nbytes[me]) if comm.size > 1 else None)
        server = self.server_reduce(self.decode_many(mine, me, comm.size), segments, me)  # server step, shard `me`
        # Δ̃'s shards land where they are decompressed (``landing_all``); where shard `me` of a raw
        # payload is already there (the server step's scratch), it is not copied
        return comm.allgatherv(server.to_bytes(), sizes, out=self.landing_all() if out is None else out)

    def landing_all(self) -> torch.Tensor:
        """One buffer for every shard's Δ̃ bytes in order: ``self.delta`` itself where each shard is a
        float32 vector, else a kept buffer."""
        if all(self.raw(j) for j in range(len(self.shards))):
            return self.delta.view(torch.uint8)
        return self.buffer("allgather", sum(self.nbytes))


class RootServer(Topology):
    """The server role on one rank, ``ROOT`` (``ps``, ``tree``, ``majority_vote``): its server error lives
    there (where ``keeps_server_error``), and ``gather_reduce`` is its one collective pattern: every
    rank's bytes gathered on the root, where the server turns them into what every rank gets back."""

    #: whether the server keeps an error memory (SPEC §1's ẽ: the error-feedback topologies)
    keeps_server_error: ClassVar[bool] = True

    def __init__(self, comm, compressor, tensor_sizes, device="cpu", delta=None):
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        if comm.rank == ROOT and self.keeps_server_error:
            self.server_memory = ErrorMemory(self.numel, self.device)

    def gather_reduce(self, mine: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor],
                      into: torch.Tensor) -> torch.Tensor:
        """Every rank's ``mine`` (equal sizes) gathered on ``ROOT`` into a kept buffer, where ``reduce`` of
        them (concatenated in rank order) gives the bytes every rank is to get; elsewhere ``into``, the
        buffer they will arrive in."""
        comm = self.comm
        root = comm.rank == ROOT
        gathered = comm.gather(mine, ROOT, out=self.buffer("gather", comm.size * mine.numel())
                               if root and comm.size > 1 else None)
        return reduce(gathered) if root else into


def get_topology(name: str) -> Type[Topology]:
    """The topology class users name in ``topology=``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown topology {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]
