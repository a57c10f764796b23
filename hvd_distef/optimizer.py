"""DistributedOptimizer: SPEC §1 on top of the user's ``torch.optim.SGD``, with horovod.torch's
surface (SPEC §5a).

A step reads the gradients into one fused buffer, agrees with the other ranks on what to do
(``agreement``), runs the worker side (momentum, error feedback, compression), the topology's
exchange and server step, and the update. ``synchronize()`` is the first half (up to Δ̃, or the
averaged gradient under ``allreduce``), ``step()`` the second; what a step must leave alone is
kept aside by ``untouched``.
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

from . import _kernels, agreement, horovod_args
from .comm import Comm
from .compressors import Compression, get_compressor
from .error_feedback import ErrorMemory, lr_ratio_segments
from .fused import FusedLayout
from .topologies import get_topology
from .untouched import Untouched

NONFINITE_POLICIES = ("raise", "skip", "propagate")
#: horovod.torch's warning, word for word (scripts and tests look for it)
SYNCHRONIZE_WARNING = ("optimizer.step() called without optimizer.skip_synchronize() context after "
                       "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                       "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your code.")
HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


class _Exchanged(NamedTuple):
    """What ``synchronize()`` leaves for ``step()``."""

    update: Optional[torch.Tensor]   #: Δ̃ (ef), the vote (signum), or None (sgd: the averaged p.grad)
    untouched: List[Untouched]
    exposed: bool                    #: the update was written into p.grad (the user may have changed it)
    skipped: bool                    #: nothing to apply (no gradients, a non-finite gradient, AMP's inf)
    nonfinite: Optional[Exception] = None  #: decided after an explicit synchronize(): raise it unless AMP skips


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
                 nonfinite: Optional[str] = None, comm=None, timeout_s: Optional[float] = None):
        failure = None
        try:
            topology_cls = self._configure(optimizer, named_parameters, compression, topology,
                                           backward_passes_per_step, nonfinite)
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
        """Topology, flat buffers and backward hooks, once every rank agreed."""
        options = {"op": self._op, "predivide": self._predivide} if self._rule == "sgd" else {}
        self.topology = topology_cls(self.comm, self.compressor, self._layout.sizes, self.device, **options)
        self.block_sizes = self.topology.block_sizes
        self._worker_compressor = self.compressor.for_stream(self.comm.rank)
        zeros = lambda: torch.zeros(self.numel, dtype=torch.float32, device=self.device)  # noqa: E731
        # Flat buffers allocated once (fresh 100 MB tensors every step cost more in page faults than
        # the arithmetic), whatever the hyper-parameters are now: they may change at run time.
        self._grad = zeros()
        own_update = self._rule in ("ef", "signum")
        self._momentum = zeros() if own_update else None
        self._wd_buffer = zeros() if own_update else None
        self._scratch = zeros() if self._rule == "signum" else None
        self._worker_memory = ErrorMemory(self.numel, self.device) if self._rule == "ef" else None
        self._steps = 0
        self._skipped_steps = 0
        self._initialized = False
        self._seconds = {"compress": 0.0, "exchange": 0.0}
        self._backward_passes = 0
        self._end_of_backward_queued = False
        self._grads_reset = False
        self._grad_seen: dict = {}  # parameter -> weak reference to its gradient after its last accumulation
        self._synchronized = False
        self._should_synchronize = True
        self._exchanged: Optional[_Exchanged] = None
        this = weakref.ref(self)  # hooks must not keep a discarded optimizer (and its buffers) alive

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
        failure, has_grad, nonfinite = None, self._layout.has_grad(), []
        try:
            nonfinite = self._fuse_gradients()
        except (ValueError, RuntimeError) as exc:  # told to every rank below, instead of a hang
            failure = exc
        decision = agreement.agree_on_step(self.comm, has_grad, failure, nonfinite, self._amp_found_inf(),
                                           self._hyperparameters()["param_groups"])
        self._backward_passes = 0
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
        update, untouched = {"ef": self._exchange_ef, "signum": self._exchange_signum,
                             "sgd": self._exchange_sgd}[self._rule](decision.has_grad)
        if expose and update is not None:
            self._layout.write_grads(update, decision.has_grad)
        return _Exchanged(update, untouched, expose and update is not None, skipped=False)

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
        (m = μ·0 + g = g, as torch's first step), or None where momentum is 0."""
        self._initialized = True
        layout = self._layout
        if self._rule != "sgd":
            for p, m, w in zip(layout.params, layout.views(self._momentum), layout.views(self._wd_buffer)):
                self.state[p] = {"momentum_buffer": m, "weight_decay_buffer": w}
            return
        for group, params in zip(self.param_groups, layout.group_params):
            for p in params:
                if self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p) if group["momentum"] != 0 else None

    def _fuse_gradients(self) -> List[str]:
        """All gradients in ``self._grad`` (None as zeros, sparse densified), unscaled for AMP; returns
        the names of this rank's parameters with non-finite gradients."""
        if self._backward_passes > self.backward_passes_per_step:
            raise ValueError(f"gradients were accumulated over {self._backward_passes} backward passes before "
                             f"step(), more than backward_passes_per_step={self.backward_passes_per_step}; raise "
                             f"it, call step() more often, or zero_grad() between")
        self._check_hyperparameters()
        moved = [n for n, p in zip(self._layout.names, self._layout.params) if p.dtype != torch.float32]
        if moved:
            raise ValueError(f"{', '.join(moved)} is no longer float32 (the fused buffer is float32)")
        grad = self._layout.gather(self._grad)
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # torch's unscale: multiply by the float32 reciprocal computed in double
            grad.mul_(scale.double().reciprocal().float())
        return self._layout.nonfinite(grad)

    def _untouched(self, idle: List[Tuple[int, int]], params: List[torch.Tensor]) -> List[Untouched]:
        """Idle parameters keep everything; groups at lr = 0 keep their errors (SPEC §5a)."""
        memories = [(self._worker_memory, 0), (self.topology.server_memory, self.topology.server_start)]
        still = [bounds for bounds, g in zip(self._layout.group_bounds, self.param_groups) if g["lr"] == 0]
        return [Untouched(idle, [self._momentum, self._wd_buffer], memories, params), Untouched(still, (), memories)]

    def _exchange_ef(self, has_grad: List[bool]):
        """SPEC §1: worker momentum and error feedback, the topology's exchange (server step inside)."""
        idle, params = self._layout.idle(has_grad)
        untouched = self._untouched(idle, params)
        segments = lr_ratio_segments(self._layout.group_bounds, [g["prev_lr"] for g in self.param_groups],
                                     [g["lr"] for g in self.param_groups], idle)
        d = self._nesterov_direction(self._grad)
        for a, b in idle:
            d[a:b].zero_()
        with self._timed("compress"):
            payloads = self._worker_memory.step(self._worker_compressor, d, segments, self.topology.shards)
        with self._timed("exchange"):
            delta = self.topology.exchange(payloads, segments)
        return delta, untouched

    def _nesterov_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """m = μ·m + g;  d = g + μ·m (nesterov) or m;  in place in ``grad``, per param group."""
        for (start, stop), group in zip(self._layout.group_bounds, self.param_groups):
            if group["momentum"] != 0:
                _kernels.momentum_(grad[start:stop], self._momentum[start:stop], group["momentum"], group["nesterov"])
        return grad

    def _exchange_signum(self, has_grad: List[bool]):
        """Signum with majority vote: m = μ·m + (1−μ)·g; vote = sign(Σ sign(m_i))."""
        untouched = self._untouched(*self._layout.idle(has_grad))
        grad = self._grad
        for (start, stop), group in zip(self._layout.group_bounds, self.param_groups):
            mu = group["momentum"]
            if mu != 0:
                m, g = self._momentum[start:stop], grad[start:stop]
                g.copy_(m.mul_(mu).add_(torch.mul(g, 1 - mu, out=self._scratch[start:stop])))
        with self._timed("compress"):
            signs = _kernels.pack_signs(grad)
        with self._timed("exchange"):
            vote = self.topology.exchange(signs)
        return vote, untouched

    def _exchange_sgd(self, has_grad: List[bool]):
        """Stock SGDM: the topology averages the gradient into p.grad (None stays None where no rank has one)."""
        with self._timed("exchange"):
            averaged = self.topology.exchange(self._grad)
        self._layout.write_grads(averaged, has_grad)
        return None, []

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
            self._apply(update, momentum_of_decay=self._rule == "ef")
        for u in done.untouched:
            u.restore()
        for g in self.param_groups:
            if g["lr"] != 0:
                g["prev_lr"] = g["lr"]
        self._steps += 1
        if not self._initialized:
            self._initialize_state()

    def _apply(self, delta: torch.Tensor, momentum_of_decay: bool = True) -> None:
        """Weight decay with its own momentum w (uncompressed), then x = x − η·u (SPEC §1):
        w = μ·w + λ·x;  u = Δ̃ + μ·w + λ·x (nesterov) or Δ̃ + w;  x = x − η·u. Without
        ``momentum_of_decay`` (signum), u = Δ̃ + λ·x."""
        layout = self._layout
        for (start, stop), group, params in zip(layout.group_bounds, self.param_groups, layout.group_params):
            if not params:
                continue
            wd = group["weight_decay"]
            mu, nesterov = (group["momentum"], group["nesterov"]) if momentum_of_decay else (0.0, False)
            _kernels.descend_(params, delta[start:stop], self._wd_buffer[start:stop] if wd != 0 else None,
                              group["lr"], mu, wd, nesterov)

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
        ones), and seconds spent compressing on the worker and in the exchange (communication and
        the server step)."""
        return {"bytes_sent": self.comm.bytes_sent, "bytes_received": self.comm.bytes_received,
                "steps": self._steps, "skipped_steps": self._skipped_steps,
                "compress_time_s": self._seconds["compress"], "exchange_time_s": self._seconds["exchange"]}

    def state_dict(self) -> dict:
        """torch's SGD state dict plus ours. Under error feedback ``state`` holds, per parameter, views
        of the live momentum m_i and weight-decay buffer w (what ``hvd.broadcast_optimizer_state``
        broadcasts in place); the ``distef`` entry holds the flat buffers, the worker error e_i, the
        server error ẽ where this rank holds it and the compressors' streams; each group's η_{t-1}
        is its ``prev_lr``."""
        state = super().state_dict()
        state["distef"] = {
            "config": dict(self.config(), rank=self.comm.rank),
            "steps": self._steps, "skipped_steps": self._skipped_steps,
            "momentum": self._momentum, "weight_decay_buffer": self._wd_buffer,
            "worker_error": None if self._worker_memory is None else self._worker_memory.state_dict(),
            "topology": self.topology.state_dict(),
            "worker_compressor": self._worker_compressor.state_dict(),
            "server_compressor": self.topology.compressor.state_dict(),
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
            for buf, saved in ((self._momentum, ours.get("momentum")),
                               (self._wd_buffer, ours.get("weight_decay_buffer"))):
                if buf is not None:
                    buf.zero_() if saved is None else buf.copy_(saved)
            if self._worker_memory is not None:
                self._worker_memory.load_state_dict(ours["worker_error"])
            self.topology.load_state_dict(ours["topology"])
            self._worker_compressor.load_state_dict(ours["worker_compressor"])
            self.topology.compressor.load_state_dict(ours["server_compressor"])
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
        self.topology.check_state(ours.get("topology", {}))
        for key in ("steps", "skipped_steps"):
            if not isinstance(ours.get(key), int) or ours[key] < 0:
                raise ValueError(f"the checkpoint's {key} is {ours.get(key)!r}, not a count")
        for key, compressor in (("worker_compressor", self._worker_compressor),
                                ("server_compressor", self.topology.compressor)):
            saved = ours.get(key)
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
