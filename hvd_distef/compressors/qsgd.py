"""QSGD (Alistarh et al. 2017): s levels, unbiased stochastic rounding of |x_i|/||x||_2.

Payload: one float32 norm and d int8 signed levels (s <= 127). Under error feedback the output is
scaled by 1/(1+β), β = min(d/s², √d/s), which makes it δ-approximate (SPEC §2); the scale is
folded into the transmitted norm.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..payload import Layout, Payload
from .base import Compressor, blocks_or_whole, check_flat


class QSGD(Compressor):
    name = "qsgd"

    def __init__(self, levels: int = 15, scaled: bool = True, seed: int = 0):
        if int(levels) != levels or not 1 <= levels <= 127:
            raise ValueError(f"levels must be an integer in [1, 127], got {levels!r}")
        self.levels = int(levels)
        self.scaled = bool(scaled)
        self.seed = int(seed)
        self.stream = 0
        self._calls = 0

    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        return (("norm", torch.float32, 1), ("levels", torch.int8, numel))

    def scale(self, numel: int) -> float:
        """1/(1+β) when ``scaled`` (error-feedback use), else 1."""
        if not self.scaled or numel == 0:
            return 1.0
        s = self.levels
        return 1.0 / (1.0 + min(numel / s**2, math.sqrt(numel) / s))

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        gen = torch.Generator(device=x.device)
        gen.manual_seed(hash((self.seed, self.stream, self._calls)) & 0x7FFF_FFFF_FFFF_FFFF)
        self._calls += 1
        # ||x||_2 in float64: finite float32 values can have a norm beyond float32's range; the
        # norm sent saturates at float32's largest value, so every output is finite
        norm = torch.linalg.vector_norm(x, dtype=torch.float64)
        r = (x.abs() / torch.where(norm > 0, norm, torch.ones_like(norm)) * self.levels).to(torch.float32)
        lev = r.floor()
        lev += torch.rand(x.shape, generator=gen, device=x.device) < (r - lev)
        q = (lev * torch.where(x >= 0, 1.0, -1.0)).to(torch.int8)
        sent = (norm * self.scale(x.numel())).clamp(max=torch.finfo(torch.float32).max).to(torch.float32)
        return Payload(x.numel(), blocks_or_whole(x, block_sizes), {"norm": sent.reshape(1), "levels": q})

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload["levels"].to(torch.float32) * (payload["norm"] / self.levels)

    def decompress_into(self, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(payload["levels"]).mul_(payload["norm"] / self.levels)  # as ``decompress``, in place

    def state_dict(self) -> dict:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])
