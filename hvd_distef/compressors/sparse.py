"""Sparsifiers: ``topk`` (k largest magnitudes, values + indices) and ``randomk`` (k coordinates
drawn from a seed; only the values and the seed travel). Both are δ-approximate with δ = k/d
(randomk in expectation)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..payload import Layout, Payload
from .base import Compressor, blocks_or_whole, check_flat


class _KSparse(Compressor):
    def __init__(self, ratio: float = 0.01, k: Optional[int] = None):
        if k is not None and (int(k) != k or k <= 0):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        self.ratio = ratio
        self.k = None if k is None else int(k)

    def num_kept(self, numel: int) -> int:
        """k for a vector of ``numel`` elements: the fixed k, else ceil(ratio·numel) (at least 1)."""
        if self.k is None:
            return min(numel, max(1, math.ceil(self.ratio * numel)))
        if self.k > numel:
            raise ValueError(f"{self.name}: k={self.k} is larger than the vector it compresses "
                             f"({numel} elements); lower k or use ratio=")
        return self.k

    def _scatter(self, payload: Payload, indices: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        values = payload["values"]
        out = (torch.zeros(payload.numel, dtype=torch.float32, device=values.device) if out is None
               else out.zero_())
        return out.index_put_((indices.long(),), values)

    def _indices_of(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self._scatter(payload, self._indices_of(payload))

    def decompress_into(self, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        return self._scatter(payload, self._indices_of(payload), out)

    def residual(self, p: torch.Tensor, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        """p − Δ: p, with zeros where Δ kept p's own values (p_i − p_i = +0 for finite p_i)."""
        return out.copy_(p).index_fill_(0, self._indices_of(payload).long(), 0.0)


class TopK(_KSparse):
    """Keep the k largest |x_i|: k float32 values and k int32 indices on the wire."""

    name = "topk"

    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        k = self.num_kept(numel)
        return (("values", torch.float32, k), ("indices", torch.int32, k))

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        k = self.num_kept(x.numel())
        indices = torch.topk(x.abs(), k, sorted=False).indices
        return Payload(x.numel(), blocks_or_whole(x, block_sizes),
                       {"values": x[indices], "indices": indices.to(torch.int32)})

    def _indices_of(self, payload: Payload) -> torch.Tensor:
        return payload["indices"]


class RandomK(_KSparse):
    """Keep k coordinates chosen by a seed that advances identically on every rank each call, so
    all workers pick the same coordinates in a step; the 8-byte seed travels instead of indices."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, k: Optional[int] = None, seed: int = 0):
        super().__init__(ratio, k)
        self.seed = int(seed)
        self._calls = 0
        self._drawn: Optional[tuple] = None  # (seed, numel, device, indices) of the last draw, reused

    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        return (("seed", torch.int64, 1), ("values", torch.float32, self.num_kept(numel)))

    def _indices(self, seed: int, numel: int, device) -> torch.Tensor:
        """The coordinates of ``seed``; the last draw is kept, as the same seed is drawn again to
        decompress and to subtract Δ from p in the step that compressed it (a full permutation each)."""
        key = (seed, numel, torch.device(device))
        if self._drawn is None or self._drawn[0] != key:
            gen = torch.Generator().manual_seed(seed)
            self._drawn = (key, torch.randperm(numel, generator=gen)[: self.num_kept(numel)].to(device))
        return self._drawn[1]

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        seed = hash((self.seed, self._calls)) & 0x7FFF_FFFF_FFFF_FFFF
        self._calls += 1
        indices = self._indices(seed, x.numel(), x.device)
        return Payload(x.numel(), blocks_or_whole(x, block_sizes),
                       {"seed": torch.tensor([seed], dtype=torch.int64, device=x.device), "values": x[indices]})

    def _indices_of(self, payload: Payload) -> torch.Tensor:
        return self._indices(int(payload["seed"][0]), payload.numel, payload["values"].device)

    def state_dict(self) -> dict:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])
