"""Signum with majority vote (Bernstein et al. 2019), a baseline (SPEC §3): the worker's momentum
m = μ·m + (1−μ)·g and its packed signs in one pass, the topology's vote, then x = x − η·(vote + λ·x).
Imports ``rules.base`` and the floors below it (kernels, untouched), never the optimizer."""
from __future__ import annotations

import torch

from .. import _kernels
from ..untouched import Untouched
from .base import OwnUpdate


class Signum(OwnUpdate):
    name = "signum"
    momentum_of_decay = False

    def exchange_bucket(self, k, segments, idle, on_wire=False, zeros_if_refused=False) -> None:
        bucket = self.ws.buckets[k]
        with self.ws.stats.timed("compress"):
            signs = self.momentum_signs(bucket.start, bucket.stop)
        with self.ws.stats.timed("exchange"):
            bucket.topology.exchange(signs)

    def momentum_signs(self, a: int, b: int) -> torch.Tensor:
        """m' = μ·m + (1−μ)·g (g in ``grad[a:b]``) into the momentum's next buffer, in one pass that also
        packs the signs to send (of m', or of g where μ = 0); returns them."""
        m = self.buffers.momentum
        segments = [(max(start, a) - a, min(stop, b) - a, group["momentum"])
                    for (start, stop), group in zip(self.ws.layout.group_bounds, self.ws.groups)
                    if start < b and stop > a]
        return _kernels.signum_momentum(self.grad[a:b], m.current[a:b], m.next[a:b], segments)

    def untouched(self, idle, idle_params):
        """Idle parameters keep their value and weight-decay buffer (SPEC §5a)."""
        return [Untouched(idle, [self.buffers.wd], (), idle_params)]
