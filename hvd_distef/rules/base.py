"""The update-rule interface: how one step turns the gradients into the update, bucket by bucket.

A rule owns its buffers (the flat gradient buffer, momentum, weight-decay buffer, worker error) and its
part of the state dict. The optimizer calls, in the order of SPEC §1: ``prepare`` (the worker's reading
of the gradients and its momentum; ``step_ahead`` where the compressor does the worker's whole side in
one pass), then, once every rank agreed, ``exchange`` (every bucket's worker side, exchange and server
step), ``keep`` and ``exchanged``, and ``apply`` and ``commit`` when the step goes ahead. May import the
floors below it (fused buffer, error memories, kernels, untouched), never the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, NamedTuple, Optional, Sequence

import torch

from .. import _kernels
from ..buckets import Bucket
from ..compressors import get_compressor
from ..error_feedback import Segments, lr_ratio_segments
from ..fused import DoubleBuffer, FusedLayout, Range
from ..kernel_args import Descent
from ..registry import Registry
from ..stats import Statistics
from ..untouched import Untouched

REGISTRY = Registry("update rule")
#: a worker's compensated vector that its compressor refused, every gradient being finite
OVERFLOW = ("the vector to compress, p = d + (η_{t-1}/η_t)·e, overflowed float32 in some block though every "
            "gradient is finite; lower the lr or the loss scale")


@dataclass
class Workspace:
    """What every rule of one optimizer works on: its fused layout, its param groups (the wrapped SGD's
    own list of dicts), its buckets and their topologies, Δ̃'s flat buffer (``delta``: the topologies
    write into its slices), the statistics, and ``error_decay`` (Wu et al.'s β, or None)."""

    layout: FusedLayout
    groups: List[dict]
    buckets: List[Bucket]
    delta: torch.Tensor
    stats: Statistics
    comm_size: int
    error_decay: Optional[float] = None


class Prepared(NamedTuple):
    """What the worker side found before the ranks agree on the step."""

    nonfinite: List[str]                 #: this rank's parameters with a NaN or inf gradient
    ahead: Optional[list] = None         #: the worker payloads of a step taken ahead (``step_ahead``)
    reread: bool = False                 #: the gradients were read without writing d: read them again
    failure: Optional[Exception] = None  #: this rank's own reason to refuse the step
    stale: bool = False                  #: what the buckets used during backward no longer holds


class Exchanged(NamedTuple):
    """What the first half of a step leaves for ``apply``."""

    update: Optional[torch.Tensor]   #: Δ̃ (error feedback), the vote (signum), or None (sgd: the averaged p.grad)
    untouched: List[Untouched]
    exposed: bool                    #: the update was written into p.grad (the user may have changed it)
    pieces: Optional[list] = None    #: Δ̃ still compressed, (fused start, payload) in order
    skipped: bool = False            #: nothing to apply (no gradients, a non-finite gradient, AMP's inf)
    nonfinite: Optional[Exception] = None  #: decided after an explicit synchronize(): raise it unless AMP skips


class UpdateRule:
    """Base class: one per update, named by the topologies' ``update_rule`` (``REGISTRY``).

    Attributes the optimizer reads: ``nonfinite_default`` and ``allows_propagate`` (what a NaN does);
    ``keeps_errors`` (``error_decay`` applies); ``torch_state`` (the per-parameter state is torch's own
    momentum buffers, checkpointed as torch's SGD does, not flat buffers of ours); ``own_hyperparameters``
    (each rank may step with its own lr, momentum and weight decay, as under Horovod: the update runs
    on each rank from its own param groups and nothing exchanged depends on them); ``memory`` (the
    worker's error memory, or None); ``worker_compressor`` (this rank's copy of the compressor, with its
    own random stream)."""

    name: ClassVar[str] = ""
    nonfinite_default: ClassVar[str] = "raise"
    allows_propagate: ClassVar[bool] = False
    keeps_errors: ClassVar[bool] = False
    torch_state: ClassVar[bool] = False
    own_hyperparameters: ClassVar[bool] = False
    memory = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY.register(cls)

    def __init__(self, ws: Workspace, compressor, rank: int, overlap: bool):
        self.ws, self.compressor = ws, compressor
        # the worker's own compressor (its random stream), or none where the topology compresses for it
        worker = compressor if all(b.topology.compresses_on_worker for b in ws.buckets) else get_compressor("none")
        self.worker_compressor = worker.for_stream(rank)
        # the gradients, bucket by bucket (allocated once: a fresh 100 MB vector per step page-faults)
        self.grad = torch.zeros(ws.layout.numel, dtype=torch.float32, device=ws.layout.device)

    # --- the worker side -------------------------------------------------------------------------------
    def prepare(self, first: int, stop: int, scale: Optional[torch.Tensor]) -> List[str]:
        """Read the gradients of parameters [first, stop) into ``self.grad``, unscaled by AMP's ``scale``
        (and whatever the rule computes in the same pass). Changes no state. Returns the names of this
        rank's parameters among them with non-finite gradients."""
        layout, inv = self.ws.layout, inverse_scale(scale)
        grad = layout.gather(self.grad, first, stop)
        if inv is not None:
            grad.mul_(inv)
        return layout.nonfinite(self.grad, first, stop)

    def prepare_step(self, scale: Optional[torch.Tensor]) -> Prepared:
        """The worker side of a whole step before the ranks agree (``prepare`` of every parameter)."""
        return Prepared(self.prepare(0, len(self.ws.layout.params), scale))

    def keeps_speculation(self, idle: Sequence[Range]) -> bool:
        """Whether the buckets exchanged during backward stand when these parameters are idle."""
        return not idle

    # --- the exchange ------------------------------------------------------------------------------------
    def exchange(self, prepared: Prepared, kept: bool, idle: List[Range], idle_params: List[torch.Tensor],
                 scale: Optional[torch.Tensor]) -> List[Untouched]:
        """Every bucket's exchange, unless the buckets exchanged during backward stand (``kept``);
        returns what the step must put back (idle parameters)."""
        if kept:
            return []
        if prepared.reread:
            self.prepare(0, len(self.ws.layout.params), scale)
        untouched = self.untouched(idle, idle_params)
        segments = self.segments(idle)
        for k in range(len(self.ws.buckets)):
            self.exchange_bucket(k, segments, idle)
        return untouched

    def exchange_bucket(self, k: int, segments, idle: List[Range], on_wire: bool = False,
                        zeros_if_refused: bool = False) -> Optional[ValueError]:
        """The first half of the step on bucket k, its gradients in ``self.grad``."""
        raise NotImplementedError

    def finish_speculation(self) -> None:
        """The pipeline's last bucket ran (``overlap=True``): collect what is still on the wire."""

    def progress(self) -> None:
        """Let what is left on the wire move (the pipeline's thread, waiting for a bucket)."""

    def untouched(self, idle: List[Range], idle_params: List[torch.Tensor]) -> List[Untouched]:
        return []

    def segments(self, idle: List[Range]) -> Segments:
        """The η_{t-1}/η_t factor (or ``error_decay``) of each param group's slice, 0 on idle ranges."""
        groups = self.ws.groups
        return lr_ratio_segments(self.ws.layout.group_bounds, [g["prev_lr"] for g in groups],
                                 [g["lr"] for g in groups], idle, self.ws.error_decay)

    def keep(self, idle: List[Range]) -> None:
        """Idle parameters keep their momentum (SPEC §5a)."""

    def exchanged(self, expose: bool, has_grad: List[bool], untouched: List[Untouched],
                  scale: Optional[torch.Tensor]) -> Exchanged:
        """The update this step applies (written into p.grad where ``expose``: Horovod's synchronize())."""
        raise NotImplementedError

    # --- the update -----------------------------------------------------------------------------------
    def apply(self, done: Exchanged, optimizer) -> None:
        """The update of SPEC §1 (or the baseline's) with what ``exchanged`` gave."""
        raise NotImplementedError

    def commit(self) -> None:
        """The step went ahead on every rank: what it computed is current from now on."""

    def initialize_state(self, state: dict) -> None:
        """torch's per-parameter state (``opt.state``), alike on every rank (what Horovod broadcasts)."""

    # --- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The rule's part of the ``distef`` entry of the optimizer's state dict."""
        return {"momentum": None, "weight_decay_buffer": None, "worker_error": None,
                "worker_compressor": self.worker_compressor.state_dict()}

    def check_state(self, saved: dict) -> None:
        """Raise ValueError unless ``saved`` (from ``state_dict``) fits this rule; changes nothing."""

    def load_state_dict(self, saved: dict) -> None:
        """``saved`` (checked by ``check_state``)."""
        self.worker_compressor.load_state_dict(saved["worker_compressor"])


class OwnUpdate(UpdateRule):
    """A rule that applies its own update (SPEC §1's weight decay with its momentum, then x − η·u) to
    Δ̃ or the vote in ``Workspace.delta``, with the momentum and weight-decay buffers of ``FlatBuffers``."""

    #: whether the weight decay has its own momentum w (error feedback) or is plain λ·x (signum)
    momentum_of_decay: ClassVar[bool] = True

    def __init__(self, ws: Workspace, compressor, rank: int, overlap: bool):
        super().__init__(ws, compressor, rank, overlap)
        self.buffers = FlatBuffers(ws.layout)

    def keep(self, idle: List[Range]) -> None:
        self.buffers.momentum.keep(idle)

    def exchanged(self, expose, has_grad, untouched, scale) -> Exchanged:
        if expose:
            self.ws.layout.write_grads(self.ws.delta, has_grad)
        return Exchanged(self.ws.delta, untouched, expose)

    def apply(self, done: Exchanged, optimizer) -> None:
        if done.exposed:  # what the user left in p.grad after synchronize() (clipped, say)
            self.ws.layout.read_grads(done.update)
        descend(self.ws, done.update, self.buffers.wd, self.momentum_of_decay, done.pieces, self.compressor)

    def commit(self) -> None:
        self.buffers.momentum.commit()

    def initialize_state(self, state: dict) -> None:
        self.buffers.initialize_state(state)

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.buffers.state_dict()}

    def check_state(self, saved: dict) -> None:
        self.buffers.check_state(saved)

    def load_state_dict(self, saved: dict) -> None:
        super().load_state_dict(saved)
        self.buffers.load_state_dict(saved)


class FlatBuffers:
    """The momentum m of SPEC §1 as a ``DoubleBuffer`` (the step writes the next one beside the current
    one, so a step that does not go ahead changes nothing) and the weight-decay buffer w, with what
    ``opt.state[p]`` shows of them: views of the live buffers."""

    def __init__(self, layout: FusedLayout):
        self.layout = layout
        self.momentum = DoubleBuffer(layout.numel, layout.device)
        self.wd = torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)
        self._momentum_views = [layout.views(b) for b in self.momentum.buffers]
        self._wd_views = layout.views(self.wd)

    def initialize_state(self, state: dict) -> None:
        live = self._momentum_views[self.momentum.index]
        for p, m, w in zip(self.layout.params, live, self._wd_views):
            state[p]["momentum_buffer"], state[p]["weight_decay_buffer"] = m, w

    def state_dict(self) -> dict:
        return {"momentum": self.momentum.current, "weight_decay_buffer": self.wd}

    def check_state(self, saved: dict) -> None:
        for name in ("momentum", "weight_decay_buffer"):
            buf = saved.get(name)
            if buf is not None and buf.shape != (self.layout.numel,):
                raise ValueError(f"the checkpoint's {name} has {buf.numel()} elements, this run {self.layout.numel}")

    def load_state_dict(self, saved: dict) -> None:
        for buf, value in ((self.momentum.current, saved.get("momentum")), (self.wd, saved.get("weight_decay_buffer"))):
            buf.zero_() if value is None else buf.copy_(value)


def inverse_scale(scale: Optional[torch.Tensor]) -> Optional[float]:
    """torch's unscale: multiply by the float32 reciprocal of AMP's loss scale, computed in double."""
    return None if scale is None else float(scale.double().reciprocal().float())


def descend(ws: Workspace, delta: torch.Tensor, wd: torch.Tensor, momentum_of_decay: bool,
            pieces: Optional[list] = None, compressor=None) -> None:
    """Weight decay with its own momentum w (uncompressed), then x = x − η·u (SPEC §1):
    w = μ·w + λ·x;  u = Δ̃ + μ·w + λ·x (nesterov) or Δ̃ + w;  x = x − η·u. Without ``momentum_of_decay``
    (signum), u = Δ̃ + λ·x. Δ̃ is ``delta``, or the ``pieces`` still compressed, (fused start, payload)
    in order, which ``compressor`` decompresses inside the pass (``Compressor.descend_``)."""
    layout = ws.layout
    for (start, stop), group, params in zip(layout.group_bounds, ws.groups, layout.group_params):
        if not params:
            continue
        weight_decay = group["weight_decay"]
        mu, nesterov = (group["momentum"], group["nesterov"]) if momentum_of_decay else (0.0, False)
        decay = wd[start:stop] if weight_decay != 0 else None
        descent = Descent(group["lr"], mu, weight_decay, nesterov)
        if pieces is None:
            _kernels.descend_(params, delta[start:stop], decay, descent)
            continue
        mine = [(at - start, payload) for at, payload in pieces if at < stop and at + payload.numel > start]
        compressor.descend_(params, mine, decay, descent)
