"""The stock allreduce SGDM baseline (``topology="allreduce"``): the gradients averaged by the topology,
then torch's own SGD update on them, with torch's per-parameter momentum buffers (SPEC §3). Imports
``rules.base`` and torch, never the optimizer."""
from __future__ import annotations

import torch
from torch.optim.sgd import sgd as functional_sgd

from .base import Exchanged, UpdateRule


class StockSGD(UpdateRule):
    """Horovod's meaning everywhere: a NaN propagates by default (``nonfinite="propagate"``), p.grad holds
    the averaged gradient after ``synchronize()``, the state dict is torch's SGD's, and each rank steps
    with its own param groups' hyper-parameters (Horovod's ``test_broadcast_state_options``)."""

    name = "sgd"
    nonfinite_default = "propagate"
    allows_propagate = True
    torch_state = True
    own_hyperparameters = True

    def keeps_speculation(self, idle) -> bool:
        return True  # an idle parameter's gradient stays None: torch's SGD leaves it alone

    def exchange_bucket(self, k, segments, idle, on_wire=False, zeros_if_refused=False) -> None:
        """The average of bucket k's gradients over the ranks, in place in ``grad`` (Horovod's allreduce
        runs in place there: no copy)."""
        bucket = self.ws.buckets[k]
        a, b = bucket.start, bucket.stop
        with self.ws.stats.timed("exchange"):
            averaged = bucket.topology.exchange(self.grad[a:b])
        if averaged.data_ptr() != self.grad[a:b].data_ptr():
            self.grad[a:b].copy_(averaged)

    def exchanged(self, expose, has_grad, untouched, scale) -> Exchanged:
        if not self.grads_as_averaged(has_grad, scale):
            self.ws.layout.write_grads(self.grad, has_grad)
        return Exchanged(None, untouched, False)

    def grads_as_averaged(self, has_grad, scale) -> bool:
        """Whether p.grad already holds what the allreduce gave: one rank, whose average is its own
        gradient, read unscaled (no AMP scale) from dense gradients where it has them; then writing
        ``grad`` back into p.grad would copy each gradient onto itself."""
        return (self.ws.comm_size == 1 and scale is None
                and all((p.grad is not None and not p.grad.is_sparse) == h
                        for p, h in zip(self.ws.layout.params, has_grad)))

    def apply(self, done, optimizer) -> None:
        """torch's own SGD update on the averaged p.grad (what ``torch.optim.SGD.step`` runs, without
        running the step hooks a second time)."""
        for group in self.ws.groups:
            params, grads, buffers = [], [], []
            has_sparse = optimizer._init_group(group, params, grads, buffers)
            functional_sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                           lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                           maximize=group["maximize"], has_sparse_grad=has_sparse, foreach=group["foreach"],
                           fused=group["fused"])
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers):
                    optimizer.state[p]["momentum_buffer"] = buf

    def initialize_state(self, state: dict) -> None:
        """torch's momentum buffers: zeros (m = μ·0 + g = g, as torch's first step), None at momentum 0."""
        for group, params in zip(self.ws.groups, self.ws.layout.group_params):
            for p in params:
                if state[p].get("momentum_buffer") is None:
                    state[p]["momentum_buffer"] = torch.zeros_like(p) if group["momentum"] != 0 else None
