"""The topology interface (SPEC §3): how the workers' Δ_i reach the server role and Δ̃ comes back.

Error-feedback topologies implement ``exchange(payload, segments) -> Δ̃`` and run the server
step of SPEC §1 where their server role lives. Baselines that replace the update rule say so in
``update_rule`` ("sgd" for stock allreduce SGDM, "signum" for majority vote) and exchange
whatever that rule needs.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Sequence, Type

import torch

from ..comm import Comm
from ..compressors import Compressor
from ..error_feedback import Segments
from ..payload import Payload, layout_nbytes

REGISTRY: Dict[str, Type["Topology"]] = {}


class Topology:
    name: ClassVar[str] = ""
    #: which update the optimizer applies to the exchanged vector: "ef" (SPEC §1), "sgd", "signum"
    update_rule: ClassVar[str] = "ef"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, comm: Comm, compressor: Compressor, numel: int, block_sizes: Sequence[int],
                 device: torch.device | str = "cpu"):
        self.comm = comm
        self.numel = numel
        self.block_sizes = tuple(block_sizes)
        self.device = torch.device(device)
        # The server role compresses with its own copy (its own random stream, SPEC §2).
        self.compressor = compressor.for_stream(-1)
        self.layout = compressor.layout(numel, self.block_sizes)
        self.payload_nbytes = layout_nbytes(self.layout)

    def exchange(self, payload: Payload, segments: Segments) -> torch.Tensor:
        """Send this worker's Δ_i; return Δ̃ (decompressed), bit-identical on every rank."""
        raise NotImplementedError

    def decode(self, buf: torch.Tensor) -> Payload:
        """A full-vector payload from its wire bytes."""
        return Payload.from_bytes(buf, self.layout, self.numel, self.block_sizes, self.device)

    def decode_many(self, buf: torch.Tensor) -> List[Payload]:
        """Equal-size payloads concatenated on the wire, in rank order."""
        return [self.decode(chunk) for chunk in buf.split(self.payload_nbytes)]

    def state_dict(self) -> dict:
        """Server-side state held on this rank (the server error where it lives here)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"topology {self.name!r} holds no state, the checkpoint has {sorted(state)}")


def get_topology(name: str) -> Type[Topology]:
    """The topology class users name in ``topology=``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown topology {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]
