"""AMP: ``hvd_distef.GradScaler``, torch's GradScaler with the inf check agreed by every rank.

``DistributedOptimizer`` takes part in torch's ``_step_supports_amp_scaling`` protocol: under
``scaler.step(opt)`` it unscales the gradients itself before compressing them (the error memories
hold unscaled values) and every rank skips the step when any rank found an inf. The stock
``torch.amp.GradScaler`` then reads the ranks' decision where its ``update()`` looks for it
(``share_found_inf``), so every rank backs off alike and the loss scales stay identical.
``hvd_distef.GradScaler`` makes every rank's ``found_inf`` the maximum over the ranks already in
``unscale_`` (what Horovod gets by allreducing before ``unscale_``), for scripts that read it there.
"""
from __future__ import annotations

import sys
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


def share_found_inf(optimizer) -> None:
    """Some rank found an inf and every rank skips this step: write that into the ``found_inf`` tensors of
    the ``torch.amp.GradScaler`` whose ``step()`` is calling ``optimizer.step()`` (its per-optimizer state,
    which ``update()`` reads to back off), so that every rank's scale changes alike. No scaler: nothing."""
    state = _calling_scaler_state(optimizer)
    if state is not None:
        for found in state["found_inf_per_device"].values():
            found.fill_(1.0)


def _calling_scaler_state(optimizer, depth: int = 16) -> Optional[dict]:
    """The per-optimizer state of the ``torch.amp.GradScaler.step`` that is running ``optimizer.step()``
    (torch's protocol hands the optimizer only the sum of its ``found_inf`` tensors), or None."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code is _SCALER_STEP and frame.f_locals.get("optimizer") is optimizer:
            return frame.f_locals.get("optimizer_state")
        frame = frame.f_back
    return None


_SCALER_STEP = torch.amp.GradScaler.step.__code__


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
