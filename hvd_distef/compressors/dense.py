"""Dense compressors: ``none`` (float32, the identity) and ``fp16`` (half precision)."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from .. import _kernels
from ..payload import Layout, Payload
from .base import Compressor, blocks_or_whole, check_flat


class NoCompression(Compressor):
    """The identity: the payload is the float32 vector itself (no copy), so error feedback stays 0
    (``lossless``: the error memories skip it)."""

    name = "none"
    dtype = torch.float32
    lossless = True

    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        return (("values", self.dtype, numel),)

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        return Payload(x.numel(), blocks_or_whole(x, block_sizes), {"values": x.to(self.dtype)})

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload["values"].to(torch.float32)

    def decompress_into(self, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        values = payload["values"]
        if values.dtype == out.dtype and values.data_ptr() == out.data_ptr():
            return out  # received in place (``Topology.landing``)
        return out.copy_(values)  # float16 -> float32 is exact: what ``decompress`` gives

    def residual(self, p: torch.Tensor, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        # p − float32(values), the cast inside the subtraction (exact), with no float32 copy of Δ
        return torch.sub(p, payload["values"], out=out)


class FP16(NoCompression):
    """Round to float16 (2 bytes per element), saturating at ±65504: a finite input never becomes
    inf, and under error feedback the error memory carries what the cast cut off."""

    name = "fp16"
    dtype = torch.float16
    max_value = 65504.0
    lossless = False

    def _output(self, error: torch.Tensor) -> torch.Tensor:
        """The float16 vector an error step on ``error`` (a shard's worker or server error) writes its
        payload into, kept across steps: a fresh one of a large model's size page-faults every step.
        So a payload of an error step is valid until the next error step on the same error vector."""
        outputs = self.__dict__.setdefault("_outputs", {})
        key = (error.data_ptr(), error.numel(), error.device)
        if key not in outputs:
            outputs[key] = torch.empty(error.numel(), dtype=self.dtype, device=error.device)
        return outputs[key]

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        clone.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_outputs"})
        return clone  # without the buffers: they belong to one role (``for_stream``)

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        # saturate after the cast, on the half-size result: the same bits as casting the clamped x
        # (|x| in (65504, 65520) rounds to 65504; beyond, inf is clamped to it; NaN stays NaN), with
        # no float32 copy of x
        values = x.to(self.dtype).clamp_(-self.max_value, self.max_value)
        return Payload(x.numel(), blocks_or_whole(x, block_sizes), {"values": values})

    def compress_with_feedback(self, d, error, block_sizes, segments, unsettled=None, scratch=None) -> Payload:
        """p = d + r·e;  Δ = fp16(p) saturated;  e <- p − Δ, in one pass (``_kernels.half_feedback``)."""
        check_flat(d)
        return Payload(d.numel(), blocks_or_whole(d, block_sizes),
                       {"values": _kernels.half_feedback([d], error, segments, self.max_value, self._output(error))})

    def mean_with_feedback(self, payloads, error, block_sizes, segments, unsettled=None, scratch=None) -> Payload:
        """The server's step in one pass: the mean of the float16 payloads is formed in it (no float32 copy)."""
        return Payload(error.numel(), blocks_or_whole(error, block_sizes),
                       {"values": _kernels.half_feedback([p["values"] for p in payloads], error, segments,
                                                         self.max_value, self._output(error))})
