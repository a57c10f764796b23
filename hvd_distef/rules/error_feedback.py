"""SPEC §1's update rule, dist-EF-SGDM: the worker's momentum and error feedback, the topology's exchange
and server step, Δ̃ applied with the weight decay's own momentum.

The worker side: ``prepare`` reads the gradients and steps the momentum in one pass (m' into the
momentum's next buffer, d into ``grad``); ``exchange_bucket`` compensates, compresses and keeps the
worker error, and the bucket's topology exchanges the payloads and runs the server step. Where the
compressor can (``Compressor.fuses_worker_step``: blocksign on the CPU with the compiled kernels), the
whole worker side runs before the ranks agree (``step_ahead``), in the pass that reads the gradients,
into spare buffers that the step takes if it goes ahead as computed; and where it can decompress Δ̃
inside the update (``Compressor.fuses_update``), Δ̃ stays compressed until ``descend`` reads it.
Imports ``rules.base`` and the floors below it (kernels, error memories, untouched), never the optimizer.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _kernels
from ..error_feedback import ErrorMemory, Shard, window
from ..kernel_args import Grads, Momentum
from ..payload import Payload
from ..untouched import Untouched
from .base import OVERFLOW, Exchanged, OwnUpdate, Prepared, inverse_scale


class ErrorFeedback(OwnUpdate):
    """dist-EF-SGDM (SPEC §1). ``memory`` is the worker error e_i; ``steps_ahead`` and ``fused_update``
    say which of the compressor's capabilities this optimizer uses (the step taken ahead is not used with
    ``overlap=True``, whose buckets keep their own rollback copies)."""

    name = "ef"
    keeps_errors = True

    def __init__(self, ws, compressor, rank: int, overlap: bool):
        super().__init__(ws, compressor, rank, overlap)
        device = ws.layout.device
        self.memory = ErrorMemory(ws.layout.numel, device)
        self.worker_shards: List[Shard] = [s for b in ws.buckets for s in b.worker_shards]
        self.fused_update = (compressor.fuses_update(device)
                             and all(b.topology.delivers_payloads for b in ws.buckets))
        self.steps_ahead = (self.fused_update and not overlap and self.worker_compressor.name == compressor.name
                            and all(compressor.fuses_worker_step(device, s.numel, s.block_sizes)
                                    for s in self.worker_shards))
        self.received: List[Optional[List[Payload]]] = [None] * len(ws.buckets)  # Δ̃ compressed, per bucket
        self.in_flight: dict = {}  # overlap: bucket -> its exchange still on the wire (``Topology.start_exchange``)

    # --- the worker side ---------------------------------------------------------------------------------
    def prepare(self, first, stop, scale) -> List[str]:
        """The gradients of parameters [first, stop) and, in the same pass, the momentum of SPEC §1:
        m' = μ·m + g into the momentum's next buffer, d = g + μ·m' (nesterov) or m' into ``grad``."""
        layout, inv, m = self.ws.layout, inverse_scale(scale), self.buffers.momentum
        finite = True
        for (lo, hi), group in zip(layout.group_param_bounds, self.ws.groups):
            lo, hi = max(lo, first), min(hi, stop)
            if lo < hi:
                a, b = layout.span(lo, hi)
                finite &= _kernels.gather_momentum(
                    Grads(layout.grads(lo, hi), layout.sizes[lo:hi], inv), self.grad[a:b],
                    Momentum(m.current[a:b], m.next[a:b], [group["momentum"]] * (hi - lo), [group["nesterov"]] * (hi - lo)))
        return [] if finite else layout.nonfinite_grads(first, stop)

    def prepare_step(self, scale) -> Prepared:
        if not (self.steps_ahead and all(g["lr"] != 0 for g in self.ws.groups)):
            return super().prepare_step(scale)
        ahead = self.step_ahead(scale)
        if ahead is not None:
            return Prepared([], ahead=ahead, reread=True)
        nonfinite = self.ws.layout.nonfinite_grads(0, len(self.ws.layout.params))
        if not nonfinite:
            raise ValueError(OVERFLOW)
        return Prepared(nonfinite, reread=True)

    def step_ahead(self, scale) -> Optional[List[Payload]]:
        """``prepare`` and the worker's error step of every shard in one pass over memory, before the
        ranks agree (SPEC §1 as if no parameter were idle): the next momentum and p go to the momentum's
        next buffer and to ``grad`` (the worker error's spare), d is never written out, and no state
        changes: ``ErrorMemory.commit`` takes the step if it goes ahead as computed. Returns the payloads
        of ``worker_shards``, or None where a gradient or block scale is not finite."""
        layout, m, inv, groups = self.ws.layout, self.buffers.momentum, inverse_scale(scale), self.ws.groups
        grads = Grads(layout.grads(0, len(layout.params)), layout.sizes, inv)
        mus = [g["momentum"] for (lo, hi), g in zip(layout.group_param_bounds, groups) for _ in range(lo, hi)]
        nesterovs = [g["nesterov"] for (lo, hi), g in zip(layout.group_param_bounds, groups) for _ in range(lo, hi)]
        segments, compressor = self.segments([]), self.worker_compressor

        def compress(shard: Shard, error: torch.Tensor, error_out: torch.Tensor, unsettled: Optional[Payload]):
            a, b = shard.start, shard.stop
            return compressor.momentum_with_feedback(grads, Momentum(m.current[a:b], m.next[a:b], mus, nesterovs), error,
                                                     error_out, a, shard.block_sizes, window(segments, a, b), unsettled)
        with self.ws.stats.timed("compress"):
            return self.memory.step_ahead(self.worker_shards, self.grad, compress)

    def keeps_speculation(self, idle) -> bool:
        return not idle and all(g["lr"] != 0 for g in self.ws.groups)  # idle or lr = 0: ``untouched``

    # --- the exchange ------------------------------------------------------------------------------------
    def exchange(self, prepared, kept, idle, idle_params, scale) -> List[Untouched]:
        if prepared.ahead is None or idle:
            return super().exchange(prepared, kept, idle, idle_params, scale)
        self.grad = self.memory.commit(self.worker_compressor, self.worker_shards, self.grad, prepared.ahead)
        segments, first = self.segments([]), 0
        for k, bucket in enumerate(self.ws.buckets):
            self.exchange_payloads(k, prepared.ahead[first:first + len(bucket.worker_shards)], segments)
            first += len(bucket.worker_shards)
        return []

    def exchange_bucket(self, k, segments, idle, on_wire=False, zeros_if_refused=False) -> Optional[ValueError]:
        """The worker's error step of bucket k on d in ``grad`` (idle ranges zero), then its exchange.
        ``zeros_if_refused`` (a step every rank agrees on later): where the compressor refuses p (it
        overflowed float32), zeros go out instead, as the other ranks are in this bucket's collectives,
        and the refusal is returned."""
        bucket = self.ws.buckets[k]
        a, b = bucket.start, bucket.stop
        for lo, hi in idle:
            if lo < b and hi > a:
                self.grad[max(lo, a):min(hi, b)].zero_()
        refused = None
        with self.ws.stats.timed("compress"):
            # d is read once: p may be written over it (``grad`` is refilled by the next step)
            try:
                payloads = self.memory.step(self.worker_compressor, self.grad, segments, bucket.worker_shards,
                                            d_is_scratch=True)
            except ValueError as exc:
                if not zeros_if_refused:
                    raise
                refused = exc
                self.grad[a:b].zero_()
                self.memory.clear(a, b)  # the step is put back (``overlap.Rollback``)
                payloads = self.memory.step(self.worker_compressor, self.grad, segments, bucket.worker_shards,
                                            d_is_scratch=True)
        self.exchange_payloads(k, payloads, segments, on_wire)
        return refused

    def exchange_payloads(self, k: int, payloads: List[Payload], segments, on_wire: bool = False) -> None:
        """Bucket k's exchange of this rank's worker payloads: Δ̃ into its slice of ``Workspace.delta``, or
        kept compressed in ``received[k]`` for the update to decompress. ``on_wire``: its last transfer may
        stay on the wire in ``in_flight[k]`` while the next bucket's starts."""
        bucket = self.ws.buckets[k]
        mine = window(segments, bucket.start, bucket.stop)
        with self.ws.stats.timed("exchange"):
            if self.fused_update and on_wire:
                self.in_flight[k] = bucket.topology.start_exchange(payloads, mine)
            elif self.fused_update:
                self.received[k] = bucket.topology.exchange_compressed(payloads, mine)
            else:
                bucket.topology.exchange(payloads, mine)

    def finish_speculation(self) -> None:
        with self.ws.stats.timed("exchange"):
            for k, pending in self.in_flight.items():
                self.received[k] = pending.wait()
        self.in_flight.clear()

    def progress(self) -> None:
        for pending in self.in_flight.values():
            pending.test()

    def untouched(self, idle, idle_params) -> List[Untouched]:
        """Idle parameters keep everything; groups at lr = 0 keep their errors (SPEC §5a)."""
        ws = self.ws
        memories = [(self.memory, 0)] + [(memory, b.start + start) for b in ws.buckets
                                         for memory, start in b.topology.memories()]
        still = [bounds for bounds, g in zip(ws.layout.group_bounds, ws.groups) if g["lr"] == 0]
        return [Untouched(idle, [self.buffers.wd], memories, idle_params), Untouched(still, (), memories)]

    def exchanged(self, expose, has_grad, untouched, scale) -> Exchanged:
        pieces = self.received_pieces(expose) if self.fused_update else None
        return super().exchanged(expose, has_grad, untouched, scale)._replace(pieces=pieces)

    def received_pieces(self, expose: bool) -> Optional[list]:
        """Δ̃ of every bucket as (fused start, payload) in fused order, for the update to decompress; or
        None after decompressing it into ``Workspace.delta`` (to expose it in p.grad, or where some
        payload is not one the update takes: ``Compressor.descends``)."""
        buckets = self.ws.buckets
        pieces = sorted(((b.start + s.start, payload) for b, received in zip(buckets, self.received)
                         for s, payload in zip(b.topology.shards, received)), key=lambda piece: piece[0])
        if not expose and all(self.compressor.descends(payload) for _, payload in pieces):
            return [(start, payload) for start, payload in pieces if payload.numel]
        for bucket, received in zip(buckets, self.received):
            bucket.topology.decompress_shards(received)
        return None

    # --- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "worker_error": self.memory.state_dict()}

    def check_state(self, saved: dict) -> None:
        super().check_state(saved)
        self.memory.check_state(saved.get("worker_error"))

    def load_state_dict(self, saved: dict) -> None:
        super().load_state_dict(saved)
        self.memory.load_state_dict(saved["worker_error"])
