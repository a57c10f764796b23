"""DistributedOptimizer: SPEC §1 on top of the user's ``torch.optim.SGD``, with horovod.torch's
surface (SPEC §5a).

A step reads the gradients into one fused buffer, agrees with the other ranks on what to do
(``agreement``), runs the worker side (momentum, error feedback, compression), the topology's
exchange and server step, bucket by bucket (``buckets``), and the update. With blocksign on the
CPU the worker side runs before the agreement instead, in the same pass that reads the gradients
(``_worker_step_ahead``), into spare buffers that the step takes if it goes ahead as computed
(no parameter idle on every rank); otherwise it is redone after the agreement. ``synchronize()`` is
the first half (up to Δ̃, or the averaged gradient under ``allreduce``), ``step()`` the second;
what a step must leave alone is kept aside by ``untouched``.

With ``overlap=True`` the first half runs during backward: each bucket, once the last backward
pass of the step has completed it, on the pipeline's thread, with the lr, momentum and loss
scale of the last step. ``step()`` then agrees with the other ranks as above and keeps that work
if it stands: no rank found a non-finite gradient or failed, the gradients, hyper-parameters and
loss scale are still those the buckets used, and no parameter is idle or at lr = 0 (those need
``untouched``). Otherwise every rank puts the buckets' changes back (``untouched.Rollback``) and
either skips or raises as a step without overlap would, or redoes the first half as one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import warnings
import weakref
from typing import Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch.optim.sgd import sgd as functional_sgd

from . import _kernels, agreement, buckets, horovod_args
from .comm import Comm
from .compressors import Compression, get_compressor
from .compressors.blocksign import BlockSign
from .error_feedback import ErrorMemory, Segments, Shard, lr_ratio_segments, window
from .fused import DoubleBuffer, FusedLayout, Range
from .payload import Payload
from .topologies import Topology, get_topology
from .untouched import Rollback, Untouched

NONFINITE_POLICIES = ("raise", "skip", "propagate")
#: horovod.torch's warning, word for word (scripts and tests look for it)
SYNCHRONIZE_WARNING = ("optimizer.step() called without optimizer.skip_synchronize() context after "
                       "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                       "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your code.")
HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


class Bucket(NamedTuple):
    """A bucket of the fused buffer (``buckets``): parameters [first, stop_param), elements [start, stop)."""

    first: int
    stop_param: int
    start: int
    stop: int
    topology: Topology
    worker_shards: List[Shard]  #: the topology's shards, in the fused buffer's coordinates


#: a worker's compensated vector that its compressor refused, every gradient being finite
OVERFLOW = ("the vector to compress, p = d + (η_{t-1}/η_t)·e, overflowed float32 in some block though every "
            "gradient is finite; lower the lr or the loss scale")


class _Speculation:
    """What the buckets exchanged during backward used (``overlap=True``), to check at ``step()``."""

    def __init__(self, scale: Optional[float], hyperparameters: list, segments: Segments):
        self.scale, self.hyperparameters, self.segments = scale, hyperparameters, segments
        self.grads: dict = {}       #: parameter -> (its gradient tensor when read, that tensor's version)
        self.nonfinite: List[str] = []
        self.failure: Optional[Exception] = None


class _Exchanged(NamedTuple):
    """What ``synchronize()`` leaves for ``step()``."""

    update: Optional[torch.Tensor]   #: Δ̃ (ef), the vote (signum), or None (sgd: the averaged p.grad)
    untouched: List[Untouched]
    exposed: bool                    #: the update was written into p.grad (the user may have changed it)
    skipped: bool                    #: nothing to apply (no gradients, a non-finite gradient, AMP's inf)
    nonfinite: Optional[Exception] = None  #: decided after an explicit synchronize(): raise it unless AMP skips
    pieces: Optional[list] = None    #: Δ̃ still compressed, (fused start, payload) in order: the update decompresses it


class DistributedOptimizer(torch.optim.SGD):
    """Wraps a ``torch.optim.SGD`` and trains with compressed communication (SPEC §1, §4, §5a).

    The returned object is a ``torch.optim.SGD`` whose ``param_groups`` are the wrapped optimizer's
    own dicts: a scheduler built on either drives both, and lr, momentum, nesterov and weight_decay
    may change between steps (the error rescale η_{t-1}/η_t follows lr; lr = 0 leaves x and the
    errors as they were).

    Args (horovod.torch's, in its order; then ours, by keyword):
        optimizer: a ``torch.optim.SGD``. Parameters with ``requires_grad=False`` (any dtype) are
            not the optimizer's work; the others must be float32 (the fused buffer is float32).
        named_parameters: ``model.named_parameters()``, for error messages and the rank agreement check.
        compression: a compressor name, ``Compression.<name>`` class, configured instance, or
            Horovod's ``hvd.Compression.none`` / ``.fp16``.
        backward_passes_per_step: backward passes allowed per step (counted per ``backward()``
            call; ``zero_grad()``, gradients set to None and ``step()`` restart the count). The
            gradient used is ``p.grad`` as the passes left it: summed, as in torch and Horovod (SPEC §1).
        op, gradient_predivide_factor, num_groups, groups, sparse_as_dense: Horovod's arguments
            (see ``hvd_distef.horovod_args``).
        process_set: a Horovod process set: only its ranks exchange (a rank outside it trains alone).
        topology: one of ``hvd_distef.topologies.REGISTRY`` (``"ps"``, ``"allreduce"``, ...).
        nonfinite: what a NaN or inf gradient on some rank does: ``"raise"`` (every rank raises
            ``NonFiniteGradientError`` before touching any buffer; the default under error feedback,
            where a NaN in an error memory would stay for good), ``"skip"`` (the step is skipped on
            every rank and counted) or ``"propagate"`` (``allreduce`` only, and its default: the
            NaN reaches every rank's p.grad and parameters, as in torch and Horovod).
        overlap: exchange the gradients bucket by bucket during backward, as soon as the last
            backward pass of the step has completed a bucket (module docstring; SPEC §4). Set lr,
            momentum and the like before backward (a change after it makes ``step()`` redo the
            exchange); ``zero_grad()`` between that backward and ``step()`` raises, as in Horovod.
        bucket_cap_mb: MiB of float32 per bucket with ``overlap=True`` (DDP's ``bucket_cap_mb``).
        error_decay: multiply both error memories by this fixed β in [0, 1] each step instead of
            rescaling them by η_{t-1}/η_t (Wu et al. 2018; for comparison with SPEC §1's rule,
            which None, the default, keeps).
        comm: an mpi4py communicator to use instead of ``MPI.COMM_WORLD`` (duplicated once per process).
        timeout_s: abort the job when one of our collectives waits longer than this (a dead or hung
            peer); default: the HVD_DISTEF_TIMEOUT_S environment variable, else 300 s.

    Raises (on every rank, naming each rank's cause): ``TypeError``/``ValueError`` for bad
    arguments on any rank, or ranks that disagree on the model, options or hyper-parameters.
    """

    #: torch.amp.GradScaler protocol: step() unscales and skips itself (hvd_distef/amp.py)
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                 compression=Compression.blocksign, backward_passes_per_step: int = 1, op=None,
                 gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups=None,
                 sparse_as_dense: bool = False, process_set=None, *, topology: str = "ps",
                 nonfinite: Optional[str] = None, overlap: bool = False,
                 bucket_cap_mb: float = buckets.DEFAULT_BUCKET_CAP_MB, error_decay: Optional[float] = None,
                 comm=None, timeout_s: Optional[float] = None):
        failure = None
        try:
            topology_cls = self._configure(optimizer, named_parameters, compression, topology,
                                           backward_passes_per_step, nonfinite)
            if not isinstance(overlap, bool):
                raise TypeError(f"overlap must be True or False, got {overlap!r}")
            self.overlap = overlap
            self._bucket_plan = buckets.plan(self._layout.sizes, bucket_cap_mb if overlap else None)
            self.bucket_cap_mb = float(bucket_cap_mb) if overlap else None
            if error_decay is not None and not 0 <= error_decay <= 1:
                raise ValueError(f"error_decay must be in [0, 1], got {error_decay!r}")
            if error_decay is not None and self._rule != "ef":
                raise ValueError(f"error_decay is for error-feedback topologies; {topology!r} keeps no errors")
            self.error_decay = None if error_decay is None else float(error_decay)
            self._op = horovod_args.reduce_op(op, topology_cls.update_rule)
            self._predivide = horovod_args.check_predivide(gradient_predivide_factor, self._op)
            horovod_args.check_groups(num_groups, groups)
        except (TypeError, ValueError) as exc:  # told to every rank below, instead of a hang
            failure = exc
        self.comm = Comm(comm, timeout_s, process_set)
        agreement.check_construction(self.comm, None if failure else dict(self.config(), **self._hyperparameters()),
                                     failure)
        self._build(topology_cls)

    # --- construction -------------------------------------------------------------------------------
    def _configure(self, optimizer, named_parameters, compression, topology, backward_passes_per_step, nonfinite):
        """Everything that can fail on one rank alone; returns the topology class."""
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"hvd_distef.DistributedOptimizer wraps torch.optim.SGD (the algorithm of SPEC §1 "
                            f"is SGD with momentum), got {type(optimizer).__name__}")
        self._check_passes(backward_passes_per_step)
        if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self._building = True
        super().__init__(optimizer.param_groups, **optimizer.defaults)  # the same group dicts (SPEC §5a)
        self._building = False
        self.compressor = get_compressor(horovod_args.compression_name(compression))
        topology_cls = get_topology(topology)
        self._topology_name = topology
        self._rule = topology_cls.update_rule
        self.backward_passes_per_step = int(backward_passes_per_step)
        if nonfinite is None:
            nonfinite = "propagate" if self._rule == "sgd" else "raise"
        if nonfinite == "propagate" and self._rule != "sgd":
            raise ValueError(f"nonfinite='propagate' is for topology='allreduce': under {topology!r} a NaN would "
                             f"stay in the error memories for good; use 'raise' or 'skip'")
        self.nonfinite = nonfinite
        self._layout = FusedLayout(self.param_groups, named_parameters)
        self._parameter_names = self._layout.names_by_param  # horovod.torch's attribute
        self.numel, self.device = self._layout.numel, self._layout.device
        self._check_hyperparameters()
        for g in self.param_groups:
            g.setdefault("prev_lr", 0.0)  # η_{t-1} of SPEC §1: the last non-zero lr this group stepped with
        return topology_cls

    def _build(self, topology_cls) -> None:
        """Buckets and their topologies, flat buffers and backward hooks, once every rank agreed."""
        zeros = lambda: torch.zeros(self.numel, dtype=torch.float32, device=self.device)  # noqa: E731
        # Flat buffers allocated once (fresh 100 MB tensors every step cost more in page faults than
        # the arithmetic), whatever the hyper-parameters are now: they may change at run time.
        self._delta = zeros()  # Δ̃ (ef), the vote (signum) or the averaged gradient (sgd), bucket by bucket
        options = {"op": self._op, "predivide": self._predivide} if self._rule == "sgd" else {}
        layout = self._layout
        self.buckets: List[Bucket] = []
        for first, stop in self._bucket_plan:
            start, end = layout.bounds[first][0], layout.bounds[stop - 1][1]
            topology = topology_cls(self.comm, self.compressor, layout.sizes[first:stop], self.device,
                                    self._delta[start:end], **options)
            self.buckets.append(Bucket(first, stop, start, end, topology,
                                       [Shard(start + s.start, start + s.stop, s.block_sizes) for s in topology.shards]))
        self.block_sizes = tuple(b for bucket in sorted(self.buckets, key=lambda b: b.start)
                                 for b in bucket.topology.block_sizes)
        self._worker_compressor = self.compressor.for_stream(self.comm.rank)
        self._grad = zeros()
        own_update = self._rule in ("ef", "signum")
        # m_i of SPEC §1: the step writes the next momentum beside the current one (read in the same
        # pass), and it becomes current when the update is applied; a step that does not go ahead
        # changes nothing
        self._momentum = DoubleBuffer(self.numel, self.device) if own_update else None
        self._wd_buffer = zeros() if own_update else None
        if own_update:  # what opt.state[p] shows (``_initialize_state``)
            self._momentum_views = [self._layout.views(b) for b in self._momentum.buffers]
            self._wd_views = self._layout.views(self._wd_buffer)
        self._worker_memory = ErrorMemory(self.numel, self.device) if self._rule == "ef" else None
        self._steps = 0
        self._skipped_steps = 0
        self._redone_steps = 0  # overlap: steps whose buckets were exchanged again by step()
        self._initialized = False
        self._seconds = {"compress": 0.0, "exchange": 0.0}
        self._backward_passes = 0
        self._end_of_backward_queued = False
        self._grads_reset = False
        self._grad_seen: dict = {}  # parameter -> weak reference to its gradient after its last accumulation
        self._synchronized = False
        self._should_synchronize = True
        self._exchanged: Optional[_Exchanged] = None
        # Δ̃ left compressed (one payload per shard, per bucket) for the update pass to decompress
        # slice by slice (``_kernels.descend_blocksign_``): blocksign on the CPU with the compiled kernels
        self._update_decompresses = (self._rule == "ef" and isinstance(self.compressor, BlockSign)
                                     and self.device.type == "cpu" and _kernels.compiled is not None
                                     and all(b.topology.delivers_payloads for b in self.buckets))
        self._received: List[Optional[List[Payload]]] = [None] * len(self.buckets)
        self._in_flight: dict = {}  # overlap: bucket -> its exchange still on the wire (``Topology.start_exchange``)
        # the worker's momentum and error step in one pass from the gradients before the ranks agree
        # (``_worker_step_ahead``), into ``self._grad`` as the worker error's spare buffer: blocksign
        # with the compiled kernels, no raw shard, and no overlap (its buckets have their own rollback)
        self._worker_shards = [s for b in self.buckets for s in b.worker_shards]
        self._steps_ahead = (self._update_decompresses and not self.overlap
                             and not any(self.compressor.is_raw(s.numel, s.block_sizes) for s in self._worker_shards))
        this = weakref.ref(self)  # hooks must not keep a discarded optimizer (and its buffers) alive
        self._pipeline: Optional[buckets.BucketPipeline] = None
        self._speculated = False
        self._speculation: Optional[_Speculation] = None
        self._last_scale: Optional[float] = None  # the loss scale of the last step (AMP), for the next overlap
        if self.overlap:
            self._index = {p: i for i, p in enumerate(self._layout.params)}
            bucket_of = [0] * len(self._layout.params)
            for k, bucket in enumerate(self.buckets):
                bucket_of[bucket.first:bucket.stop_param] = [k] * (bucket.stop_param - bucket.first)
            self._pipeline = buckets.BucketPipeline(bucket_of, lambda k: this()._speculate(k),
                                                    lambda: this()._progress_exchanges())
            self._rollback = Rollback(self._worker_memory,
                                      [b.topology.server_memory for b in self.buckets], self._worker_compressor,
                                      [b.topology.compressor for b in self.buckets])

        def on_grad(param):
            opt = this()
            if opt is not None:
                opt._on_grad(param)
        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in self._layout.params]
        weakref.finalize(self, lambda: [h.remove() for h in handles])

    @staticmethod
    def _check_passes(passes) -> None:
        if isinstance(passes, bool) or int(passes) != passes or passes < 1:
            raise ValueError(f"backward_passes_per_step must be a positive integer, got {passes!r}")

    def _check_hyperparameters(self) -> None:
        for i, g in enumerate(self.param_groups):
            where = f"param group {i}"
            if not g["lr"] >= 0:
                raise ValueError(f"lr must be >= 0 in {where}, got {g['lr']}")
            if not 0 <= g["momentum"] < 1:
                raise ValueError(f"momentum must be in [0, 1) in {where}, got {g['momentum']}")
            if not g["weight_decay"] >= 0:
                raise ValueError(f"weight_decay must be >= 0 in {where}, got {g['weight_decay']}")
            if self._rule != "sgd" and (g["dampening"] != 0 or g.get("maximize", False)):
                raise ValueError(f"dampening and maximize are not part of SPEC §1; {where} sets them")

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", True):
            raise ValueError("hvd_distef fuses all parameters at construction; add param groups to the "
                             "torch.optim.SGD before wrapping it")
        super().add_param_group(param_group)

    def config(self) -> dict:
        """The structure every rank must share and a checkpoint must match."""
        layout = self._layout
        shapes = [(n, tuple(p.shape)) for n, p in zip(layout.names, layout.params)]
        return {
            "world_size": self.comm.size,
            "compression": self.compressor.name, "compression_options": self.compressor.config(),
            "topology": self._topology_name, "backward_passes_per_step": self.backward_passes_per_step,
            "overlap": self.overlap, "bucket_cap_mb": self.bucket_cap_mb, "error_decay": self.error_decay,
            "parameters": hashlib.sha1(json.dumps(shapes).encode()).hexdigest(),
            "numel": self.numel, "num_params": len(layout.params),
            "group_sizes": [len(ps) for ps in layout.group_params],
        }

    def _hyperparameters(self) -> dict:
        """What every rank must agree on at construction besides ``config`` (a checkpoint may differ)."""
        return {"nonfinite": self.nonfinite, "op": self._op, "gradient_predivide_factor": self._predivide,
                "param_groups": [{k: g.get(k) for k in HYPERPARAMETERS} for g in self.param_groups]}

    # --- Horovod's surface --------------------------------------------------------------------------
    def _on_grad(self, param: torch.Tensor) -> None:
        """A gradient was accumulated: count the backward pass once, when it ends. A parameter whose
        gradient is another tensor than after its last accumulation had it reset in between (by
        ``model.zero_grad()``, say): the count restarts with this pass."""
        seen = self._grad_seen.get(param)
        if seen is not None and seen() is not param.grad:
            self._grads_reset = True
        self._grad_seen[param] = weakref.ref(param.grad)
        if not self._end_of_backward_queued:
            self._end_of_backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if self._pipeline is not None and (0 if self._grads_reset else self._backward_passes) + 1 >= \
                self.backward_passes_per_step:  # the step's last pass: this gradient is final
            self._pipeline.ready(self._index[param])

    def _end_of_backward(self) -> None:
        self._end_of_backward_queued = False
        if self._grads_reset:
            self._grads_reset, self._backward_passes = False, 0
        self._backward_passes += 1

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's: allow ``passes`` backward passes per step from now on (the count restarts)."""
        self._check_passes(passes)
        self.backward_passes_per_step = int(passes)
        self._backward_passes = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pipeline is not None and (self._pipeline.running or self._speculated):
            # horovod.torch's rule, and its words: the buckets of that backward are being exchanged
            self._drain_buckets()
            self._speculated = False
            self._rollback.restore()
            self._backward_passes = 0
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        self._backward_passes = 0
        super().zero_grad(set_to_none)

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Horovod's: ``step()`` inside this block applies what ``synchronize()`` left in p.grad."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    @torch.no_grad()
    def synchronize(self) -> None:
        """Horovod's first half of ``step()``, on every rank: after it, ``p.grad`` holds what ``step()``
        will apply, identical on every rank. Under ``allreduce`` that is the averaged gradient (Horovod's
        meaning); under error feedback it is Δ̃ of SPEC §1, the decompressed server update (momentum
        and both error memories have advanced: call ``step()`` next); under ``majority_vote``, the vote.
        Clip or inspect it, then ``with opt.skip_synchronize(): opt.step()``."""
        self._synchronize(expose=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(SYNCHRONIZE_WARNING)
            else:
                self._synchronize(expose=False)
        elif not self._synchronized:
            raise ValueError("step() inside skip_synchronize() applies what synchronize() computed; call "
                             "opt.synchronize() first")
        try:
            self._finish()
        finally:
            self._synchronized, self._exchanged = False, None
            scale = getattr(self, "grad_scale", None)
            self._last_scale = None if scale is None else float(scale)  # what the next overlap assumes
        return loss

    # --- the step: worker side and exchange -----------------------------------------------------------
    def _synchronize(self, expose: bool) -> None:
        if not self._synchronized:
            self._exchanged = self._exchange(expose)  # an error leaves this optimizer as it was
            self._synchronized = True

    def _exchange(self, expose: bool) -> _Exchanged:
        nothing = _Exchanged(None, [], False, skipped=True)
        if self._is_state_initialization():
            return nothing
        self._drain_buckets()
        speculated, self._speculated = self._speculated, False
        try:
            return self._agree_and_exchange(expose, speculated)
        except BaseException:
            if speculated:
                self._rollback.restore()
            raise

    def _drain_buckets(self) -> None:
        """With ``overlap=True``, run this step's buckets not run during backward and wait for all of
        them (every rank runs them before agreeing on the step). Called twice (by
        ``hvd_distef.GradScaler`` before its collective inf check, then by ``step()``), it runs
        them once; ``_speculated`` says they ran, until the step uses them."""
        if self._pipeline is not None and not self._speculated:
            self._pipeline.drain()
            self._speculated = True

    def _agree_and_exchange(self, expose: bool, speculated: bool) -> _Exchanged:
        nothing = _Exchanged(None, [], False, skipped=True)
        failure, has_grad, nonfinite, stale = None, self._layout.has_grad(), [], False
        ahead, tried_ahead = None, False  # the worker payloads of the step taken ahead (``_worker_step_ahead``)
        try:
            self._check_step()
            if speculated:
                spec = self._speculation
                failure, nonfinite, stale = spec.failure, spec.nonfinite, self._stale(spec)
            elif self._steps_ahead and all(g["lr"] != 0 for g in self.param_groups):
                tried_ahead = True
                ahead = self._worker_step_ahead(getattr(self, "grad_scale", None))
                nonfinite = [] if ahead is not None else self._layout.nonfinite_grads(0, len(self._layout.params))
                if ahead is None and not nonfinite:
                    raise ValueError(OVERFLOW)
            else:
                nonfinite = self._prepare(0, len(self._layout.params), getattr(self, "grad_scale", None))
        except (ValueError, RuntimeError) as exc:  # told to every rank below, instead of a hang
            failure = exc
        decision = agreement.agree_on_step(self.comm, has_grad, failure, nonfinite, self._amp_found_inf(),
                                           self._hyperparameters()["param_groups"], stale)
        self._backward_passes = 0
        idle, idle_params = self._layout.idle(decision.has_grad)
        kept = (speculated and not decision.redo and not decision.found_inf and decision.nonfinite is None
                and not (self._rule != "sgd" and idle)
                and not (self._rule == "ef" and any(g["lr"] == 0 for g in self.param_groups)))
        if speculated and not kept:
            self._rollback.restore()
        if decision.found_inf or (decision.nonfinite is not None and not expose and self.nonfinite != "propagate"):
            if not decision.found_inf and self.nonfinite == "raise":
                raise decision.nonfinite
            self._skipped_steps += 1
            return nothing
        if decision.nonfinite is not None and self.nonfinite != "propagate":
            # Horovod's meaning: after synchronize() every rank's p.grad holds the non-finite values,
            # so that GradScaler.unscale_ finds them on every rank (the AMP recipe skips the step and
            # backs off alike); nothing was exchanged and step() raises unless AMP skips it
            for p, h in zip(self._layout.params, decision.has_grad):
                if h:
                    p.grad = torch.full_like(p, float("nan"))
            return nothing._replace(nonfinite=decision.nonfinite)
        if not any(decision.has_grad):  # torch's SGD: a step with no gradients changes nothing
            return nothing
        untouched = []
        if ahead is not None and not idle:
            self._grad = self._worker_memory.commit(self._worker_compressor, self._worker_shards, self._grad, ahead)
            segments, first = self._segments([]), 0
            for k, bucket in enumerate(self.buckets):
                self._exchange_payloads(k, ahead[first:first + len(bucket.worker_shards)], segments)
                first += len(bucket.worker_shards)
        elif not kept:
            if speculated:
                self._redone_steps += 1
            if speculated or tried_ahead:  # the gradients were read without writing d: read them again
                self._prepare(0, len(self._layout.params), getattr(self, "grad_scale", None))
            untouched = self._untouched(idle, idle_params) if self._rule != "sgd" else []
            segments = self._segments(idle)
            for k in range(len(self.buckets)):
                self._exchange_bucket(k, segments, idle)
        if self._momentum is not None:
            self._momentum.keep(idle)  # idle parameters keep their momentum (SPEC §5a)
        if self._rule == "sgd" and not self._grads_as_averaged(decision.has_grad):
            self._layout.write_grads(self._grad, decision.has_grad)
        update = None if self._rule == "sgd" else self._delta
        pieces = self._received_pieces(expose) if self._update_decompresses else None
        if expose and update is not None:
            self._layout.write_grads(update, decision.has_grad)
        return _Exchanged(update, untouched, expose and update is not None, skipped=False, pieces=pieces)

    def _grads_as_averaged(self, has_grad: List[bool]) -> bool:
        """Whether p.grad already holds what the allreduce gave (sgd): one rank, whose average is its
        own gradient, read unscaled (no AMP scale) from dense gradients where it has them; then
        writing ``self._grad`` back into p.grad would copy each gradient onto itself."""
        return (self.comm.size == 1 and getattr(self, "grad_scale", None) is None
                and all((p.grad is not None and not p.grad.is_sparse) == h
                        for p, h in zip(self._layout.params, has_grad)))

    def _is_state_initialization(self) -> bool:
        """horovod.torch's ``broadcast_optimizer_state`` calls step() once on a fresh optimizer with
        every gradient set to zeros and no backward pass, to create torch's per-parameter state. That
        call changes nothing here and talks to no rank; the state exists from then on."""
        params = self._layout.params
        if (self._initialized or self._steps or self._skipped_steps or self._backward_passes or not params
                or any(p.grad is None or p.grad.is_sparse or bool(p.grad.any()) for p in params)):
            return False
        self._initialize_state()
        return True

    def _initialize_state(self) -> None:
        """Per-parameter state exists from now on, on every rank alike (what Horovod broadcasts):
        torch's ``momentum_buffer`` for each parameter (under error feedback, with its
        ``weight_decay_buffer``: views of the live flat buffers); under ``allreduce``, zeros
        (m = μ·0 + g = g, as torch's first step), or None where momentum is 0. Called again after each
        step: under error feedback the live momentum buffer alternates (``DoubleBuffer``)."""
        self._initialized = True
        layout = self._layout
        if self._rule != "sgd":
            live = self._momentum_views[self._momentum.index]
            for p, m, w in zip(layout.params, live, self._wd_views):
                state = self.state[p]
                state["momentum_buffer"], state["weight_decay_buffer"] = m, w
            return
        for group, params in zip(self.param_groups, layout.group_params):
            for p in params:
                if self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p) if group["momentum"] != 0 else None

    def _check_step(self) -> None:
        """This rank's reasons to refuse the step (ValueError), before anything is exchanged."""
        if self._backward_passes > self.backward_passes_per_step:
            raise ValueError(f"gradients were accumulated over {self._backward_passes} backward passes before "
                             f"step(), more than backward_passes_per_step={self.backward_passes_per_step}; raise "
                             f"it, call step() more often, or zero_grad() between")
        self._check_hyperparameters()
        moved = [n for n, p in zip(self._layout.names, self._layout.params) if p.dtype != torch.float32]
        if moved:
            raise ValueError(f"{', '.join(moved)} is no longer float32 (the fused buffer is float32)")
        self._layout.check_frozen()

    def _prepare(self, first: int, stop: int, scale: Optional[torch.Tensor]) -> List[str]:
        """Read the gradients of parameters [first, stop) (None as zeros, sparse densified), unscaled by
        AMP's ``scale``, into their slice of ``self._grad``; under error feedback, in the same pass,
        the momentum of SPEC §1 (m' = μ·m + g into the momentum's next buffer, d = g + μ·m' or m' in
        ``self._grad``). Changes no state. Returns the names of this rank's parameters among them
        with non-finite gradients."""
        layout, inv = self._layout, self._inverse_scale(scale)
        if self._rule != "ef":
            grad = layout.gather(self._grad, first, stop)
            if inv is not None:
                grad.mul_(inv)
            return layout.nonfinite(self._grad, first, stop)
        finite, m = True, self._momentum
        for (lo, hi), group in zip(layout.group_param_bounds, self.param_groups):
            lo, hi = max(lo, first), min(hi, stop)
            if lo < hi:
                a, b = layout.span(lo, hi)
                finite &= _kernels.gather_momentum(layout.grads(lo, hi), layout.sizes[lo:hi], self._grad[a:b],
                                                   m.current[a:b], m.next[a:b], group["momentum"], group["nesterov"],
                                                   inv)
        return [] if finite else layout.nonfinite_grads(first, stop)

    @staticmethod
    def _inverse_scale(scale: Optional[torch.Tensor]) -> Optional[float]:
        """torch's unscale: multiply by the float32 reciprocal of AMP's loss scale, computed in double."""
        return None if scale is None else float(scale.double().reciprocal().float())

    def _worker_step_ahead(self, scale: Optional[torch.Tensor]) -> Optional[List[Payload]]:
        """``_prepare`` and the worker's error step of every shard in one pass over memory, before the
        ranks agree on the step (SPEC §1 as if no parameter were idle): the gradients are read where
        backward left them, the next momentum and p go to the momentum's next buffer and to
        ``self._grad`` (the worker error's spare), and d is never written out. Changes no state:
        ``ErrorMemory.commit`` takes the step if it goes ahead as computed. Returns the payloads of
        ``self._worker_shards``, or None where a gradient or block scale is not finite."""
        layout, m, inv = self._layout, self._momentum, self._inverse_scale(scale)
        grads = layout.grads(0, len(layout.params))
        mus, nesterovs = [], []
        for (lo, hi), group in zip(layout.group_param_bounds, self.param_groups):
            mus += [group["momentum"]] * (hi - lo)
            nesterovs += [group["nesterov"]] * (hi - lo)
        segments, compressor = self._segments([]), self._worker_compressor

        def compress(shard: Shard, error: torch.Tensor, error_out: torch.Tensor, unsettled: Optional[Payload]):
            a, b = shard.start, shard.stop
            return compressor.momentum_with_feedback(grads, layout.sizes, mus, nesterovs, a, m.current[a:b],
                                                     m.next[a:b], error, error_out, shard.block_sizes,
                                                     window(segments, a, b), unsettled, inv)
        with self._timed("compress"):
            return self._worker_memory.step_ahead(self._worker_shards, self._grad, compress)

    def _segments(self, idle: List[Range]) -> Segments:
        return lr_ratio_segments(self._layout.group_bounds, [g["prev_lr"] for g in self.param_groups],
                                 [g["lr"] for g in self.param_groups], idle, self.error_decay)

    def _untouched(self, idle: List[Range], params: List[torch.Tensor]) -> List[Untouched]:
        """Idle parameters keep everything; groups at lr = 0 keep their errors (SPEC §5a)."""
        memories = [(self._worker_memory, 0)] + [(b.topology.server_memory, b.start + b.topology.server_start)
                                                  for b in self.buckets]
        still = [bounds for bounds, g in zip(self._layout.group_bounds, self.param_groups) if g["lr"] == 0]
        return [Untouched(idle, [self._wd_buffer], memories, params), Untouched(still, (), memories)]

    # --- the step, bucket by bucket ---------------------------------------------------------------------
    def _speculate(self, k: int) -> None:
        """Bucket k during backward (the pipeline's thread, ``overlap=True``): read its gradients,
        keep what it will change, exchange it. Never raises for this rank's own reasons (every rank
        must run every bucket): they are kept for ``step()``, which tells every rank."""
        bucket = self.buckets[k]
        if k == 0:
            self._speculation = _Speculation(self._last_scale, self._hyperparameters()["param_groups"],
                                             self._segments([]))
            self._rollback.begin()
        spec = self._speculation
        params = self._layout.params[bucket.first:bucket.stop_param]
        spec.grads.update((p, (p.grad, None if p.grad is None else p.grad._version)) for p in params)
        nonfinite, failed = [], False
        try:
            scale = None if spec.scale is None else torch.tensor(spec.scale, dtype=torch.float32)
            nonfinite = self._prepare(bucket.first, bucket.stop_param, scale)
        except (ValueError, RuntimeError) as exc:
            spec.failure, failed = spec.failure or exc, True
        spec.nonfinite += nonfinite
        if failed or (nonfinite and self._rule != "sgd"):
            # the step will not keep this work: exchange zeros (the compressors refuse NaN and inf)
            self._grad[bucket.start:bucket.stop].zero_()
        self._rollback.keep(k, bucket.start, bucket.stop)
        refused = self._exchange_bucket(k, spec.segments, [], on_wire=True, zeros_if_refused=True)
        if refused is not None:
            spec.failure = spec.failure or ValueError(OVERFLOW)
        if k == len(self.buckets) - 1:  # every exchange has arrived when the pipeline is done
            with self._timed("exchange"):
                for j, pending in self._in_flight.items():
                    self._received[j] = pending.wait()
            self._in_flight.clear()

    def _progress_exchanges(self) -> None:
        """Let the exchanges left on the wire move (the pipeline's thread, waiting for a bucket)."""
        for pending in self._in_flight.values():
            pending.test()

    def _stale(self, spec: _Speculation) -> bool:
        """Whether what the buckets used during backward is not what the step has now: a gradient
        changed or replaced since (``scaler.unscale_``, clipping), other hyper-parameters, another
        loss scale."""
        scale = getattr(self, "grad_scale", None)
        if (None if scale is None else float(scale)) != spec.scale:
            return True
        if spec.hyperparameters != self._hyperparameters()["param_groups"]:
            return True
        return any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in spec.grads.items())

    def _exchange_bucket(self, k: int, segments: Segments, idle: List[Range], on_wire: bool = False,
                         zeros_if_refused: bool = False) -> Optional[ValueError]:
        """The first half of the step on bucket k, its gradients in ``self._grad``: its slice of
        ``self._delta`` gets Δ̃ (ef) or the vote (signum); under sgd the averaged gradient replaces the
        gradients in ``self._grad`` (Horovod's allreduce runs in place there: no copy). ``on_wire``:
        see ``_exchange_payloads``. ``zeros_if_refused`` (a step that every rank agrees on later):
        where the worker's compressor refuses p (it overflowed float32), zeros go out instead, as the
        other ranks are in this bucket's collectives, and the refusal is returned."""
        bucket = self.buckets[k]
        a, b = bucket.start, bucket.stop
        if self._rule == "sgd":
            with self._timed("exchange"):
                averaged = bucket.topology.exchange(self._grad[a:b])
            if averaged.data_ptr() != self._grad[a:b].data_ptr():
                self._grad[a:b].copy_(averaged)
            return
        if self._rule == "signum":
            with self._timed("compress"):
                signs = self._signum_momentum(a, b)
            with self._timed("exchange"):
                bucket.topology.exchange(signs)
            return
        for lo, hi in idle:  # d (momentum applied when the gradients were read, ``_prepare``)
            if lo < b and hi > a:
                self._grad[max(lo, a):min(hi, b)].zero_()
        refused = None
        with self._timed("compress"):
            # d is read once: p may be written over it (``self._grad`` is refilled by the next step)
            try:
                payloads = self._worker_memory.step(self._worker_compressor, self._grad, segments, bucket.worker_shards,
                                                    d_is_scratch=True)
            except ValueError as exc:
                if not zeros_if_refused:
                    raise
                refused = exc
                self._grad[a:b].zero_()
                self._worker_memory.clear(a, b)  # the step is put back (Rollback)
                payloads = self._worker_memory.step(self._worker_compressor, self._grad, segments, bucket.worker_shards,
                                                    d_is_scratch=True)
        self._exchange_payloads(k, payloads, segments, on_wire)
        return refused

    def _exchange_payloads(self, k: int, payloads: List[Payload], segments: Segments, on_wire: bool = False) -> None:
        """Bucket k's exchange of this rank's worker payloads (ef): Δ̃ into its slice of ``self._delta``,
        or kept compressed in ``self._received[k]`` for the update to decompress. ``on_wire``: its last
        transfer may stay on the wire in ``self._in_flight[k]`` while the next bucket's starts."""
        bucket = self.buckets[k]
        a, b = bucket.start, bucket.stop
        with self._timed("exchange"):
            if self._update_decompresses and on_wire:
                self._in_flight[k] = bucket.topology.start_exchange(payloads, window(segments, a, b))
            elif self._update_decompresses:
                self._received[k] = bucket.topology.exchange_compressed(payloads, window(segments, a, b))
            else:
                bucket.topology.exchange(payloads, window(segments, a, b))

    def _received_pieces(self, expose: bool) -> Optional[list]:
        """Δ̃ of every bucket as (fused start, payload) in fused order, for the update to decompress;
        or None after decompressing it into ``self._delta`` (to expose it in p.grad, or where a
        payload went raw)."""
        pieces = sorted(((b.start + s.start, payload) for b, received in zip(self.buckets, self._received)
                         for s, payload in zip(b.topology.shards, received)), key=lambda piece: piece[0])
        if not expose and all(payload.numel == 0 or "bits" in payload.tensors for _, payload in pieces):
            return [(start, payload) for start, payload in pieces if payload.numel]
        for bucket, received in zip(self.buckets, self._received):
            bucket.topology.decompress_shards(received)
        return None

    def _group_slices(self, a: int, b: int):
        """(start, stop, group) of each param group's part of the fused range [a, b)."""
        for (start, stop), group in zip(self._layout.group_bounds, self.param_groups):
            if start < b and stop > a:
                yield max(start, a), min(stop, b), group

    def _signum_momentum(self, a: int, b: int) -> torch.Tensor:
        """Signum: m' = μ·m + (1−μ)·g (g in ``self._grad[a:b]``) into the momentum's next buffer, in one
        pass that also packs the signs to send (of m', or of g where μ = 0); returns them."""
        segments = [(start - a, stop - a, group["momentum"]) for start, stop, group in self._group_slices(a, b)]
        return _kernels.signum_momentum(self._grad[a:b], self._momentum.current[a:b], self._momentum.next[a:b],
                                        segments)

    # --- the step: update ---------------------------------------------------------------------------
    def _amp_found_inf(self) -> bool:
        """Set by torch's GradScaler around ``step()`` (its ``_step_supports_amp_scaling`` protocol)."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item() > 0)

    def _finish(self) -> None:
        done = self._exchanged
        if done is not None and done.nonfinite is not None:  # found by an explicit synchronize()
            if not self._amp_found_inf() and self.nonfinite == "raise":
                raise done.nonfinite
            self._skipped_steps += 1
        if done is None or done.skipped:
            return
        if self._amp_found_inf():  # GradScaler.unscale_ after synchronize() found an inf
            self._skipped_steps += 1
            return
        if self._rule == "sgd":
            self._sgd_update()
        else:
            update = done.update
            if done.exposed:  # what the user left in p.grad after synchronize() (clipped, say)
                self._layout.read_grads(update)
            self._apply(update, done.pieces, momentum_of_decay=self._rule == "ef")
        for u in done.untouched:
            u.restore()
        for g in self.param_groups:
            if g["lr"] != 0:
                g["prev_lr"] = g["lr"]
        if self._momentum is not None:
            self._momentum.commit()
        self._steps += 1
        if not self._initialized or self._momentum is not None:
            self._initialize_state()

    def _apply(self, delta: torch.Tensor, pieces: Optional[list] = None, momentum_of_decay: bool = True) -> None:
        """Weight decay with its own momentum w (uncompressed), then x = x − η·u (SPEC §1):
        w = μ·w + λ·x;  u = Δ̃ + μ·w + λ·x (nesterov) or Δ̃ + w;  x = x − η·u. Without
        ``momentum_of_decay`` (signum), u = Δ̃ + λ·x. Δ̃ is ``delta``, or the ``pieces`` still
        compressed (``_received_pieces``)."""
        layout = self._layout
        for (start, stop), group, params in zip(layout.group_bounds, self.param_groups, layout.group_params):
            if not params:
                continue
            wd = group["weight_decay"]
            mu, nesterov = (group["momentum"], group["nesterov"]) if momentum_of_decay else (0.0, False)
            decay = self._wd_buffer[start:stop] if wd != 0 else None
            if pieces is None:
                _kernels.descend_(params, delta[start:stop], decay, group["lr"], mu, wd, nesterov)
                continue
            mine = [(at - start, payload) for at, payload in pieces if at < stop and at + payload.numel > start]
            _kernels.descend_blocksign_(params, [at for at, _ in mine], [payload["scales"] for _, payload in mine],
                                        [payload["bits"] for _, payload in mine],
                                        [payload.block_sizes for _, payload in mine], decay, group["lr"], mu, wd,
                                        nesterov)

    def _sgd_update(self) -> None:
        """torch's own SGD update on the averaged p.grad (what ``torch.optim.SGD.step`` runs, without
        running the step hooks a second time)."""
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            has_sparse = self._init_group(group, params, grads, buffers)
            functional_sgd(params, grads, buffers, weight_decay=group["weight_decay"],
                                momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                                nesterov=group["nesterov"], maximize=group["maximize"], has_sparse_grad=has_sparse,
                                foreach=group["foreach"], fused=group["fused"])
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buf

    # --- reporting and state --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[what] += time.perf_counter() - start

    def comm_stats(self) -> dict:
        """Cumulative bytes this rank put on and took off the wire, the number of steps (and of skipped
        ones, and with ``overlap=True`` of those whose buckets ``step()`` exchanged again because
        something changed after backward), and seconds spent compressing on the worker (with the
        worker's step taken ahead, the pass that also reads the gradients and steps the momentum)
        and in the exchange (communication and the server step). ``bytes_source`` says whether the
        bytes were measured at the MPI boundary or computed (``allreduce``: SPEC §3's ring formula,
        as the allreduce runs inside Horovod or MPI)."""
        return {"bytes_sent": self.comm.bytes_sent, "bytes_received": self.comm.bytes_received,
                "bytes_source": get_topology(self._topology_name).bytes_source,
                "steps": self._steps, "skipped_steps": self._skipped_steps, "redone_steps": self._redone_steps,
                "compress_time_s": self._seconds["compress"], "exchange_time_s": self._seconds["exchange"]}

    def partial_sum_density(self) -> dict:
        """Mean fraction of nonzeros of the partial sums this rank recompressed so far, by the number
        of workers' Δ_i each sums (``ring``: one per hop; ``tree``: one per inner node; empty for
        the other topologies, which never recompress a sum). With a sparsifier such as ``topk``, how
        fast the sums fill in along the ring or up the tree."""
        totals: dict = {}
        for bucket in self.buckets:
            for terms, (nonzeros, elements) in bucket.topology.partial_sums.items():
                t = totals.setdefault(terms, [0, 0])
                t[0], t[1] = t[0] + nonzeros, t[1] + elements
        return {terms: nonzeros / elements for terms, (nonzeros, elements) in sorted(totals.items()) if elements}

    def state_dict(self) -> dict:
        """torch's SGD state dict plus ours. Under error feedback ``state`` holds, per parameter, views
        of the live momentum m_i and weight-decay buffer w (what ``hvd.broadcast_optimizer_state``
        broadcasts in place); the ``distef`` entry holds the flat buffers, the worker error e_i, the
        server error ẽ where this rank holds it (per bucket) and the compressors' streams; each
        group's η_{t-1} is its ``prev_lr``."""
        state = super().state_dict()
        state["distef"] = {
            "config": dict(self.config(), rank=self.comm.rank),
            "steps": self._steps, "skipped_steps": self._skipped_steps,
            "momentum": None if self._momentum is None else self._momentum.current,
            "weight_decay_buffer": self._wd_buffer,
            "worker_error": None if self._worker_memory is None else self._worker_memory.state_dict(),
            "topology": [b.topology.state_dict() for b in self.buckets],
            "worker_compressor": self._worker_compressor.state_dict(),
            "server_compressor": [b.topology.compressor.state_dict() for b in self.buckets],
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Validates everything first, then loads; the param group dicts stay the ones the wrapped
        SGD shares (a scheduler built on it keeps driving this optimizer). Under ``allreduce`` a
        ``torch.optim.SGD`` or horovod.torch checkpoint loads too."""
        ours = self._validated(state_dict)
        groups = self.param_groups
        super().load_state_dict({"state": state_dict["state"] if self._rule == "sgd" else {},
                                 "param_groups": state_dict["param_groups"]})
        for mine, loaded in zip(groups, self.param_groups):
            mine.update(loaded)
            mine.setdefault("prev_lr", 0.0)
        self.param_groups = groups
        self._backward_passes, self._synchronized, self._exchanged = 0, False, None
        if ours is not None:
            for buf, saved in ((None if self._momentum is None else self._momentum.current, ours.get("momentum")),
                               (self._wd_buffer, ours.get("weight_decay_buffer"))):
                if buf is not None:
                    buf.zero_() if saved is None else buf.copy_(saved)
            if self._worker_memory is not None:
                self._worker_memory.load_state_dict(ours["worker_error"])
            self._worker_compressor.load_state_dict(ours["worker_compressor"])
            for bucket, topology, compressor in zip(self.buckets, ours["topology"], ours["server_compressor"]):
                bucket.topology.load_state_dict(topology)
                bucket.topology.compressor.load_state_dict(compressor)
            self._steps, self._skipped_steps = ours["steps"], ours["skipped_steps"]
        self._initialize_state()

    def _validated(self, state_dict: dict) -> Optional[dict]:
        """Our part of ``state_dict`` (None for a plain torch/Horovod SGD checkpoint under ``allreduce``),
        after checking that all of it fits this optimizer (nothing is changed)."""
        sizes = [len(g["params"]) for g in state_dict.get("param_groups", [])]
        if self._rule == "sgd":
            self._check_torch_state(state_dict.get("state", {}))
        if "distef" not in state_dict:
            if self._rule == "sgd" and sizes == [len(g["params"]) for g in self.param_groups]:
                return None
            raise ValueError("this is not a hvd_distef.DistributedOptimizer state dict (no 'distef' entry) of this "
                             "model: a torch.optim.SGD or horovod.torch checkpoint has no worker or server errors. "
                             "Resume it with topology='allreduce' (same param groups), or start afresh")
        ours = state_dict["distef"]
        saved, mine = ours["config"], dict(self.config(), rank=self.comm.rank)
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
        if diffs:
            raise ValueError("the checkpoint comes from another configuration (" + "; ".join(diffs) + ")")
        if sizes != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the checkpoint's param groups do not have this optimizer's sizes")
        for name in ("momentum", "weight_decay_buffer"):
            saved_buf = ours.get(name)
            if saved_buf is not None and saved_buf.shape != (self.numel,):
                raise ValueError(f"the checkpoint's {name} has {saved_buf.numel()} elements, this run {self.numel}")
        if self._worker_memory is not None:
            self._worker_memory.check_state(ours.get("worker_error"))
        for key in ("topology", "server_compressor"):
            if not isinstance(ours.get(key), list) or len(ours[key]) != len(self.buckets):
                raise ValueError(f"the checkpoint's {key} is not a list of {len(self.buckets)} buckets")
        for bucket, topology in zip(self.buckets, ours["topology"]):
            bucket.topology.check_state(topology)
        for key in ("steps", "skipped_steps"):
            if not isinstance(ours.get(key), int) or ours[key] < 0:
                raise ValueError(f"the checkpoint's {key} is {ours.get(key)!r}, not a count")
        streams = [("worker_compressor", self._worker_compressor, ours["worker_compressor"])]
        streams += [("server_compressor", b.topology.compressor, saved)
                    for b, saved in zip(self.buckets, ours["server_compressor"])]
        for key, compressor, saved in streams:
            if not isinstance(saved, dict) or set(saved) != set(compressor.state_dict()):
                raise ValueError(f"the checkpoint's {key} state {saved!r} does not fit {compressor!r}")
            try:
                copy.deepcopy(compressor).load_state_dict(saved)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"the checkpoint's {key} state does not load: {exc}") from exc
        return ours

    def _check_torch_state(self, state: dict) -> None:
        """torch's per-parameter state (by index over the groups) must fit the parameters' shapes."""
        everything = [p for g in self.param_groups for p in g["params"]]
        for index, entries in state.items():
            if not isinstance(index, int) or not 0 <= index < len(everything):
                raise ValueError(f"the checkpoint has state for parameter {index!r}, this optimizer has "
                                 f"{len(everything)} parameters")
            p = everything[index]
            for name, value in entries.items():
                if torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(f"the checkpoint's {name} of parameter {index} "
                                     f"({self._parameter_names[p]}) has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(p.shape)}: it comes from another model")
