"""AMP: ``hvd_distef.GradScaler``, torch's GradScaler with the inf check agreed by every rank.

``DistributedOptimizer`` takes part in torch's ``_step_supports_amp_scaling`` protocol: under
``scaler.step(opt)`` it unscales the gradients itself before compressing them (the error memories
hold unscaled values) and every rank skips the step when any rank found an inf. With the stock
``torch.amp.GradScaler`` that is all: parameters stay identical, but a rank that saw no inf grows
its own loss scale while the others back off. ``hvd_distef.GradScaler`` also makes every rank's
``found_inf`` the maximum over the ranks, so the scales stay identical (what Horovod gets by
allreducing before ``unscale_``).
"""
from __future__ import annotations

from typing import Optional

import torch


def loss_scale(optimizer) -> Optional[torch.Tensor]:
    """The loss scale torch's GradScaler sets on the optimizer around ``step()`` (its
    ``_step_supports_amp_scaling`` protocol), or None outside AMP."""
    return getattr(optimizer, "grad_scale", None)


def found_inf(optimizer) -> bool:
    """Whether torch's GradScaler found an inf for this step (set around ``step()``, as ``loss_scale``)."""
    found = getattr(optimizer, "found_inf", None)
    return found is not None and bool(found.item() > 0)


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose inf check is collective over a ``DistributedOptimizer``'s ranks
    (same arguments as torch's). With any other optimizer it is torch's scaler."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        comm = getattr(optimizer, "comm", None)
        if comm is not None and hasattr(comm, "max_ints"):  # a hvd_distef.DistributedOptimizer
            optimizer._drain_buckets()  # its buckets still in flight first (overlap): one collective at a time
            mine = int(any(bool(t.item() > 0) for t in per_device.values()))
            if comm.max_ints([mine])[0]:
                for t in per_device.values():
                    t.fill_(1.0)
        return per_device
