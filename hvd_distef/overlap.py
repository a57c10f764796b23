"""``overlap=True``: the buckets exchanged during backward (SPEC §4), what they assumed, and what is put
back when the step cannot keep their work. Absent when ``overlap=False``.

Once the last backward pass of a step has completed a bucket, the pipeline's thread (``buckets.
BucketPipeline``) runs the rule's worker side, exchange and server step on it (``speculate``), with the
lr, momentum and loss scale of the last step. ``step()`` then drains the pipeline and asks ``outcome``
what the buckets found; when any rank's buckets do not stand (a gradient, hyper-parameter or loss scale
changed after backward, a NaN, a failure) or the step needs what they could not do (an idle parameter,
an lr of 0), every rank puts their changes back (``Rollback``) and the step is done again as without
overlap. May import the floors below (buckets, rules, error memories), never the optimizer.
"""
from __future__ import annotations

import copy
import functools
import weakref
from typing import Callable, List, Optional, Sequence

import torch

from .buckets import Bucket, BucketPipeline
from .error_feedback import ErrorMemory, Segments
from .fused import FusedLayout
from .rules.base import OVERFLOW, Prepared, UpdateRule

class Speculation:
    """What the buckets exchanged during backward used, to check at ``step()``."""

    def __init__(self, scale: Optional[float], hyperparameters: list, segments: Segments):
        self.scale, self.hyperparameters, self.segments = scale, hyperparameters, segments
        self.grads: dict = {}       #: parameter -> (its gradient tensor when read, that tensor's version)
        self.nonfinite: List[str] = []
        self.failure: Optional[Exception] = None


class Rollback:
    """The state that the buckets exchanged during backward change before every rank has agreed on the
    step: worker and server errors and the compressors' random streams, copied bucket by bucket into
    buffers allocated once, and put back when the step is skipped, raises, or is redone (SPEC §5a: a step
    that does not go ahead changes nothing). The momentum needs nothing: the step writes it beside the
    current one (``fused.DoubleBuffer``).

    Args:
        worker_memory: the worker's error memory over the fused buffer, or None.
        bucket_memories: per bucket, the error memories its topology holds on this rank (``Topology.memories``).
        streams: per bucket, the compressors its topology advances (``Topology.streams``);
            ``worker_compressor`` the worker's.
    """

    def __init__(self, worker_memory: Optional[ErrorMemory], bucket_memories: Sequence[Sequence[ErrorMemory]],
                 worker_compressor, streams: Sequence[Sequence]):
        self._worker = worker_memory
        self._worker_copy = None if worker_memory is None else torch.zeros_like(worker_memory.error)
        self._memories = [list(memories) for memories in bucket_memories]
        self._copies = [[torch.zeros_like(m.error) for m in memories] for memories in self._memories]
        self._worker_compressor = worker_compressor
        self._streams = [list(compressors) for compressors in streams]
        self._undo: list = []

    def begin(self) -> None:
        """A new step: nothing kept yet but the worker compressor's stream."""
        state = copy.deepcopy(self._worker_compressor.state_dict())
        self._undo = [lambda: self._worker_compressor.load_state_dict(state)]

    def keep(self, bucket: int, start: int, stop: int) -> None:
        """Bucket ``bucket`` (fused range [start, stop)) is about to change."""
        undo = self._undo
        if self._worker is not None:
            kept = self._worker.keep(start, stop, self._worker_copy)
            undo.append(lambda: self._worker.put_back(start, stop, self._worker_copy, kept))
        for memory, store in zip(self._memories[bucket], self._copies[bucket]):
            n = store.numel()
            kept_there = memory.keep(0, n, store)
            undo.append(functools.partial(memory.put_back, 0, n, store, kept_there))
        for compressor in self._streams[bucket]:
            undo.append(functools.partial(compressor.load_state_dict, copy.deepcopy(compressor.state_dict())))

    def restore(self) -> None:
        """Everything kept since ``begin`` back as it was."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []


class Overlap:
    """The buckets in flight of one optimizer.

    Args:
        rule: the optimizer's update rule (its ``prepare`` and ``exchange_bucket`` run on each bucket).
        layout, buckets: the fused layout and its buckets.
        hyperparameters: a function giving the step's per-group hyper-parameters (to tell a change).
    """

    def __init__(self, rule: UpdateRule, layout: FusedLayout, buckets: List[Bucket],
                 hyperparameters: Callable[[], list]):
        self.rule, self.layout, self.buckets, self.hyperparameters = rule, layout, buckets, hyperparameters
        self.index = {p: i for i, p in enumerate(layout.params)}
        bucket_of = [0] * len(layout.params)
        for k, bucket in enumerate(buckets):
            bucket_of[bucket.first:bucket.stop_param] = [k] * (bucket.stop_param - bucket.first)
        this = weakref.ref(self)  # the pipeline's thread must not keep a discarded optimizer alive
        self.pipeline = BucketPipeline(bucket_of, lambda k: this().speculate(k), lambda: this().rule.progress())
        self.rollback = Rollback(rule.memory, [[m for m, _ in b.topology.memories()] for b in buckets],
                                 rule.worker_compressor, [b.topology.streams() for b in buckets])
        self.speculated = False  #: this step's buckets ran and the step has not used them yet
        self.voided = False      #: ``zero_grad()`` dropped this step's buckets: none run until the step
        self.speculation: Optional[Speculation] = None
        self.last_scale: Optional[float] = None  #: the loss scale of the last step (AMP), for the next one

    def note_scale(self, scale: Optional[torch.Tensor]) -> None:
        """The loss scale of the step just taken (AMP), which the next step's buckets assume."""
        self.last_scale = None if scale is None else float(scale)

    def ready(self, param: torch.Tensor) -> None:
        """This parameter's gradient is final for the step (the last backward pass of the step)."""
        if not self.voided:
            self.pipeline.ready(self.index[param])

    def drain(self) -> None:
        """Run this step's buckets not run during backward and wait for all of them (every rank runs them
        before agreeing on the step). Called twice (by ``hvd_distef.GradScaler`` before its collective inf
        check, then by ``step()``), it runs them once; ``speculated`` says they ran, until ``take``."""
        if self.voided:  # the dropped pass's buckets complete (they pair with the other ranks'), then undone
            if self.pipeline.running or self.speculated:
                self.speculated = False
                if self.pipeline.running:
                    self.pipeline.drain()
                self.rollback.restore()
            return
        if not self.speculated:
            self.pipeline.drain()
            self.speculated = True

    def take(self) -> bool:
        """Whether this step's buckets ran; the step uses them from now on."""
        speculated, self.speculated = self.speculated, False
        return speculated

    def take_voided(self) -> bool:
        """Whether ``zero_grad()`` dropped this step's buckets; the step starts afresh from now on."""
        voided, self.voided = self.voided, False
        return voided

    def check_zero_grad(self) -> None:
        """``zero_grad()`` between a backward pass and its step drops that pass: no bucket starts again until
        the step, whose ``drain`` lets the pass's buckets complete (every rank runs every bucket once per
        step, so they pair with the other ranks' buckets, whenever those run) and puts their changes back.
        It does not wait for them here: the other ranks may be in another collective first (an evaluation's
        allreduce); where they have all completed already, their changes are put back here. The ranks then
        agree on the step: every rank did this, and the step is exchanged afresh,
        as with ``overlap=False``; some ranks only, and every rank raises (``agreement.VOIDED``).
        horovod.torch raises AssertionError on that rank alone, leaving the others waiting."""
        if self.pipeline.running or self.speculated:
            self.voided = True
            if self.speculated or self.pipeline.finished:  # nothing left on the wire: put it back now
                self.drain()

    def speculate(self, k: int) -> None:
        """Bucket k during backward (the pipeline's thread): read its gradients, keep what it will change,
        exchange it. Never raises for this rank's own reasons (every rank must run every bucket): they are
        kept for ``step()``, which tells every rank."""
        bucket, rule = self.buckets[k], self.rule
        if k == 0:
            self.speculation = Speculation(self.last_scale, self.hyperparameters(), rule.segments([]))
            self.rollback.begin()
        spec = self.speculation
        params = self.layout.params[bucket.first:bucket.stop_param]
        spec.grads.update((p, (p.grad, None if p.grad is None else p.grad._version)) for p in params)
        nonfinite, failed = [], False
        try:
            scale = None if spec.scale is None else torch.tensor(spec.scale, dtype=torch.float32)
            nonfinite = rule.prepare(bucket.first, bucket.stop_param, scale)
        except (ValueError, RuntimeError) as exc:
            spec.failure, failed = spec.failure or exc, True
        spec.nonfinite += nonfinite
        if failed or (nonfinite and not rule.allows_propagate):
            # the step will not keep this work: exchange zeros (the compressors refuse NaN and inf)
            rule.grad[bucket.start:bucket.stop].zero_()
        self.rollback.keep(k, bucket.start, bucket.stop)
        if rule.exchange_bucket(k, spec.segments, [], on_wire=True, zeros_if_refused=True) is not None:
            spec.failure = spec.failure or ValueError(OVERFLOW)
        if k == len(self.buckets) - 1:  # every exchange has arrived when the pipeline is done
            rule.finish_speculation()

    def outcome(self, scale: Optional[torch.Tensor]) -> Prepared:
        """What this step's buckets found, for the ranks' agreement: this rank's failure and non-finite
        gradients, and whether what they used is stale (``scale``: AMP's loss scale now)."""
        spec = self.speculation
        return Prepared(spec.nonfinite, reread=True, failure=spec.failure, stale=self.stale(spec, scale))

    def stale(self, spec: Speculation, scale: Optional[torch.Tensor]) -> bool:
        """Whether what the buckets used during backward is not what the step has now: a gradient changed
        or replaced since (``scaler.unscale_``, clipping), other hyper-parameters, another loss scale."""
        if (None if scale is None else float(scale)) != spec.scale:
            return True
        if spec.hyperparameters != self.hyperparameters():
            return True
        return any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in spec.grads.items())
