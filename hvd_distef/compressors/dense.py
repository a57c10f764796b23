"""Dense compressors: ``none`` (float32, the identity) and ``fp16`` (half precision)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..payload import Layout, Payload
from .base import Compressor, blocks_or_whole, check_flat


class NoCompression(Compressor):
    """The identity: the payload is the float32 vector itself (no copy), so error feedback stays 0."""

    name = "none"
    dtype = torch.float32

    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        return (("values", self.dtype, numel),)

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        return Payload(x.numel(), blocks_or_whole(x, block_sizes), {"values": x.to(self.dtype)})

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload["values"].to(torch.float32)


class FP16(NoCompression):
    """Round to float16 (2 bytes per element), saturating at ±65504: a finite input never becomes
    inf, and under error feedback the error memory carries what the cast cut off."""

    name = "fp16"
    dtype = torch.float16
    max_value = 65504.0

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        values = x.clamp(-self.max_value, self.max_value).to(self.dtype)
        return Payload(x.numel(), blocks_or_whole(x, block_sizes), {"values": values})
