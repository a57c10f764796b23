"""Blockwise scaled sign, the paper's compressor (SPEC §2): C(x)_b = (||x_b||_1/d_b)·sign(x_b).

Payload: B float32 scales, then d sign bits packed 8 per byte, i.e. ceil(d/8) + 4B bytes.
Exact error per block: ||x_b||² − ||x_b||_1²/d_b, so δ = min_b ||x_b||_1²/(d_b·||x_b||²).

Where that is not smaller than the raw vector (4d bytes: blocks of one element, as in a model of
many scalars), the payload is the raw float32 vector instead (``raw_if_smaller``, on by default;
PowerSGD's minimum compression rate is the precedent): compressed bytes never exceed uncompressed,
and the error of such a payload is zero. The choice depends only on (d, B), so every rank makes it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from .. import _kernels
from ..payload import Layout, Payload
from .base import Compressor, blocks_or_whole, check_flat


class BlockSign(Compressor):
    """Scaled sign per block.

    Blocks default to one per parameter tensor (the authors' CIFAR code). ``block_size`` splits
    tensors into blocks of at most that many elements; ``bucket_mb`` instead merges consecutive
    tensors into buckets of at most that many MiB of float32, one block each (their ImageNet code).
    """

    name = "blocksign"
    uses_blocks = True
    defers_settle = True  # the compiled kernel's single pass (cpp_ops/blocksign.cpp); the torch path alike

    def __init__(self, block_size: Optional[int] = None, bucket_mb: Optional[float] = None,
                 raw_if_smaller: bool = True):
        if block_size is not None and (int(block_size) != block_size or block_size <= 0):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if bucket_mb is not None and not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb!r}")
        if block_size is not None and bucket_mb is not None:
            raise ValueError("give block_size or bucket_mb, not both")
        self.block_size = None if block_size is None else int(block_size)
        self.bucket_mb = bucket_mb
        self.raw_if_smaller = bool(raw_if_smaller)

    def blocks(self, tensor_sizes: Sequence[int]) -> List[int]:
        sizes = [int(s) for s in tensor_sizes if s > 0]
        if self.block_size is not None:
            b = self.block_size
            return [min(b, s - i) for s in sizes for i in range(0, s, b)]
        if self.bucket_mb is not None:
            cap = max(1, int(self.bucket_mb * 2**20 // 4))
            buckets: List[int] = []
            for s in sizes:
                if buckets and buckets[-1] + s <= cap:
                    buckets[-1] += s
                else:
                    buckets.append(s)
            return buckets
        return sizes

    def is_raw(self, numel: int, block_sizes: Sequence[int]) -> bool:
        """Whether a vector of this shape goes raw: its sign payload would not be smaller."""
        return self.raw_if_smaller and numel > 0 and math.ceil(numel / 8) + 4 * len(block_sizes) >= 4 * numel

    def layout(self, numel: int, block_sizes: Sequence[int]) -> Layout:
        if self.is_raw(numel, block_sizes):
            return (("values", torch.float32, numel),)
        nblocks = len(block_sizes) if numel else 0
        return (("scales", torch.float32, nblocks), ("bits", torch.uint8, math.ceil(numel / 8)))

    def _payload(self, numel, block_sizes, scales, bits) -> Payload:
        return Payload(numel, block_sizes, {"scales": scales, "bits": bits})

    def compress(self, x: torch.Tensor, block_sizes: Optional[Sequence[int]] = None) -> Payload:
        check_flat(x)
        if x.numel() == 0:
            return self._empty(x)
        block_sizes = blocks_or_whole(x, block_sizes)
        if self.is_raw(x.numel(), block_sizes):
            return Payload(x.numel(), block_sizes, {"values": x.clone()})
        scales, bits = _kernels.blocksign_compress(x, block_sizes)
        return self._payload(x.numel(), block_sizes, scales, bits)

    def decompress(self, payload: Payload) -> torch.Tensor:
        if payload.numel == 0:
            return torch.zeros(0, device=payload["bits"].device)
        if "values" in payload.tensors:
            return payload["values"]
        return _kernels.blocksign_decompress(payload["scales"], payload["bits"], payload.block_sizes,
                                             payload.numel)

    def decompress_into(self, payload: Payload, out: torch.Tensor) -> torch.Tensor:
        if payload.numel == 0:
            return out
        if "values" in payload.tensors:  # raw; received in place where it is decompressed (``Topology.landing``)
            values = payload["values"]
            return out if values.data_ptr() == out.data_ptr() else out.copy_(values)
        return _kernels.blocksign_decompress(payload["scales"], payload["bits"], payload.block_sizes, payload.numel,
                                             out=out)

    def compress_with_feedback(self, d, error, block_sizes, segments, unsettled=None, scratch=None) -> Payload:
        if d.numel() == 0:
            return self._empty(d)
        if self.is_raw(d.numel(), block_sizes):  # the generic step: e <- p − p = 0
            return super().compress_with_feedback(d, error, block_sizes, segments, unsettled, scratch)
        scales, bits = _kernels.blocksign_feedback(d, error, block_sizes, segments, *self._fields(unsettled))
        return self._payload(d.numel(), block_sizes, scales, bits)

    def fuses_update(self, device: torch.device) -> bool:
        return device.type == "cpu" and _kernels.compiled is not None  # cpp_ops/sgd_update.cpp

    def fuses_worker_step(self, device: torch.device, numel: int, block_sizes: Sequence[int]) -> bool:
        return self.fuses_update(device) and not self.is_raw(numel, block_sizes)  # worker_blocksign_feedback

    def descends(self, payload: Payload) -> bool:
        return payload.numel == 0 or "bits" in payload.tensors  # a raw payload is decompressed first

    def descend_(self, params, pieces, decay_buffer, descent) -> None:
        _kernels.descend_blocksign_(params, _kernels.Pieces([at for at, _ in pieces], [p["scales"] for _, p in pieces],
                                                            [p["bits"] for _, p in pieces],
                                                            [p.block_sizes for _, p in pieces]), decay_buffer, descent)

    def momentum_with_feedback(self, grads, momentum, error, error_out, start, block_sizes, segments,
                               unsettled=None) -> Optional[Payload]:
        """``compress_with_feedback`` of the worker's d, computed in the same pass from the gradients where
        backward left them (``_kernels.worker_blocksign_feedback``: the momentum of SPEC §1 into
        ``momentum.next``, p into ``error_out``; the current momentum and ``error`` stay as they were).
        None where a gradient or block scale is not finite. Not for raw shards (``is_raw``)."""
        if error.numel() == 0:
            return self._empty(error)
        scales, bits, usable = _kernels.worker_blocksign_feedback(
            grads, momentum, _kernels.Feedback(error, error_out, start, block_sizes, segments, *self._fields(unsettled)))
        return self._payload(error.numel(), block_sizes, scales, bits) if usable else None

    def mean_with_feedback(self, payloads, error, block_sizes, segments, unsettled=None, scratch=None) -> Payload:
        if error.numel() == 0:
            return self._empty(error)
        if self.is_raw(error.numel(), block_sizes):
            return super().mean_with_feedback(payloads, error, block_sizes, segments, unsettled, scratch)
        scales, bits = _kernels.blocksign_server_feedback([p["scales"] for p in payloads], [p["bits"] for p in payloads],
                                                          error, block_sizes, segments, *self._fields(unsettled))
        return self._payload(error.numel(), block_sizes, scales, bits)

    def settle(self, error: torch.Tensor, payload: Payload) -> None:
        if "values" not in payload.tensors:
            super().settle(error, payload)

    @staticmethod
    def _fields(payload: Optional[Payload]) -> tuple:
        return (None, None) if payload is None else (payload["scales"], payload["bits"])

    def decompress_mean(self, payloads: Sequence[Payload], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        first = payloads[0]
        if first.numel == 0 or "values" in first.tensors:
            return super().decompress_mean(payloads, out)
        return _kernels.blocksign_decompress_mean([p["scales"] for p in payloads], [p["bits"] for p in payloads],
                                                  first.block_sizes, first.numel, out=out)

    def _empty(self, x: torch.Tensor) -> Payload:
        return self._payload(0, (), x.new_zeros(0), torch.zeros(0, dtype=torch.uint8, device=x.device))


class Sign(BlockSign):
    """Scaled sign with one block over the whole fused buffer (the non-block dist-EF-SGD)."""

    name = "sign"
    uses_blocks = False

    def __init__(self):
        super().__init__()

    def blocks(self, tensor_sizes: Sequence[int]) -> List[int]:
        return Compressor.blocks(self, tensor_sizes)

    def config(self) -> dict:
        return {}
