"""The step-time model: each method's step as phases in sequence, each phase charged its compute
(device profile), its collective (``costs.py``) and its network stack's CPU time.

A phase of communication takes latency + max(wire, stack): the link's bytes over its bandwidth, or the
CPU time the ranks' network stack needs for those bytes (TCP copies every byte; ``transport_gbs``),
whichever binds; the two overlap (the stack copies while the link drains). A method that exchanges bucket
by bucket during backward (stock Horovod always; ours with ``overlap=True``) hides its exchange (the
optimizer's passes and its communication) behind the backward pass, up to the backward's time
(``backward_share`` of the forward + backward): the step is compute + exchange − hidden. The last bucket
cannot hide in truth, so for a method that overlaps this is a lower bound. Ranks that share a
machine's cores slow each other down: a pass run by all ranks at once takes its one-rank time times
``max(1, ranks on the machine / cores)`` (on a cluster with a core per rank: times 1); a pass run by one
rank alone (the ``ps`` server) takes its one-rank time.

Methods (SPEC §3, and the new ``hierarchical``: raw float32 sums in shared memory inside a node, then
``sharded`` across nodes, local rank l carrying slice l of its node's payload):

- ``horovod`` / ``horovod-fp16``: stock Horovod: ring allreduce of 4·d (2·d) bytes, SGD with momentum.
- ``ps``: flat gather of M payloads s on rank 0, its server step, binomial broadcast of Δ̃ (s bytes).
- ``sharded``: alltoallv of payload shards, the server step on d/M per rank, allgatherv of Δ̃'s shards.
- ``hierarchical``: as said above; cross-node bytes about 2·(N−1)/N·s per node each way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, NamedTuple, Optional

from . import costs
from .device import DeviceProfile

METHODS = ("horovod", "horovod-fp16", "ps", "sharded", "hierarchical")
COMPRESSED = ("ps", "sharded", "hierarchical")
STOCK = ("horovod", "horovod-fp16")
#: latency of a message between two ranks of one node through shared memory, s
SHM_ALPHA = 1e-6


@dataclass(frozen=True)
class Setup:
    """One configuration to predict. ``numel``: parameters d; ``blocks``: blocksign blocks B (one per
    tensor); ``ranks``: M; ``local``: ranks per node L (M a multiple of it); ``alpha``: s per message
    between nodes; ``bandwidth``: bytes/s of a node's link each way; ``compute_s``: forward + backward;
    ``ranks_per_machine``: ranks sharing one machine's ``device.cores`` (default: a node's); ``overlap``:
    whether our methods exchange during backward (``DistributedOptimizer(overlap=True)``; stock Horovod
    always does); ``backward_share``: the backward's part of ``compute_s``."""

    numel: int
    blocks: int
    ranks: int
    local: int
    alpha: float
    bandwidth: float
    device: DeviceProfile
    compute_s: float = 0.0
    ranks_per_machine: Optional[int] = None
    allreduce: str = "ring"
    overlap: bool = False
    backward_share: float = 2 / 3

    def __post_init__(self):
        if self.allreduce not in costs.ALLREDUCE:
            raise ValueError(f"allreduce {self.allreduce!r}: expected one of {', '.join(costs.ALLREDUCE)}")
        if self.ranks < 1 or self.local < 1 or self.ranks % self.local:
            raise ValueError(f"{self.ranks} ranks do not fill nodes of {self.local} ranks per node")
        if self.bandwidth <= 0 or self.alpha < 0 or self.numel < 1:
            raise ValueError("bandwidth must be > 0, latency >= 0 and the model must have parameters")
        if not 0 <= self.backward_share <= 1:
            raise ValueError(f"backward_share must lie in [0, 1], got {self.backward_share}")

    @property
    def nodes(self) -> int:
        return self.ranks // self.local

    @property
    def net(self) -> tuple:
        """(alpha, bandwidth) of the links the collectives cross: the network's, or on one node shared
        memory (a copy: memory_gbs / 2 each way)."""
        if self.nodes > 1:
            return self.alpha, self.bandwidth
        return SHM_ALPHA, self.device.memory_gbs * 1e9 / 2

    @property
    def machine(self) -> int:
        """Ranks sharing one machine's cores."""
        return self.local if self.ranks_per_machine is None else self.ranks_per_machine

    @property
    def crowding(self) -> float:
        """How many ranks share one core when they all compute: max(1, ranks on a machine / cores)."""
        return max(1.0, self.machine / self.device.cores)

    @property
    def payload(self) -> int:
        return costs.sign_payload_bytes(self.numel, self.blocks)


class Breakdown(NamedTuple):
    """Where one method's step goes, s (``link_bytes``: bytes on the busiest node link, busier way;
    ``hidden``: the part of cpu + communication hidden behind the backward pass)."""

    method: str
    compute: float
    cpu: float
    wire: float
    stack: float
    latency: float
    link_bytes: float
    hidden: float
    total: float


class _Step:
    """Accumulates the phases of one method's step."""

    def __init__(self, setup: Setup, method: str):
        self.setup, self.method = setup, method
        self.cpu = self.wire = self.stack = self.latency = self.link_bytes = self.comm = 0.0

    def passes(self, seconds: float, all_ranks: bool = True) -> None:
        """A pass of ``seconds`` on one rank, run by every rank at once (or by one rank alone)."""
        self.cpu += seconds * (self.setup.crowding if all_ranks else 1.0)

    def collective(self, cost: costs.Cost, stack_bytes: float) -> None:
        """A collective; ``stack_bytes``: bytes the busiest core's network stack sends plus receives."""
        stack = stack_bytes / (self.setup.device.transport_gbs * 1e9)
        self.wire += cost.wire
        self.stack += stack
        self.latency += cost.latency
        self.link_bytes += cost.link_bytes
        self.comm += cost.latency + max(cost.wire, stack)

    def done(self) -> Breakdown:
        setup = self.setup
        overlaps = self.method in STOCK or setup.overlap
        hidden = min(setup.backward_share * setup.compute_s, self.cpu + self.comm) if overlaps else 0.0
        total = setup.compute_s + self.cpu + self.comm - hidden
        return Breakdown(self.method, setup.compute_s, self.cpu, self.wire, self.stack, self.latency,
                         self.link_bytes, hidden, total)


def _ns(ns_per_element: float, numel: float) -> float:
    return ns_per_element * numel * 1e-9


def _server(setup: Setup, numel: float, payloads: int) -> float:
    dev = setup.device
    return _ns(dev.server_ns + (payloads - 1) * dev.server_payload_ns, numel)


def _horovod(setup: Setup, step: _Step, width: int) -> None:
    dev, n = setup.device, width * setup.numel
    step.passes(_ns(dev.stock_ns if width == 4 else dev.fp16_ns, setup.numel))
    m = setup.ranks
    step.passes(3 * (m - 1) / m * n / (dev.memory_gbs * 1e9))  # the reduction: read two, write one
    cost = costs.ALLREDUCE[setup.allreduce](n, m, *setup.net)
    step.collective(cost, 2 * cost.link_bytes * setup.crowding)


def _ps(setup: Setup, step: _Step) -> None:
    dev, s, d = setup.device, setup.payload, setup.numel
    n, local = setup.nodes, setup.local
    step.passes(_ns(dev.worker_update_ns, d))
    gather = costs.flat_gather(s, n, local, *setup.net)
    # the root's stack receives every off-node payload; off-node senders sharing its machine copy theirs out
    senders = max(0, setup.machine - local)
    step.collective(gather, max(gather.link_bytes, (gather.link_bytes + senders * s) / dev.cores))
    step.passes(_server(setup, d, setup.ranks), all_ranks=False)
    bcast = costs.binomial_bcast(s, n, *setup.net)
    # the root sends in every round; a machine holding every node copies each of the N−1 messages twice
    everyone = 2 * (n - 1) * s if setup.machine > local else bcast.link_bytes
    step.collective(bcast, max(bcast.link_bytes, everyone / dev.cores))


def _sharded(setup: Setup, step: _Step) -> None:
    dev, s, d, m = setup.device, setup.payload, setup.numel, setup.ranks
    step.passes(_ns(dev.worker_update_ns, d))
    a2a = costs.alltoallv(s, setup.nodes, setup.local, *setup.net)
    step.collective(a2a, 2 * a2a.link_bytes / setup.local * setup.crowding)
    step.passes(_server(setup, d / m, m))
    gather = costs.ring_allgatherv(s, m, *setup.net)
    step.collective(gather, 2 * gather.link_bytes * setup.crowding)


def _hierarchical(setup: Setup, step: _Step) -> None:
    dev, s, d = setup.device, setup.payload, setup.numel
    n, local = setup.nodes, setup.local
    step.passes(_ns(dev.worker_update_ns, d))
    if local > 1:  # write d_i to shared memory, sum slice l over the node's ranks (memory passes)
        step.passes((4 * d + (local + 1) * 4 * d / local) / (dev.memory_gbs * 1e9))
        step.latency += 2 * SHM_ALPHA
        step.comm += 2 * SHM_ALPHA
    step.passes(_server(setup, d / local, 1))  # the node's error feedback and compression of slice l
    a2a = costs.alltoallv(s / local, n, 1, *setup.net)
    # the node's ``local`` ranks send their slices at once through the node's link
    a2a = a2a._replace(wire=a2a.wire * local, link_bytes=a2a.link_bytes * local)
    step.collective(a2a, 2 * a2a.link_bytes / local * setup.crowding)
    step.passes(_server(setup, d / (local * n), n))
    gather = costs.ring_allgatherv(s / local, n, *setup.net)
    gather = gather._replace(wire=gather.wire * local, link_bytes=gather.link_bytes * local)
    step.collective(gather, 2 * gather.link_bytes / local * setup.crowding)


_METHODS: Dict[str, Callable[[Setup, _Step], None]] = {
    "horovod": lambda setup, step: _horovod(setup, step, 4),
    "horovod-fp16": lambda setup, step: _horovod(setup, step, 2),
    "ps": _ps, "sharded": _sharded, "hierarchical": _hierarchical}


def predict(setup: Setup, method: str) -> Breakdown:
    """The predicted step of ``method`` (one of ``METHODS``) in ``setup``."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    step = _Step(setup, method)
    _METHODS[method](setup, step)
    return step.done()


def best(setup: Setup, methods) -> Breakdown:
    """The fastest of ``methods`` in ``setup``."""
    return min((predict(setup, m) for m in methods), key=lambda b: b.total)


def pays(setup: Setup, stock: str, compressed=COMPRESSED) -> bool:
    """Whether the best compressed method is strictly faster than ``stock`` in ``setup`` (a tie does not pay)."""
    return best(setup, compressed).total < predict(setup, stock).total * (1 - 1e-9)


def crossover(setup: Setup, stock: str, compressed=COMPRESSED, low: float = 1e6 / 8,
              high: float = 1e13 / 8, tol: float = 1e-4) -> Optional[float]:
    """The link bandwidth (bytes/s) above which compression stops paying against ``stock`` (``pays``), by
    bisection on log(bandwidth) over [low, high]; None when the answer is the same over the whole range."""
    def paying(bw: float) -> bool:
        return pays(replace(setup, bandwidth=bw), stock, compressed)
    if paying(low) == paying(high):
        return None
    lo, hi = math.log(low), math.log(high)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if paying(math.exp(mid)) == paying(low):
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def table(setup: Setup, methods=METHODS) -> List[Breakdown]:
    return [predict(setup, m) for m in methods]
