"""Buckets of the fused buffer, and the pipeline that exchanges them while backward goes on (SPEC §4).

The fused buffer is cut into contiguous buckets of whole parameters, in the order backward
produces their gradients: the last registered parameters first, as DDP and Horovod do, each
bucket at most ``bucket_cap_mb`` MiB of float32 (a larger parameter gets a bucket of its own).
Every bucket has a topology of its own, so a bucket is compressed, exchanged and decompressed
(its slice of Δ̃) on its own; compressors whose block spans tensors (``sign``, ``bucket_mb``)
get one block per bucket at most.

With ``overlap=False`` there is one bucket, exchanged by ``step()``. With ``overlap=True`` a
``BucketPipeline`` thread takes the buckets in their fixed order as the last backward pass of a
step completes them and runs the optimizer's work on each (worker side, exchange, server step)
while backward goes on; ``step()`` drains it (the buckets that never completed, a parameter
without a gradient on this rank say, are done then). Every rank runs every bucket, in the same
order, once per step, so ranks never wait on each other's different collectives; the collectives
of the thread and of the thread calling ``step()`` never run at the same time.
"""
from __future__ import annotations

import threading
from typing import Callable, List, NamedTuple, Optional, Sequence

from .error_feedback import Shard
from .fused import FusedLayout, Range

#: DDP's default bucket size
DEFAULT_BUCKET_CAP_MB = 25.0
#: seconds between the pipeline's progress calls while it waits for a bucket
PROGRESS_S = 5e-4


class Bucket(NamedTuple):
    """A bucket of the fused buffer: parameters [first, stop_param), elements [start, stop), its topology,
    and the topology's shards in the fused buffer's coordinates."""

    first: int
    stop_param: int
    start: int
    stop: int
    topology: object  #: a ``topologies.Topology``
    worker_shards: List[Shard]


def build(layout: FusedLayout, cap_mb: Optional[float], topology_cls, comm, compressor, delta, **options) -> List[Bucket]:
    """The buckets of ``plan`` and a topology each, exchanging into their slice of ``delta``."""
    out = []
    for first, stop in plan(layout.sizes, cap_mb):
        start, end = layout.bounds[first][0], layout.bounds[stop - 1][1]
        topology = topology_cls(comm, compressor, layout.sizes[first:stop], layout.device, delta[start:end], **options)
        out.append(Bucket(first, stop, start, end, topology,
                          [Shard(start + s.start, start + s.stop, s.block_sizes) for s in topology.shards]))
    return out


def plan(sizes: Sequence[int], cap_mb: Optional[float]) -> List[Range]:
    """Bucket boundaries as (first, stop) ranges of parameter indices, in backward's order (the
    last parameters first). ``sizes``: element counts of the fused parameters, in fused order;
    ``cap_mb``: MiB of float32 per bucket, or None for one bucket. Raises ValueError for a cap
    that is not positive."""
    if cap_mb is None:
        return [(0, len(sizes))] if sizes else []
    if not cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be positive, got {cap_mb!r}")
    cap = cap_mb * 2**20 / 4
    buckets: List[Range] = []
    stop, filled = len(sizes), 0
    for i in range(len(sizes) - 1, -1, -1):
        if i + 1 < stop and filled + sizes[i] > cap:
            buckets.append((i + 1, stop))
            stop, filled = i + 1, 0
        filled += sizes[i]
    if stop > 0:
        buckets.append((0, stop))
    return buckets


class BucketPipeline:
    """One background thread per step that runs ``work(k)`` for k = 0, 1, ... in order, each once
    its bucket's gradients are final (``ready``) or ``step()`` drains it. Where the script ends (an
    exception, a time limit) after a backward without ``step()``, the thread ends after the buckets
    already final, before Python and MPI finalize.

    Args:
        bucket_of: for each fused parameter, the index of its bucket.
        work: the optimizer's work on bucket k (called on the pipeline's thread).
        progress: called every ``PROGRESS_S`` while the thread waits for a bucket: a transfer left on
            the wire moves only while some MPI call runs.
    """

    def __init__(self, bucket_of: Sequence[int], work: Callable[[int], None], progress: Callable[[], None]):
        self._bucket_of = list(bucket_of)
        self._progress = progress
        self._count = len(set(self._bucket_of))
        self._sizes = [self._bucket_of.count(k) for k in range(self._count)]
        self._work = work
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._reset()

    def _reset(self) -> None:
        self._final: List[set] = [set() for _ in range(self._count)]
        self._draining = False
        self._error: Optional[BaseException] = None

    @property
    def running(self) -> bool:
        """Whether this step's buckets are being (or were) exchanged by the thread."""
        return self._thread is not None

    @property
    def finished(self) -> bool:
        """Whether the thread has run every bucket of this step (``drain`` then waits for nothing)."""
        return self._thread is not None and not self._thread.is_alive()

    def ready(self, param_index: int) -> None:
        """This parameter's gradient is final for the step (called from its backward hook); the
        first call of a step starts the thread."""
        with self._cond:
            self._final[self._bucket_of[param_index]].add(param_index)
            self._start()
            self._cond.notify()

    def _start(self) -> None:
        if self._thread is None:
            # not a daemon: the interpreter lets it finish the bucket in hand before MPI finalizes at exit
            self._thread = threading.Thread(target=self._run, name="hvd_distef-buckets")
            self._thread.start()

    def _run(self) -> None:
        try:
            for k in range(self._count):
                while True:
                    with self._cond:
                        if self._cond.wait_for(lambda: self._draining or len(self._final[k]) == self._sizes[k],
                                               timeout=PROGRESS_S):
                            break
                    if not threading.main_thread().is_alive():  # the script has ended: no step() will drain
                        return
                    self._progress()
                self._work(k)
        except BaseException as exc:  # re-raised by drain() in the thread that called step()
            self._error = exc

    def drain(self) -> None:
        """Run every bucket of the step not run yet (all of them, where no gradient of the last
        backward pass started the thread: every rank runs every bucket once per step), wait for
        the thread, and make ready for the next step. Re-raises what the work raised."""
        with self._cond:
            self._draining = True
            self._start()
            self._cond.notify()
        thread = self._thread
        thread.join()
        error = self._error
        self._thread = None
        self._reset()
        if error is not None:
            raise error
