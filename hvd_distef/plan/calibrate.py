"""Measurements on this machine, one rank, one thread per rank (OMP_NUM_THREADS): the device profile of
the model (``measure_device``) and the model's forward and backward time (``measure_compute``).

``measure_device`` times the real optimizer steps (``hvd_distef.DistributedOptimizer`` with blocksign and
``ps`` in a world of one rank, stock ``hvd.DistributedOptimizer`` with and without ``Compression.fp16``),
the server step's kernel with 1, 2, 4 and 8 payloads (a least-squares line gives its cost per payload),
and a copy of a large vector; each the median of ``repeats`` after one warm-up, with the gradients set
outside the timed region as in ``benchmarks/netem/bench_step.py``. Everything is divided by the number of
parameters: the passes are memory-bound (linear in d).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence

import torch

from .device import DeviceProfile

#: the largest vector the device calibration times (elements): above it the cost per element is flat
CALIBRATION_CAP = 25_000_000


def median_seconds(fn: Callable[[], object], repeats: int, before: Callable[[], object] = lambda: None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up; ``before`` runs untimed."""
    times = []
    for i in range(repeats + 1):
        before()
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def capped_sizes(sizes: Sequence[int], cap: int = CALIBRATION_CAP) -> List[int]:
    """The model's tensor sizes, cut off where they add up to ``cap`` elements."""
    out, total = [], 0
    for n in sizes:
        if total >= cap:
            break
        out.append(min(n, cap - total))
        total += out[-1]
    return out


def _optimizer_step(sizes: Sequence[int], make: Callable, repeats: int) -> float:
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    grads = [torch.randn(n) * 1e-3 for n in sizes]
    opt = make(params, torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4))

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g.clone()
    return median_seconds(opt.step, repeats, set_grads)


def _server_line(sizes: Sequence[int], repeats: int) -> tuple:
    """(seconds with one payload, seconds per further payload) of the server step on these blocks."""
    from .. import _kernels
    d = sum(sizes)
    payloads = [_kernels.blocksign_compress(torch.randn(d), sizes) for _ in range(8)]
    error = torch.zeros(d)
    counts = [1, 2, 4, 8]
    times = [median_seconds(lambda k=k: _kernels.blocksign_server_feedback(
        [p[0] for p in payloads[:k]], [p[1] for p in payloads[:k]], error, sizes, [(0, d, 1.0)]), repeats)
        for k in counts]
    mean_k, mean_t = statistics.mean(counts), statistics.mean(times)
    slope = (sum((k - mean_k) * (t - mean_t) for k, t in zip(counts, times))
             / sum((k - mean_k) ** 2 for k in counts))
    slope = max(slope, 0.0)
    return max(mean_t - slope * (mean_k - 1), 0.0), slope


def memory_gbs(numel: int = CALIBRATION_CAP, repeats: int = 5) -> float:
    """Bytes read plus written per second by a copy of ``numel`` float32 into a kept buffer."""
    src, dst = torch.randn(numel), torch.empty(numel)
    return 8 * numel / median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def _stock_makers():
    """Stock Horovod's optimizer (fp32, fp16) in a world of one, or torch's SGD where Horovod is absent."""
    try:
        import horovod.torch as hvd
        from mpi4py import MPI
    except ImportError:
        return None
    hvd.init(comm=MPI.COMM_WORLD)

    def make(compression):
        return lambda params, sgd: hvd.DistributedOptimizer(
            sgd, named_parameters=[(f"p{i}", p) for i, p in enumerate(params)],
            compression=getattr(hvd.Compression, compression))
    return make("none"), make("fp16")


def measure_device(sizes: Sequence[int], repeats: int = 5, cores: int = 1) -> DeviceProfile:
    """This machine's profile for a model of these tensor sizes (cut at ``CALIBRATION_CAP``)."""
    import hvd_distef
    sizes = capped_sizes(sizes)
    d = sum(sizes)
    ef = _optimizer_step(sizes, lambda params, sgd: hvd_distef.DistributedOptimizer(
        sgd, compression="blocksign", topology="ps"), repeats)
    server_one, server_more = _server_line(sizes, repeats)
    makers = _stock_makers()
    if makers is None:  # torch's SGD, and the fp16 casts Horovod would add (two passes over 2d bytes)
        stock = _optimizer_step(sizes, lambda params, sgd: sgd, repeats)
        fp16 = stock + 2 * 6 * d / (memory_gbs() * 1e9)
    else:
        stock, fp16 = (_optimizer_step(sizes, make, repeats) for make in makers)
    per = 1e9 / d
    return DeviceProfile(name="measured here", worker_update_ns=max(ef - server_one, 0.0) * per,
                         server_ns=server_one * per, server_payload_ns=server_more * per,
                         stock_ns=stock * per, fp16_ns=fp16 * per, memory_gbs=memory_gbs(), cores=cores)


def measure_compute(model: torch.nn.Module, in_shape, batch: int, measure_batch: int = 4,
                    repeats: int = 3) -> float:
    """Forward + backward (cross-entropy) seconds of ``model`` on a batch of ``batch`` inputs, timed on a
    batch of ``min(batch, measure_batch)`` random inputs and scaled linearly to ``batch``."""
    small = max(1, min(batch, measure_batch))
    x = torch.randn(small, *in_shape)
    out_features = model(x[:1]).shape[-1]
    y = torch.randint(0, out_features, (small,))

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return median_seconds(step, repeats) * batch / small
