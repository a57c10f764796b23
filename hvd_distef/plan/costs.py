"""The alpha-beta cost of each collective the methods use, and SPEC §3's bytes: pure functions.

Units everywhere: seconds, bytes, bytes per second. A link is (``alpha``: the latency of one message, s;
``bandwidth``: bytes/s each way, full duplex). A collective's cost is split into its latency term
(messages on the critical path times alpha) and its bandwidth term (bytes on the busiest link divided by
the bandwidth), so that a report can say where the time goes.

Ranks are placed in ``nodes`` nodes of ``local`` consecutive ranks (M = nodes·local); inside a node
ranks talk through shared memory, which these functions do not charge (``model.py`` charges it as
memory passes). The algorithms are the textbook ones (Thakur, Rabenseifner & Gropp 2005):
ring allreduce and allgather, flat gather, binomial-tree broadcast, linear alltoall.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class Cost(NamedTuple):
    """The time of one collective: ``latency`` (s, messages times alpha), ``wire`` (s, bytes on the
    busiest link over the bandwidth) and ``link_bytes`` (those bytes: what the busiest node link carries
    in its busier direction)."""

    latency: float
    wire: float
    link_bytes: float

    @property
    def total(self) -> float:
        return self.latency + self.wire


def sign_payload_bytes(numel: int, blocks: int) -> int:
    """SPEC §2/§3: s = ceil(d/8) + 4·B bytes (packed signs, one float32 scale per block)."""
    return math.ceil(numel / 8) + 4 * blocks


def ring_allreduce(nbytes: float, ranks: int, alpha: float, bandwidth: float) -> Cost:
    """Ring allreduce of ``nbytes`` per rank: 2(M−1) messages, 2(M−1)/M·nbytes each way on every link
    (also on a node's link when ranks are placed consecutively: the ring crosses it once each way)."""
    if ranks <= 1:
        return Cost(0.0, 0.0, 0.0)
    moved = 2 * (ranks - 1) / ranks * nbytes
    return Cost(2 * (ranks - 1) * alpha, moved / bandwidth, moved)


def halving_doubling_allreduce(nbytes: float, ranks: int, alpha: float, bandwidth: float) -> Cost:
    """Rabenseifner's allreduce (recursive halving reduce-scatter, recursive doubling allgather; Open MPI's
    choice for large messages): the ring's bytes, 2·ceil(log2 M) messages."""
    ring = ring_allreduce(nbytes, ranks, alpha, bandwidth)
    return ring._replace(latency=2 * math.ceil(math.log2(ranks)) * alpha if ranks > 1 else 0.0)


ALLREDUCE = {"ring": ring_allreduce, "halving-doubling": halving_doubling_allreduce}


def flat_gather(nbytes: float, nodes: int, local: int, alpha: float, bandwidth: float) -> Cost:
    """Every rank sends ``nbytes`` to the root at once: the root node's link receives (M − local)·nbytes;
    one message latency (they overlap)."""
    if nodes * local <= 1:
        return Cost(0.0, 0.0, 0.0)
    moved = (nodes - 1) * local * nbytes
    return Cost(alpha, moved / bandwidth, moved)


def binomial_bcast(nbytes: float, nodes: int, alpha: float, bandwidth: float) -> Cost:
    """Broadcast of ``nbytes`` along a binomial tree of the nodes: ceil(log2 N) rounds, each one message
    of ``nbytes`` on the link of the node that sends it (inside a node, shared memory)."""
    if nodes <= 1:
        return Cost(0.0, 0.0, 0.0)
    rounds = math.ceil(math.log2(nodes))
    return Cost(rounds * alpha, rounds * nbytes / bandwidth, rounds * nbytes)


def alltoallv(nbytes: float, nodes: int, local: int, alpha: float, bandwidth: float) -> Cost:
    """Each of M ranks sends 1/M of its ``nbytes`` to every other rank (linear: M−1 messages each); a
    node's link carries, each way, what its ``local`` ranks send off the node: local·(N−1)/N·nbytes."""
    ranks = nodes * local
    if ranks <= 1:
        return Cost(0.0, 0.0, 0.0)
    moved = local * (nodes - 1) / nodes * nbytes
    return Cost((ranks - 1) * alpha, moved / bandwidth, moved)


def ring_allgatherv(nbytes: float, ranks: int, alpha: float, bandwidth: float) -> Cost:
    """Ring allgather of M pieces that add up to ``nbytes``: M−1 messages, (M−1)/M·nbytes each way on
    every link (a node's link too, ranks placed consecutively)."""
    if ranks <= 1:
        return Cost(0.0, 0.0, 0.0)
    moved = (ranks - 1) / ranks * nbytes
    return Cost((ranks - 1) * alpha, moved / bandwidth, moved)


def spec_bytes(topology: str, numel: int, blocks: int, ranks: int) -> dict:
    """SPEC §3's bytes per step: sent by a non-root rank and received by rank 0, for ``allreduce``
    (float32 ring), ``ps`` and ``sharded`` (sign payload s)."""
    s = sign_payload_bytes(numel, blocks)
    if topology == "allreduce":
        v = 2 * (ranks - 1) / ranks * 4 * numel
        return {"sent_by_non_root": v, "received_by_root": v}
    if topology == "ps":
        return {"sent_by_non_root": s, "received_by_root": (ranks - 1) * s}
    if topology == "sharded":
        v = 2 * (ranks - 1) / ranks * s
        return {"sent_by_non_root": v, "received_by_root": v}
    raise ValueError(f"SPEC §3 gives bytes for allreduce, ps and sharded, not {topology!r}")
