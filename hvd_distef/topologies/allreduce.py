"""``allreduce``: the stock baseline. Horovod averages the float32 gradient (fp16 on the wire with
``Compression.fp16``), then the optimizer applies torch's own SGD-with-momentum update.

Bytes per step are Horovod's ring-allreduce volume, sent and received by every rank:
2·(M−1)/M·(bytes per element)·d.
"""
from __future__ import annotations

import torch

from .base import Topology


class Allreduce(Topology):
    name = "allreduce"
    update_rule = "sgd"

    def __init__(self, comm, compressor, tensor_sizes, device="cpu"):
        if compressor.name not in ("none", "fp16"):
            raise ValueError(f"topology 'allreduce' sums dense vectors and cannot carry "
                             f"{compressor.name!r} payloads; use compression none or fp16, or a "
                             f"compressed topology such as 'ps'")
        super().__init__(comm, compressor, tensor_sizes, device)
        import horovod.torch as hvd
        if not hvd.is_initialized():
            raise ValueError("topology 'allreduce' runs Horovod's allreduce: call hvd.init() first")
        self.hvd = hvd
        self.wire_dtype = torch.float16 if compressor.name == "fp16" else torch.float32

    def exchange(self, grad: torch.Tensor, segments=None) -> torch.Tensor:
        """The average of every rank's gradient."""
        size = self.comm.size
        wire = grad.to(self.wire_dtype)
        with self.comm.watch("Horovod allreduce"):
            self.hvd.allreduce_(wire, op=self.hvd.Average, name="hvd_distef.allreduce")
        volume = 2 * (size - 1) * self.numel * wire.element_size() / size
        self.comm.count(sent=volume, received=volume)
        return wire.to(torch.float32)
