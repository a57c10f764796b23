"""The compressor interface (SPEC §2), its registry, and the generic error-feedback step.

A compressor maps a flat float32 vector with block boundaries to a ``Payload`` and back. Its
payload layout must depend only on (numel, block_sizes), so every rank can decode raw bytes.
Subclass ``Compressor``, set ``name``, and implement ``layout``, ``compress`` and ``decompress``;
the class is then available by name to ``DistributedOptimizer(compression="yourname")``.
"""
from __future__ import annotations

import copy
import hashlib
from typing import ClassVar, List, Optional, Sequence

import torch

from .. import _kernels
from ..registry import Registry
from ..payload import Layout, Payload

REGISTRY = Registry("compressor")


class Compressor:
    """Base class: stateless maps except for an optional random stream (see ``for_stream``)."""

    name: ClassVar[str] = ""
    #: whether blocks other than one-per-vector change what it computes (blocksign only)
    uses_blocks: ClassVar[bool] = False
    #: whether ``compress_with_feedback`` leaves p in the error and defers e <- p − C(p) to its next
    #: call (``unsettled``) or to ``settle``: one pass over memory instead of two (ErrorMemory
    #: keeps track; SPEC §1 is unchanged)
    defers_settle: ClassVar[bool] = False
    #: whether C(x) = x exactly for every finite x (``none``): under error feedback the errors then
    #: stay exactly zero, and ``ErrorMemory`` skips the compensation and the residual (p = d)
    lossless: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY.register(cls)

    # --- what subclasses implement -------------------------------------------------------
    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        """Field names, dtypes and counts of the payload for a vector of this shape."""
        raise NotImplementedError

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError

    # --- capabilities: what only some compressors can do, asked by the update rules -------------
    def fuses_update(self, device: torch.device) -> bool:
        """Whether the update can decompress Δ̃ of this compressor inside its own pass over the
        parameters on ``device`` (``descends``, ``descend_``), so that Δ̃ is never written out in full."""
        return False

    def fuses_worker_step(self, device: torch.device, numel: int, block_sizes: Sequence[int]) -> bool:
        """Whether ``momentum_with_feedback`` runs the worker's momentum and error step in one pass
        from the gradients on ``device``, for a shard of this shape (the step taken ahead of the ranks'
        agreement)."""
        return False

    def descends(self, payload: Payload) -> bool:
        """Whether ``descend_`` takes this payload as it is (where ``fuses_update``)."""
        return False

    def descend_(self, params: Sequence[torch.Tensor], pieces: Sequence[tuple], decay_buffer: Optional[torch.Tensor],
                 descent: _kernels.Descent) -> None:
        """The update of SPEC §1 (``_kernels.descend_``) with Δ̃ as ``pieces``, (start in the params'
        slice, payload) in order, decompressed in the same pass (where ``fuses_update``)."""
        raise NotImplementedError(f"{self.name} does not decompress Δ̃ inside the update")

    def momentum_with_feedback(self, grads: _kernels.Grads, momentum: _kernels.Momentum, error: torch.Tensor,
                               error_out: torch.Tensor, start: int, block_sizes: Sequence[int],
                               segments: _kernels.Segments, unsettled: Optional[Payload] = None) -> Optional[Payload]:
        """``compress_with_feedback`` of the worker's d on the shard [start, start + len(error)) of the
        gradients, computed in the same pass from them (where ``fuses_worker_step``)."""
        raise NotImplementedError(f"{self.name} has no one-pass worker step")

    def decompress_into(self, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        """``decompress`` written into ``out`` (a float32 vector of payload.numel), which is returned.
        Topologies call it every step with the same buffer; override it to skip the copy (and the
        allocation of a vector of numel floats: on the CPU a fresh one page-faults every step)."""
        return out.copy_(self.decompress(payload))

    # --- shared machinery ------------------------------------------------------------------
    def blocks(self, tensor_sizes: Sequence[int]) -> List[int]:
        """Block boundaries for a fused buffer of tensors with these sizes (default: one block)."""
        total = sum(tensor_sizes)
        return [total] if total else []

    def compress_with_feedback(self, d: torch.Tensor, error: torch.Tensor, block_sizes: Sequence[int],
                               segments: _kernels.Segments, unsettled: Optional[Payload] = None,
                               scratch: Optional[torch.Tensor] = None) -> Payload:
        """One error-feedback step: p = d + r·e; Δ = C(p); e <- p - Δ (in place). Returns Δ's payload.
        ``unsettled``: the previous step's Δ when ``error`` still holds its p (``defers_settle``).
        ``scratch``: a float32 vector of d's length to hold p (``d`` itself where the caller no longer
        needs d), instead of a new one; ``error`` is written only once C(p) succeeded."""
        if unsettled is not None:
            self.settle(error, unsettled)
        p = _kernels.compensate(d, error, segments, out=scratch)
        payload = self.compress(p, block_sizes)
        self.residual(p, payload, error)
        return payload

    def mean_with_feedback(self, payloads: Sequence[Payload], error: torch.Tensor, block_sizes: Sequence[int],
                           segments: _kernels.Segments, unsettled: Optional[Payload] = None,
                           scratch: Optional[torch.Tensor] = None) -> Payload:
        """The server's error-feedback step: p = (1/M)·Σ_i decompress(payload_i) + r·e;  C(p);  e <- p − C(p).
        ``scratch``: a float32 vector of the payloads' length for the mean and p (else a new one)."""
        mean = self.decompress_mean(payloads, out=scratch)
        return self.compress_with_feedback(mean, error, block_sizes, segments, unsettled, scratch=mean)

    def residual(self, p: torch.Tensor, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        """e = p − decompress(payload) into ``out`` (not p), the last line of an error step. Override it
        where Δ is cheaper to subtract than to decompress (a sparse Δ, a float16 one)."""
        return torch.sub(p, self.decompress_into(payload, out), out=out)

    def settle(self, error: torch.Tensor, payload: Payload) -> None:
        """e <- p − Δ: the last line of an error step, where ``error`` holds p and ``payload`` is Δ."""
        error.sub_(self.decompress(payload))

    def decompress_mean(self, payloads: Sequence[Payload], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(1/M)·Σ_i decompress(payload_i), in the order ((Δ_0 + Δ_1) + ...)/M, into ``out`` when given
        (a float32 vector of the payloads' length; else a new one). One payload is its own mean (x/1 = x)."""
        first, rest = payloads[0], payloads[1:]
        if out is not None and rest:  # Δ_0 + Δ_1 written once, not copied then added to
            acc, rest = torch.add(self.decompress(first), self.decompress(rest[0]), out=out), rest[1:]
        else:
            acc = self.decompress(first).clone() if out is None else self.decompress_into(first, out)
        for p in rest:
            acc.add_(self.decompress(p))
        return acc.div_(len(payloads)) if len(payloads) > 1 else acc

    def for_stream(self, stream: int) -> "Compressor":
        """A copy for one role (a worker rank or the server) with its own random stream."""
        clone = copy.deepcopy(self)
        clone.stream = stream
        return clone

    def state_dict(self) -> dict:
        """Whatever a resumed run needs to continue identically (random stream positions)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def config(self) -> dict:
        """The options that define what this compressor computes (for fingerprints and logs): its
        public attributes, as plain values that every rank can compare (see ``describe``)."""
        return {k: describe(v) for k, v in vars(self).items() if not k.startswith("_") and k != "stream"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def describe(value):
    """A value as something picklable that compares equal across ranks: numbers, strings and their
    containers as they are; a tensor by shape, dtype and a digest of its bytes; anything else by
    its type (its repr may hold a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return f"tensor{tuple(value.shape)}:{value.dtype}:{hashlib.sha1(data).hexdigest()[:16]}"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def blocks_or_whole(x: torch.Tensor, block_sizes: Optional[Sequence[int]]) -> tuple:
    """Validated block sizes for x: the given ones, or a single block."""
    if block_sizes is None:
        return (x.numel(),) if x.numel() else ()
    block_sizes = tuple(int(b) for b in block_sizes)
    if sum(block_sizes) != x.numel() or any(b <= 0 for b in block_sizes):
        raise ValueError(f"block_sizes must be positive and sum to the vector length {x.numel()}, "
                         f"got {len(block_sizes)} blocks summing to {sum(block_sizes)}")
    return block_sizes


def check_flat(x: torch.Tensor) -> None:
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"compressors take a flat float32 vector, got shape {tuple(x.shape)} dtype {x.dtype}")


def get_compressor(spec) -> Compressor:
    """Turn what a user typed (a name, a Compressor class or instance) into a Compressor instance."""
    if isinstance(spec, Compressor):
        return spec
    if isinstance(spec, type) and issubclass(spec, Compressor):
        return spec()
    if isinstance(spec, str) and spec in REGISTRY:
        return REGISTRY[spec]()
    raise ValueError(f"unknown compression {spec!r}; choose one of {sorted(REGISTRY)} "
                     f"or pass a hvd_distef.Compressor subclass")
