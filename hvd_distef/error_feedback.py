"""Error memories of SPEC §1: a worker's e_i and the server's ẽ, and the η_{t-1}/η_t rescale.

Each step a role compensates its vector with its stored error, rescaled by the ratio of the
previous to the current learning rate of each param group (only the error is rescaled, never
the gradient), compresses, and keeps what the compressor did not send.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .compressors import Compressor
from .kernel_args import Segments
from .payload import Payload


class Shard(NamedTuple):
    """A contiguous slice of the fused buffer that is compressed and sent as one payload."""

    start: int
    stop: int
    block_sizes: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.stop - self.start


def lr_ratio_segments(group_bounds: Sequence[Tuple[int, int]], prev_lrs: Sequence[float], lrs: Sequence[float],
                      idle: Sequence[Tuple[int, int]] = (), decay: Optional[float] = None) -> Segments:
    """(start, stop, η_{t-1}/η_t) for each param group's slice of the fused buffer (η_{-1} = 0), where
    η_{t-1} is the group's last non-zero lr. A group at lr = 0, and the ``idle`` slices (parameters
    no rank has a gradient for), get ratio 0: their errors are kept aside and put back (SPEC §5a).

    ``decay``: the ratio is this fixed β instead (errors decayed by β each step, whatever the lr:
    Wu et al. 2018's alternative to the rescale, for comparison; the paper's rule is the default)."""
    cuts = sorted(idle)
    segments = []
    for (start, stop), prev, lr in zip(group_bounds, prev_lrs, lrs):
        ratio = 0.0 if lr <= 0 else prev / lr if decay is None else decay
        at = start
        for a, b in cuts:
            if b <= at or a >= stop:
                continue
            if a > at:
                segments.append((at, a, ratio))
            segments.append((max(a, at), min(b, stop), 0.0))
            at = min(b, stop)
        if at < stop:
            segments.append((at, stop, ratio))
    return segments


def window(segments: Segments, start: int, stop: int) -> Segments:
    """The segments clipped to [start, stop), re-based to start at 0 (for a shard of the buffer)."""
    out = []
    for s, e, r in segments:
        lo, hi = max(s, start), min(e, stop)
        if lo < hi:
            out.append((lo - start, hi - start, r))
    return out


class ErrorMemory:
    """One role's error e (zeros at start) and its compensate-compress-keep step.

    Where the compressor defers e <- p − Δ (``Compressor.defers_settle``), the buffer holds p
    between steps and the Δ still to subtract is kept per shard; the next step subtracts it in the
    same pass, and reading ``error`` subtracts it first, so what anyone sees is always e.

    With a ``Compressor.lossless`` compressor (``none``) e starts at zero and stays exactly zero
    (p = d + r·0 = d, e = p − p = 0), so its steps touch no memory at all: Δ = C(d). The memory
    knows it is zero until a lossy step, a taken-ahead step or a loaded non-zero error says otherwise
    (what ``Untouched`` and ``Rollback`` put back was read while it was zero: zeros).
    """

    def __init__(self, numel: int, device: torch.device | str = "cpu"):
        self._buffer = torch.zeros(numel, dtype=torch.float32, device=device)
        self._unsettled: Dict[Tuple[int, int], Tuple[Compressor, Payload]] = {}  # (start, stop) -> (compressor, Δ)
        self._zero = True  # every element is zero (``lossless`` steps skip the memory)

    @property
    def error(self) -> torch.Tensor:
        """e, with every deferred subtraction done."""
        for (start, stop), (compressor, delta) in self._unsettled.items():
            compressor.settle(self._buffer[start:stop], delta)
        self._unsettled.clear()
        return self._buffer

    def _kept(self, compressor: Compressor, where: Tuple[int, int], delta: Payload) -> Payload:
        if compressor.defers_settle:
            self._unsettled[where] = (compressor, delta)
        return delta

    def _take_unsettled(self, where: Tuple[int, int]):
        return self._unsettled.pop(where, (None, None))[1]

    def step(self, compressor: Compressor, d: torch.Tensor, segments: Segments,
             shards: Sequence[Shard], d_is_scratch: bool = False) -> List[Payload]:
        """p = d + (η_{t-1}/η_t)·e;  Δ = C(p);  e <- p − Δ, one payload per shard of d.
        ``d_is_scratch``: the caller no longer needs d, and p may be written over it (no new vector)."""
        if compressor.lossless and self._zero:  # e = 0 stays 0: p = d and Δ = C(d)
            return [compressor.compress(d[s.start:s.stop], s.block_sizes) for s in shards]
        self._zero = False
        return [self._kept(compressor, (s.start, s.stop), compressor.compress_with_feedback(
                    d[s.start:s.stop], self._buffer[s.start:s.stop], s.block_sizes,
                    window(segments, s.start, s.stop), self._take_unsettled((s.start, s.stop)),
                    scratch=d[s.start:s.stop] if d_is_scratch else None))
                for s in shards]

    def step_ahead(self, shards: Sequence[Shard], spare: torch.Tensor, compress) -> Optional[List[Payload]]:
        """The step written into ``spare`` (a buffer of the memory's length) while the memory stays as
        it was, so that it can still be dropped: per shard, ``compress(shard, e, e_out, unsettled)``
        returns Δ with its deferred subtraction ``unsettled`` settled, leaving p in ``e_out`` (a
        ``Compressor.defers_settle`` step). Returns the payloads, or None as soon as one is None.
        ``commit`` takes the step."""
        payloads = []
        for s in shards:
            payload = compress(s, self._buffer[s.start:s.stop], spare[s.start:s.stop],
                               self._unsettled.get((s.start, s.stop), (None, None))[1])
            if payload is None:
                return None
            payloads.append(payload)
        return payloads

    def commit(self, compressor: Compressor, shards: Sequence[Shard], spare: torch.Tensor,
               payloads: Sequence[Payload]) -> torch.Tensor:
        """``spare``, written by ``step_ahead`` over all of ``shards`` with these payloads, becomes the
        memory; returns the former buffer, free for other use."""
        if sum(s.numel for s in shards) != self._buffer.numel() or spare.shape != self._buffer.shape:
            raise ValueError("a step taken ahead must cover the whole memory")
        old, self._buffer, self._zero = self._buffer, spare, False
        self._unsettled = {(s.start, s.stop): (compressor, p) for s, p in zip(shards, payloads)}
        return old

    def mean_step(self, compressor: Compressor, payloads: Sequence[Payload], segments: Segments,
                  block_sizes: Sequence[int], scratch: Optional[torch.Tensor] = None) -> Payload:
        """The server's step: p = (1/M)·Σ_i Δ_i + (η_{t-1}/η_t)·e;  Δ = C(p);  e <- p − Δ (whole memory).
        ``scratch``: a float32 vector of the memory's length for the mean and p (else a new one); the
        payload may be a view of it."""
        if compressor.lossless and self._zero:  # e = 0 stays 0: Δ = C(mean)
            return compressor.compress(compressor.decompress_mean(payloads, out=scratch), block_sizes)
        self._zero = False
        whole = (0, self._buffer.numel())
        return self._kept(compressor, whole, compressor.mean_with_feedback(payloads, self._buffer, block_sizes,
                                                                           segments, self._take_unsettled(whole),
                                                                           scratch=scratch))

    def keep(self, start: int, stop: int, store: torch.Tensor) -> dict:
        """What [start, stop) of the memory holds now, for ``put_back``: its buffer copied into
        ``store`` (same coordinates), and the deferred subtractions of the shards inside it
        (returned). No pass over the memory beyond the copy."""
        store[start:stop].copy_(self._buffer[start:stop])
        return {k: v for k, v in self._unsettled.items() if start <= k[0] and k[1] <= stop}

    def put_back(self, start: int, stop: int, store: torch.Tensor, unsettled: dict) -> None:
        """[start, stop) as ``keep`` found it."""
        self._buffer[start:stop].copy_(store[start:stop])
        for key in [k for k in self._unsettled if start <= k[0] and k[1] <= stop]:
            del self._unsettled[key]
        self._unsettled.update(unsettled)

    def clear(self, start: int, stop: int) -> None:
        """[start, stop) set to zeros, its deferred subtractions dropped: for a step that will be put
        back (``keep``/``put_back``) and must still exchange something."""
        self._buffer[start:stop].zero_()
        for key in [k for k in self._unsettled if start <= k[0] and k[1] <= stop]:
            del self._unsettled[key]

    def state_dict(self) -> torch.Tensor:
        return self.error.clone()

    def check_state(self, error: Optional[torch.Tensor]) -> None:
        """Raise unless ``error`` can be loaded (changes nothing)."""
        if error is None or error.shape != self._buffer.shape:
            raise ValueError(f"error memory has {None if error is None else error.numel()} elements, this run "
                             f"needs {self._buffer.numel()}: the checkpoint is from another model or topology")

    def load_state_dict(self, error: torch.Tensor) -> None:
        self.check_state(error)
        self._unsettled.clear()
        self._buffer.copy_(error)
        self._zero = not bool(self._buffer.any())
