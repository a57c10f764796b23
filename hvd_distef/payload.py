"""Wire format: what a compressor puts on the wire for one flat vector (SPEC §2).

A payload is an ordered set of named flat tensors (for example ``scales`` float32 and ``bits``
uint8). Its *layout* (name, dtype, count per field) is a pure function of the compressor, the
vector length and the block boundaries, so receivers rebuild it from raw bytes without headers.
Sign bits are packed 8 per byte, little bit order: element ``i`` is bit ``i % 8`` of byte
``i // 8``; a set bit means ``+1`` (sign(0) = +1, also for -0.0).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

Layout = Tuple[Tuple[str, torch.dtype, int], ...]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layout_nbytes(layout: Layout) -> int:
    """Bytes on the wire for a payload of this layout."""
    return sum(count * _itemsize(dtype) for _, dtype, count in layout)


class Payload:
    """Named flat tensors for one compressed vector, plus what decompression needs to know locally.

    ``numel`` and ``block_sizes`` describe the vector the payload encodes; they are known to every
    rank and never sent.
    """

    __slots__ = ("tensors", "numel", "block_sizes")

    def __init__(self, numel: int, block_sizes: Sequence[int], tensors: Dict[str, torch.Tensor]):
        self.numel = int(numel)
        self.block_sizes = tuple(block_sizes)
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def layout(self) -> Layout:
        return tuple((n, t.dtype, t.numel()) for n, t in self.tensors.items())

    @property
    def nbytes(self) -> int:
        """Bytes this payload occupies on the wire."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> torch.Tensor:
        """The payload as one contiguous uint8 tensor on its fields' device, fields in layout order
        (``Comm`` stages CUDA bytes for MPI). A payload of one contiguous field (``none``, ``fp16``) is
        a view of it, not a copy: valid while that field is."""
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in self.tensors.values()]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def from_bytes(cls, buf: torch.Tensor, layout: Layout, numel: int, block_sizes: Sequence[int],
                   device: torch.device | str = "cpu") -> "Payload":
        """Rebuild a payload from ``to_bytes`` output (a uint8 tensor of exactly ``layout_nbytes``)."""
        expected = layout_nbytes(layout)
        if buf.numel() != expected:
            raise ValueError(f"payload has {buf.numel()} bytes, layout expects {expected}")
        tensors, offset = {}, 0
        for name, dtype, count in layout:
            size = count * _itemsize(dtype)
            chunk = buf[offset:offset + size]
            if chunk.storage_offset() % _itemsize(dtype):
                chunk = chunk.clone()  # reinterpreting needs an aligned start
            tensors[name] = chunk.view(dtype).to(device)
            offset += size
        return cls(numel, block_sizes, tensors)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}:{str(d).replace('torch.', '')}[{c}]" for n, d, c in self.layout)
        return f"Payload(numel={self.numel}, nbytes={self.nbytes}, {fields})"
