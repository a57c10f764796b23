"""DistributedOptimizer: SPEC §1 on top of the user's ``torch.optim.SGD``, with horovod.torch's surface
(SPEC §5a).

A step is SPEC §1 in order: the worker reads its gradients and steps its momentum (``rules``); every
rank agrees on what to do with the step (``agreement``); each bucket's worker error feedback and
compression, the topology's exchange and server step (``rules``, ``topologies``); the update. Overlap
(``overlap``), checkpoints (``checkpoint``), options (``options``) and statistics (``stats``) live in
rooms of their own. May import every floor below it; nothing of ours imports it but the package.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterable, Optional, Tuple

import torch

from . import agreement, amp, buckets, checkpoint, horovod_args, options
from .comm import Comm
from .compressors import Compression
from .overlap import Overlap
from .rules import Exchanged, Prepared, Workspace
from .stats import Statistics, partial_sum_density
from .topologies import get_topology

#: horovod.torch's warning, word for word (scripts and tests look for it)
SYNCHRONIZE_WARNING = ("optimizer.step() called without optimizer.skip_synchronize() context after "
                       "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                       "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your code.")
NOTHING = Exchanged(None, [], False, skipped=True)


class DistributedOptimizer(torch.optim.SGD):
    """Wraps a ``torch.optim.SGD`` and trains with compressed communication (SPEC §1, §4, §5a).

    The returned object is a ``torch.optim.SGD`` whose ``param_groups`` are the wrapped optimizer's own
    dicts: a scheduler built on either drives both, and lr, momentum, nesterov and weight_decay may change
    between steps (the error rescale η_{t-1}/η_t follows lr; lr = 0 leaves x and the errors as they were).

    Args (horovod.torch's, in its order; then ours, by keyword):
        optimizer: a ``torch.optim.SGD``. Parameters with ``requires_grad=False`` (any dtype) are not the
            optimizer's work; the others must be float32 (the fused buffer is float32).
        named_parameters: ``model.named_parameters()``, for error messages and the rank agreement check.
        compression: a compressor name, ``Compression.<name>`` class, configured instance, or Horovod's
            ``hvd.Compression.none`` / ``.fp16``.
        backward_passes_per_step: backward passes allowed per step (counted per ``backward()`` call;
            ``zero_grad()``, gradients set to None and ``step()`` restart the count); the gradient used is
            ``p.grad`` as the passes left it: summed, as in torch and Horovod (SPEC §1).
        op, gradient_predivide_factor, num_groups, groups, sparse_as_dense: Horovod's (``horovod_args``).
        process_set: a Horovod process set: only its ranks exchange (a rank outside it trains alone).
        topology: one of ``hvd_distef.topologies.REGISTRY`` (``"ps"``, ``"allreduce"``, ...).
        nonfinite: what a NaN or inf gradient on some rank does: ``"raise"`` (every rank raises
            ``NonFiniteGradientError`` before touching any buffer; the default under error feedback, where a
            NaN in an error memory would stay for good), ``"skip"`` (skipped on every rank, counted) or
            ``"propagate"`` (``allreduce`` only, and its default: the NaN reaches every rank, as in torch).
        overlap: exchange the gradients bucket by bucket during backward (``overlap``; SPEC §4). Set lr and
            the like before backward. ``zero_grad()`` between a backward and ``step()`` drops its buckets: on
            every rank, the step is exchanged afresh; on some ranks only, the step raises on every rank.
        bucket_cap_mb: MiB of float32 per bucket with ``overlap=True`` (DDP's ``bucket_cap_mb``).
        error_decay: multiply both error memories by this fixed β in [0, 1] each step instead of rescaling
            them by η_{t-1}/η_t (Wu et al. 2018; None, the default, keeps SPEC §1's rule).
        comm: an mpi4py communicator to use instead of ``MPI.COMM_WORLD`` (``comm.MPIProcess``).
        timeout_s, stall_warning_s: after ``stall_warning_s`` (60 s) in one of our collectives rank 0 warns,
            naming the ranks missing; after ``timeout_s`` (1800 s) the job is aborted with a message (``comm``).
        local_size: ranks per node for ``topology="hierarchical"`` (default: the ranks that share memory).
        node_path: how the ranks of a node share its work under ``topology="hierarchical"``: ``"slices"``
            (the default: local rank l sums, compresses and exchanges slice l) or ``"leaders"`` (local rank 0
            does it all); ``topologies/hierarchical.py``.

    Raises (on every rank, naming each rank's cause): ``TypeError``/``ValueError`` for bad arguments on any
    rank, or ranks that disagree on the model or options. The param groups' hyper-parameters may differ at
    construction (``hvd.broadcast_optimizer_state`` aligns them): a step under error feedback or signum
    raises ``ValueError`` where they still differ; under ``allreduce`` each rank steps with its own, as
    under Horovod.
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
                 comm=None, timeout_s: Optional[float] = None, stall_warning_s: Optional[float] = None,
                 local_size: Optional[int] = None, node_path: Optional[str] = None):
        failure = topology_cls = rule_cls = None
        try:  # everything that can fail on one rank alone
            topology_cls, rule_cls = options.configure(
                self, optimizer, named_parameters, compression, topology, backward_passes_per_step, nonfinite, overlap,
                bucket_cap_mb, error_decay, op, gradient_predivide_factor, num_groups, groups, local_size,
                node_path)
        except (TypeError, ValueError) as exc:  # told to every rank below, instead of a hang
            failure = exc
        self.comm = Comm(comm, timeout_s, process_set, stall_warning_s)
        agreement.check_construction(self.comm, None if failure else dict(self.config(), **self._options()), failure)
        self._build(topology_cls, rule_cls)

    def _build(self, topology_cls, rule_cls) -> None:
        """Buckets and their topologies, the update rule and its buffers, overlap and the backward hooks."""
        if self.overlap:  # its bucket thread's collectives on a communicator of its own (comm.MPIProcess)
            self.comm = self.comm.private()
        # Δ̃ (ef), the vote (signum): one flat buffer allocated once, the topologies' buckets its slices
        delta = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self.buckets = buckets.build(self._layout, self.bucket_cap_mb, topology_cls, self.comm, self.compressor,
                                     delta, **options.topology_options(self, topology_cls))
        self.block_sizes = tuple(b for bucket in sorted(self.buckets, key=lambda b: b.start)
                                 for b in bucket.topology.block_sizes)
        self.stats = Statistics()
        self.rule = rule_cls(Workspace(self._layout, self.param_groups, self.buckets, delta, self.stats,
                                       self.comm.size, self.error_decay), self.compressor, self.comm.rank, self.overlap)
        self._overlap = None
        if self.overlap:  # a gradient final for the step starts its bucket
            self._overlap = Overlap(self.rule, self._layout, self.buckets,
                                    functools.partial(options.hyperparameters, self.param_groups))
            self._passes.on_final = self._overlap.ready
        self._initialized, self._synchronized, self._should_synchronize = False, False, True
        self._exchanged: Optional[Exchanged] = None

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", True):
            raise ValueError("hvd_distef fuses all parameters at construction; add param groups to the "
                             "torch.optim.SGD before wrapping it")
        super().add_param_group(param_group)

    def config(self) -> dict:
        """The structure every rank must share and a checkpoint must match (``options.config``)."""
        return options.config(self)

    def _options(self) -> dict:  # what every rank must agree on besides ``config`` at construction
        return {"nonfinite": self.nonfinite, "op": self._op, "gradient_predivide_factor": self._predivide}

    # --- Horovod's surface --------------------------------------------------------------------------
    backward_passes_per_step = property(lambda self: self._passes.allowed)

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's: allow ``passes`` backward passes per step from now on (the count restarts)."""
        self._passes.set_allowed(passes)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._passes.count = 0
        if self._overlap is not None:
            self._overlap.check_zero_grad()  # a backward pass dropped: its buckets complete, then are put back
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
        """Horovod's first half of ``step()``, on every rank: after it, ``p.grad`` holds what ``step()`` will
        apply, identical on every rank. Under ``allreduce`` that is the averaged gradient (Horovod's meaning);
        under error feedback it is Δ̃ of SPEC §1, the decompressed server update (momentum and both error
        memories have advanced: call ``step()`` next); under ``majority_vote``, the vote. Clip or inspect it,
        then ``with opt.skip_synchronize(): opt.step()``."""
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
            if self._overlap is not None:
                self._overlap.note_scale(amp.loss_scale(self))
        return loss

    # --- the step: SPEC §1 in order -------------------------------------------------------------------
    def _synchronize(self, expose: bool) -> None:
        if not self._synchronized:  # an error leaves this optimizer as it was
            self._exchanged, self._synchronized = self._exchange(expose), True

    def _exchange(self, expose: bool) -> Exchanged:
        if self._is_state_initialization():
            return NOTHING
        self._drain_buckets()
        speculated = self._overlap is not None and self._overlap.take()
        try:
            return self._agree_and_exchange(expose, speculated)
        except BaseException:
            if speculated:
                self._overlap.rollback.restore()
            raise

    def _drain_buckets(self) -> None:  # hvd_distef.GradScaler calls it before its collective inf check
        if self._overlap is not None:
            self._overlap.drain()

    def _agree_and_exchange(self, expose: bool, speculated: bool) -> Exchanged:
        # the worker side up to what the ranks must agree on: gradients read, momentum stepped
        failure, has_grad, prepared, scale = None, self._layout.has_grad(), Prepared([]), amp.loss_scale(self)
        voided = self._overlap is not None and self._overlap.take_voided()
        try:  # this rank's reasons to refuse the step first
            checkpoint.raise_deferred(self)
            self._passes.check()
            options.check_hyperparameters(self.param_groups, self.rule)
            self._layout.check_params()
            prepared = self._overlap.outcome(scale) if speculated else self.rule.prepare_step(scale)
        except (ValueError, RuntimeError) as exc:  # told to every rank below, instead of a hang
            failure = exc
        decision = agreement.agree_on_step(self.comm, has_grad, failure or prepared.failure, prepared.nonfinite,
                                           amp.found_inf(self), None if self.rule.own_hyperparameters
                                           else options.hyperparameters(self.param_groups), prepared.stale, voided)
        self._passes.count = 0
        if decision.found_inf:  # the stock GradScaler's update() backs off on every rank alike
            amp.share_found_inf(self)
        idle, idle_params = self._layout.idle(decision.has_grad)
        kept = (speculated and not decision.redo and not decision.found_inf and decision.nonfinite is None
                and self.rule.keeps_speculation(idle))
        if speculated and not kept:
            self._overlap.rollback.restore()
        if decision.found_inf or (decision.nonfinite is not None and self.nonfinite != "propagate"):
            if not decision.found_inf and expose:
                # Horovod's meaning: after synchronize() every rank's p.grad holds the non-finite values, so
                # that GradScaler.unscale_ finds them on every rank (the AMP recipe skips the step and backs
                # off alike); nothing was exchanged and step() raises unless AMP skips it
                self._layout.fill_nan(decision.has_grad)
                return NOTHING._replace(nonfinite=decision.nonfinite)
            if not decision.found_inf and self.nonfinite == "raise":
                raise decision.nonfinite
            self.stats.skipped_steps += 1
            return NOTHING
        if not any(decision.has_grad):  # torch's SGD: a step with no gradients changes nothing
            return NOTHING
        if speculated and not kept:
            self.stats.redone_steps += 1
        # the worker's error feedback and compression, the exchange and the server step, bucket by bucket
        untouched = self.rule.exchange(prepared, kept, idle, idle_params, scale)
        self.rule.keep(idle)
        return self.rule.exchanged(expose, decision.has_grad, untouched, scale)

    def _is_state_initialization(self) -> bool:
        """horovod.torch's ``broadcast_optimizer_state`` calls step() with zero gradients on the ranks with no
        state yet (after a rank-0-only resume: all but rank 0): that call only creates the state, on its own."""
        params = self._layout.params
        if (self._initialized or self.stats.steps or self.stats.skipped_steps or not params
                or any(p.grad is None or p.grad.is_sparse or bool(p.grad.any()) for p in params)
                or not horovod_args.creating_state()):
            return False
        self._initialize_state()
        return True

    def _initialize_state(self) -> None:  # per-parameter state, alike on every rank (what Horovod broadcasts)
        self._initialized = True
        self.rule.initialize_state(self.state)

    def _finish(self) -> None:
        """The update where the step goes ahead on every rank; idle parameters put back; η_{t-1} recorded."""
        done = self._exchanged
        if done is not None and done.nonfinite is not None:  # found by an explicit synchronize()
            if not amp.found_inf(self) and self.nonfinite == "raise":
                raise done.nonfinite
            self.stats.skipped_steps += 1
        if done is None or done.skipped:
            return
        if amp.found_inf(self):  # GradScaler.unscale_ after synchronize() found an inf
            self.stats.skipped_steps += 1
            return
        self.rule.apply(done, self)
        for u in done.untouched:
            u.restore()
        for g in self.param_groups:
            if g["lr"] != 0:
                g["prev_lr"] = g["lr"]
        self.rule.commit()
        self.stats.steps += 1
        if not self._initialized or not self.rule.torch_state:  # our flat buffers' views moved (``DoubleBuffer``)
            self._initialize_state()

    # --- statistics and state --------------------------------------------------------------------------
    def comm_stats(self) -> dict:
        """Bytes this rank sent and received and their ``bytes_source`` (measured at the MPI boundary, or SPEC §3's
        ring formula), bytes it shared with its node's ranks through memory (``hierarchical``), steps (skipped;
        redone under overlap), seconds compressing and exchanging (``stats``)."""
        return self.stats.comm_stats(self.comm, get_topology(self._topology_name).bytes_source)

    def partial_sum_density(self) -> dict:
        """Mean nonzero fraction of the partial sums this rank recompressed, by the number of Δ_i each sums."""
        return partial_sum_density([b.topology for b in self.buckets])

    def state_dict(self) -> dict:
        """torch's SGD state dict plus ``distef`` (``checkpoint``); ``state`` holds views of the live momentum and
        weight-decay buffers (``hvd.broadcast_optimizer_state`` broadcasts in place); η_{t-1} is ``prev_lr``."""
        return dict(super().state_dict(), distef=checkpoint.distef_entry(self))

    def gathered_state_dict(self, root_rank: int = 0) -> Optional[dict]:
        """One state dict for the whole job, collective (call it on every rank): every rank's ``state_dict()``
        gathered at ``root_rank``, which gets the dict to save (the others get None); every rank then loads
        that file with ``load_state_dict`` and takes its own part (``checkpoint.gathered``)."""
        return checkpoint.gathered(self, root_rank)

    def load_state_dict(self, state_dict: dict) -> None:
        """Validates everything first, then loads (``checkpoint.load``); the param group dicts stay the ones
        the wrapped SGD shares. Takes this rank's part of a ``gathered_state_dict``. Under ``allreduce`` a
        ``torch.optim.SGD`` or horovod.torch checkpoint, or another rank's, loads too; under error feedback
        another rank's state dict loads nothing and the next step raises on every rank."""
        checkpoint.load(self, state_dict)
        self._passes.count, self._synchronized, self._exchanged = 0, False, None
        self._initialize_state()
