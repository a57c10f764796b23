"""The optimizer's statistics: step counters, seconds spent compressing and exchanging, bytes on the wire
(``Comm``'s counters) and the density of recompressed partial sums. Imports nothing of ours but the
types it reads."""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Sequence


class Statistics:
    """Counters of one optimizer: ``steps`` applied, ``skipped_steps`` (a non-finite gradient under
    ``nonfinite="skip"``, AMP's inf), ``redone_steps`` (``overlap=True``: steps whose buckets ``step()``
    exchanged again because something changed after backward), and seconds per phase (``timed``)."""

    def __init__(self):
        self.steps = 0
        self.skipped_steps = 0
        self.redone_steps = 0
        self.seconds: Dict[str, float] = {"compress": 0.0, "exchange": 0.0}

    @contextlib.contextmanager
    def timed(self, what: str):
        """Add the seconds the block takes to ``what`` ("compress" or "exchange")."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def comm_stats(self, comm, bytes_source: str) -> dict:
        """The public ``comm_stats()`` dict: ``comm``'s byte counters, where they come from, the
        counters and the seconds (see ``DistributedOptimizer.comm_stats``)."""
        return {"bytes_sent": comm.bytes_sent, "bytes_received": comm.bytes_received, "bytes_source": bytes_source,
                "shared_memory_bytes_sent": comm.shared_sent, "shared_memory_bytes_received": comm.shared_received,
                "steps": self.steps, "skipped_steps": self.skipped_steps, "redone_steps": self.redone_steps,
                "compress_time_s": self.seconds["compress"], "exchange_time_s": self.seconds["exchange"]}


def partial_sum_density(topologies: Sequence) -> dict:
    """Mean fraction of nonzeros of the partial sums that these topologies recompressed so far, by the
    number of workers' Δ_i each sums (empty where none recompresses a sum)."""
    totals: dict = {}
    for topology in topologies:
        for terms, (nonzeros, elements) in topology.partial_sums.items():
            t = totals.setdefault(terms, [0, 0])
            t[0], t[1] = t[0] + nonzeros, t[1] + elements
    return {terms: nonzeros / elements for terms, (nonzeros, elements) in sorted(totals.items()) if elements}
