"""``allreduce``: the stock baseline. The float32 gradient is averaged over the optimizer's ranks
(fp16 on the wire with ``Compression.fp16``), then the optimizer applies torch's own
SGD-with-momentum update.

Horovod's allreduce runs it over the world or the given ``process_set``; over a ``comm=`` that is a
subset of the world it is MPI's Allreduce on that communicator. ``op="sum"`` sums instead of
averaging; ``predivide`` is Horovod's ``gradient_predivide_factor`` (scale by 1/f before the sum and
f/M after, as horovod.torch does). In fp16 the sum is formed in fp16, so the gradient is scaled by
1/M before the cast (1/f when given) and saturated at ±65504/M, so that the fp16 sum of M terms is
finite for every finite gradient.

Bytes per step are SPEC §3's ring-allreduce volume, sent and received by every rank,
2·(M−1)/M·(bytes per element)·d: computed, not measured (the allreduce runs inside Horovod or MPI,
whose algorithm we cannot see), and labelled so (``bytes_source``).
"""
from __future__ import annotations

import torch

from .base import RING_FORMULA, Topology

FP16_MAX = 65504.0


class Allreduce(Topology):
    name = "allreduce"
    update_rule = "sgd"
    bytes_source = RING_FORMULA
    options = ("op", "predivide")

    def __init__(self, comm, compressor, tensor_sizes, device="cpu", delta=None, op: str = "average",
                 predivide: float = 1.0):
        if compressor.name not in ("none", "fp16"):
            raise ValueError(f"topology 'allreduce' sums dense vectors and cannot carry "
                             f"{compressor.name!r} payloads; use compression none or fp16, or a "
                             f"compressed topology such as 'ps'")
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        import horovod.torch as hvd
        if not hvd.is_initialized():
            raise ValueError("topology 'allreduce' runs Horovod's allreduce: call hvd.init() first")
        self.hvd = hvd
        self.gpu_horovod = bool(hvd.cuda_built() or hvd.rocm_built())  # takes CUDA tensors itself
        self.fp16 = compressor.name == "fp16"
        self.by_horovod = comm.is_world or comm.process_set is not None
        if self.fp16 and not self.by_horovod:
            raise ValueError("allreduce with fp16 over a comm= subset needs Horovod's fp16 sum: pass the ranks as "
                             "process_set= (hvd.ProcessSet) instead of comm=")
        self.average, self.predivide = op == "average", predivide
        # Horovod pairs the ranks' tensors by name: one per bucket of each optimizer, alike on every rank
        self.tensor_name = comm.unique_name("hvd_distef.allreduce")

    def exchange(self, grad: torch.Tensor, segments=None) -> torch.Tensor:
        """The average (or sum) of every rank's gradient, in place in ``grad`` (the optimizer's fused
        buffer: no copy of a gradient's size)."""
        size = self.comm.size
        if size == 1:
            return grad
        if self.fp16:
            # pre-scaled in float32 (1/M, or Horovod's 1/f), saturated, summed in fp16, post-scaled
            pre = (1.0 / (size if self.predivide == 1.0 else self.predivide)) if self.average else 1.0
            bound = FP16_MAX * (1 - 2.0 ** -10) / size  # M terms of at most this sum below fp16's inf
            wire = torch.mul(grad, pre, out=grad).clamp_(-bound, bound).to(torch.float16)
            self._reduce(wire, average=False)
            result = grad.copy_(wire)  # float16 -> float32 is exact
            if self.average and pre != 1.0 / size:
                result.mul_(1.0 / (pre * size))
        else:
            wire = result = grad
            self._reduce(result, self.average)
        self.comm.count_ring_allreduce(wire)
        return result

    def _reduce(self, wire: torch.Tensor, average: bool) -> None:
        """Horovod's allreduce as horovod.torch's optimizer calls it (predivide included), or MPI's. A
        CUDA tensor goes through host memory where Horovod was built without GPU operations."""
        hvd, comm = self.hvd, self.comm
        if not self.by_horovod:
            comm.allreduce_sum_(wire)
            if average:
                wire.div_(comm.size)
            return
        kw = {} if comm.process_set is None else {"process_set": comm.process_set}
        scales = ({"prescale_factor": 1.0 / self.predivide, "postscale_factor": self.predivide}
                  if average and self.predivide != 1.0 else {})
        target, finish = (comm.staging.on_host(wire) if wire.is_cuda and not self.gpu_horovod
                          else (wire, lambda: wire))
        handle = hvd.allreduce_async_(target, op=hvd.Average if average else hvd.Sum, name=self.tensor_name,
                                      **scales, **kw)
        comm.wait_until("Horovod's allreduce", lambda: hvd.poll(handle))  # bounded by timeout_s, as our own
        hvd.synchronize(handle)
        finish()
