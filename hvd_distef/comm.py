"""hvd_distef's MPI handle: a duplicate of Horovod's world communicator, with byte counters.

We talk MPI through mpi4py on the same world as Horovod. Duplicating the communicator gives our
collectives their own context, so they never match or interleave with the collectives Horovod's
background thread runs at the same time.

Buffers may live on the CPU or on a CUDA device; ``Staging`` is the one place that decides how CUDA
bytes reach MPI (directly, or through pinned host buffers reused across steps).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import HvdDistefError

GLOO_HINT = ("hvd_distef talks MPI through mpi4py; launch with MPI (horovodrun --mpi, mpirun or "
             "srun --mpi=pmix) and install mpi4py against the same MPI as Horovod")
#: seconds a collective may wait before the job is aborted (a launcher sets it; timeout_s= wins)
TIMEOUT_ENV = "HVD_DISTEF_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
#: 1 or 0: whether MPI may be handed CUDA buffers; unset: ask the MPI library (MPIX_Query_cuda_support)
CUDA_AWARE_ENV = "HVD_DISTEF_CUDA_AWARE"


def check_not_gloo(mpi_size: int) -> None:
    """Under ``horovodrun --gloo`` every process sees an MPI world of one (a singleton): refuse,
    instead of training M unconnected copies."""
    hvd_size = os.environ.get("HOROVOD_SIZE")
    if os.environ.get("HOROVOD_CONTROLLER") == "gloo" or (hvd_size is not None and int(hvd_size) != mpi_size):
        raise HvdDistefError(f"this job was launched by Horovod with Gloo (HOROVOD_SIZE={hvd_size}, but the MPI "
                             f"world has {mpi_size} rank(s)); {GLOO_HINT}")


class Watchdog:
    """Aborts the whole job when one of our collectives waits longer than its bound (a peer rank
    died or hung), so no allocation burns waiting forever. One daemon thread per process, however
    many optimizers are built (``Watchdog.shared``), polling once a second."""

    _shared: Optional["Watchdog"] = None

    @classmethod
    def shared(cls, world) -> "Watchdog":
        if cls._shared is None:
            cls._shared = cls(world)
        return cls._shared

    def __init__(self, world):
        self.world = world
        self.since: Optional[float] = None
        self.what = ""
        self.timeout_s = DEFAULT_TIMEOUT_S
        self.rank = world.Get_rank()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="hvd_distef-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, what: str, timeout_s: float):
        with self._lock:
            self.what, self.timeout_s, self.since = what, timeout_s, time.monotonic()
        try:
            yield
        finally:
            self.since = None

    def _run(self):
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout_s:
                sys.stderr.write(f"hvd_distef: rank {self.rank}: no progress for {self.timeout_s:.0f} s in "
                                 f"{self.what}: a peer rank has died or hung, or stopped stepping early (uneven "
                                 f"batches, hvd.join()). Aborting the job (the bound is timeout_s= of "
                                 f"DistributedOptimizer or {TIMEOUT_ENV}).\n")
                sys.stderr.flush()
                self.world.Abort(1)


class Pending:
    """A result still on the wire: ``test()`` drives MPI's progress (a nonblocking collective moves
    only while some MPI call runs) and says whether it has arrived; ``wait()`` returns it."""

    def __init__(self, wait: Callable[[], Any], test: Callable[[], bool]):
        self.wait, self.test = wait, test


#: one duplicate per base communicator, shared by every optimizer built on it: a sweep that builds
#: many optimizers holds one communicator, not one each (our collectives never interleave: they run
#: in the thread that calls step(), or in the bucket thread while that one waits; see buckets.py)
_DUPLICATES: Dict[tuple, Any] = {}  # (handle, world ranks) of a base communicator -> its duplicate
_PROCESS_SETS: Dict[tuple, Any] = {}  # ranks of a Horovod process set -> their communicator


#: set by ``initialize_mpi``: hvd.init() ran before hvd_distef was imported, so Horovod initialized MPI
_HOROVOD_OWNS_MPI = False
HOROVOD_FIRST = ("hvd.init() ran before hvd_distef was imported, so Horovod initialized MPI, and Horovod "
                 "finalizes an MPI it initialized on its background thread as soon as any rank's Horovod shuts "
                 "down (when the first rank ends), while the other ranks may still be in hvd_distef's "
                 "collectives: they would hang or crash. Import hvd_distef (or mpi4py's MPI) before hvd.init()")


#: Open MPI's setting for a rank waiting in MPI: yield its core between polls instead of spinning (what
#: Open MPI does by itself when a node is oversubscribed). Horovod's background thread waits in MPI every
#: cycle beside the thread that computes; where a rank has one core, its spinning takes compute from
#: stock Horovod and from us alike. Given before MPI starts, unless the launcher or the user gave it.
YIELD_WHEN_IDLE = ("OMPI_MCA_mpi_yield_when_idle", "1")


def initialize_mpi() -> None:
    """Initialize MPI through mpi4py (``MPI_THREAD_MULTIPLE``; Open MPI's ``YIELD_WHEN_IDLE`` unless
    set), when hvd_distef is imported: before ``hvd.init()`` can. mpi4py then finalizes MPI at
    interpreter exit, on the main thread, after Horovod's own shutdown (an ``atexit`` handler) has
    stopped Horovod's thread, and MPI_Finalize lets every rank's last messages arrive. Where Horovod
    initialized MPI instead, it finalizes it on its background thread when any rank ends, under this
    rank's collectives; ``Comm`` refuses that order (``HOROVOD_FIRST``)."""
    global _HOROVOD_OWNS_MPI
    horovod = sys.modules.get("horovod.torch")
    _HOROVOD_OWNS_MPI = ("mpi4py.MPI" not in sys.modules and horovod is not None
                         and bool(horovod.is_initialized()))
    if "mpi4py.MPI" not in sys.modules and not _HOROVOD_OWNS_MPI:
        os.environ.setdefault(*YIELD_WHEN_IDLE)
    try:
        from mpi4py import MPI  # noqa: F401  (importing it initializes MPI)
    except ImportError:
        pass  # Comm says why, when an optimizer is built


def communicator(mpi_comm: Optional[Any], process_set: Optional[Any]):
    """The mpi4py communicator our collectives run on: ``comm=``, else the ranks of Horovod's
    ``process_set=`` (COMM_SELF on a rank outside it: it trains locally, as horovod.torch does),
    else MPI.COMM_WORLD."""
    from mpi4py import MPI
    if mpi_comm is not None and process_set is not None:
        raise ValueError("give comm= or process_set=, not both")
    if process_set is None:
        return MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    if getattr(process_set, "mpi_comm", None) is not None:
        return process_set.mpi_comm
    ranks = getattr(process_set, "ranks", None)
    if ranks is None:
        raise ValueError(f"process_set {process_set} is not registered with Horovod: pass it to "
                         f"hvd.init(process_sets=...) or hvd.add_process_set() first")
    ranks = sorted(int(r) for r in ranks)
    world = MPI.COMM_WORLD
    if ranks == list(range(world.Get_size())):
        return world
    if world.Get_rank() not in ranks:
        return MPI.COMM_SELF
    if tuple(ranks) not in _PROCESS_SETS:
        _PROCESS_SETS[tuple(ranks)] = world.Create_group(world.Get_group().Incl(ranks))
    return _PROCESS_SETS[tuple(ranks)]


def cuda_aware_mpi(MPI) -> bool:
    """Whether the MPI library takes CUDA buffers: ``HVD_DISTEF_CUDA_AWARE`` (1 or 0) when set, else
    mpi4py's ``Query_cuda_support`` where it has one, else Open MPI's ``MPIX_Query_cuda_support``
    looked up in the process, else False (other MPIs: set the variable)."""
    forced = os.environ.get(CUDA_AWARE_ENV, "")
    if forced:
        return forced != "0"
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    try:
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


class Staging:
    """How a tensor's bytes reach MPI. CPU tensors go as they are. CUDA tensors go directly when MPI
    is CUDA-aware (after the tensor's stream is synchronized: MPI does not know torch's streams),
    else through pinned host buffers, one to send and one to receive, kept and reused across steps
    (a step's payloads are about 1/32 of the gradient; pinned memory copies at full bus speed). Every
    copy is synchronous, so a buffer is free again when a collective returns.

    ``send(t)`` gives what to hand MPI to send tensor t; ``inplace(t)`` what to hand MPI to receive
    into t (holding t's values first with ``fill``, for an in-place reduction) and a function that
    completes t and returns it; ``recv(n, dtype, device)`` the same for a new tensor of n elements.
    """

    def __init__(self, cuda_aware: bool):
        self.cuda_aware = cuda_aware
        self._pinned: Dict[str, torch.Tensor] = {}

    def _host(self, role: str, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        buf = self._pinned.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = self._pinned[role] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(t.dtype)

    def send(self, t: torch.Tensor):
        if t.device.type == "cpu":
            return t.numpy()
        if self.cuda_aware:
            torch.cuda.current_stream(t.device).synchronize()
            return t
        return self._host("send", t).copy_(t).numpy()

    def inplace(self, t: torch.Tensor, fill: bool = False) -> Tuple[Any, Callable[[], torch.Tensor]]:
        if t.device.type == "cpu":
            return t.numpy(), lambda: t
        if self.cuda_aware:
            torch.cuda.current_stream(t.device).synchronize()
            return t, lambda: t
        host, finish = self.on_host(t, fill)
        return host.numpy(), finish

    def on_host(self, t: torch.Tensor, fill: bool = True) -> Tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """A CPU tensor standing for t (t itself on the CPU, else the pinned receive buffer, holding t's
        values with ``fill``) and a function that copies it back into t and returns t: for
        libraries that take CPU tensors only (Horovod built without GPU operations)."""
        if t.device.type == "cpu":
            return t, lambda: t
        host = self._host("recv", t)
        if fill:
            host.copy_(t)
        return host, lambda: t.copy_(host)

    def recv(self, n: int, dtype: torch.dtype, device: torch.device) -> Tuple[Any, Callable[[], torch.Tensor]]:
        return self.inplace(torch.empty(n, dtype=dtype, device=device))


class Comm:
    """MPI collectives on raw byte buffers (uint8 tensors on the CPU or a CUDA device: what a
    collective returns lies where its input does), counting what each rank sends and receives."""

    def __init__(self, mpi_comm: Optional[Any] = None, timeout_s: Optional[float] = None,
                 process_set: Optional[Any] = None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise HvdDistefError(f"cannot use MPI ({exc}); {GLOO_HINT}") from exc
        if _HOROVOD_OWNS_MPI:  # before any MPI call: another rank's exit may finalize MPI under this one
            raise HvdDistefError(HOROVOD_FIRST)
        self.MPI = MPI
        check_not_gloo(MPI.COMM_WORLD.Get_size())
        if timeout_s is None:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.watchdog = Watchdog.shared(MPI.COMM_WORLD)
        self.process_set = process_set
        base = communicator(mpi_comm, process_set)
        self.is_world = base == MPI.COMM_WORLD
        # keyed by the handle and the world ranks it holds: a freed user communicator's handle may be
        # reused for another group, which then gets a duplicate of its own
        group, world = base.Get_group(), MPI.COMM_WORLD.Get_group()
        key = (base.py2f(), tuple(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world)))
        group.Free()
        world.Free()
        if key not in _DUPLICATES:
            with self.watch("MPI_Comm_dup"):
                _DUPLICATES[key] = base.Dup()
        base = _DUPLICATES[key]
        self.mpi = base
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.staging = Staging(cuda_aware_mpi(MPI))

    def watch(self, what: str):
        """Bound a collective by this communicator's timeout (see ``Watchdog``)."""
        return self.watchdog.watch(what, self.timeout_s)

    def complete(self, what: str, *requests) -> None:
        """Wait until MPI ``requests`` complete, polling ``MPI_Test`` and giving the core away between
        polls, bounded by the timeout. Every collective of ours starts nonblocking and ends here, not in
        MPI's blocking wait: under ``MPI_THREAD_MULTIPLE`` Open MPI lets one waiting thread drive progress
        and parks the others on a condition variable, and Horovod's background thread is in an MPI call
        every cycle (1 ms by default, idle or not); a blocking wait of ours then handed progress back and
        forth with it, a few cycles more per step (BENCHMARKS.md, "Waiting in MPI beside Horovod's
        background thread")."""
        test = requests[0].Test if len(requests) == 1 else lambda: self.MPI.Request.Testall(list(requests))
        with self.watch(what):
            while not test():
                os.sched_yield()

    def _count(self, sent: float, received: float) -> None:
        self.bytes_sent += sent
        self.bytes_received += received

    # --- byte collectives ---------------------------------------------------------------------
    # Each counts the bytes of the buffers it hands to MPI that leave or reach this rank: a rank's
    # own part of a collective never crosses the wire; gather and broadcast count as the flat trees
    # of point-to-point messages they stand for (SPEC §3). ``out``: a buffer of the result's size to
    # receive into, kept by the caller across steps (a fresh one page-faults every step), else a new
    # one. In a world of one, the result is the rank's own buffer itself: no copy, no MPI call.
    def _receive_into(self, out: Optional[torch.Tensor], nbytes: int, device) -> Tuple[Any, Callable[[], torch.Tensor]]:
        if out is None:
            return self.staging.recv(nbytes, torch.uint8, device)
        if out.numel() != nbytes or out.dtype != torch.uint8:
            raise ValueError(f"out has {out.numel()} {out.dtype} elements, the collective receives {nbytes} bytes")
        return self.staging.inplace(out)

    def gather(self, buf: torch.Tensor, root: int, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Equal-size buffers from every rank, concatenated in rank order on ``root`` (None elsewhere)."""
        if self.size == 1:
            return buf
        into, result = (None, None) if self.rank != root else self._receive_into(out, buf.numel() * self.size,
                                                                                  buf.device)
        self.complete("MPI Gather", self.mpi.Igather(self.staging.send(buf), into, root=root))
        self._count(0, (self.size - 1) * buf.numel()) if self.rank == root else self._count(buf.numel(), 0)
        return None if result is None else result()

    def bcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s buffer, in place on every rank."""
        return self.ibcast(buf, root).wait()

    def ibcast(self, buf: torch.Tensor, root: int) -> Pending:
        """``bcast`` started and left on the wire (MPI_Ibcast): its ``wait()`` gives ``root``'s buffer."""
        if self.rank == root:
            request = self.mpi.Ibcast(self.staging.send(buf), root=root)
            self._count((self.size - 1) * buf.numel(), 0)
            result = lambda: buf  # noqa: E731
        else:
            into, result = self.staging.inplace(buf)
            request = self.mpi.Ibcast(into, root=root)
            self._count(0, buf.numel())

        def wait() -> torch.Tensor:
            self.complete("MPI Bcast", request)
            return result()
        return Pending(wait, request.Test)

    def alltoallv(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rank j gets ``send[offset_j : offset_j + send_counts[j]]`` from every rank, concatenated in rank order."""
        if self.size == 1:
            return send
        into, result = self._receive_into(out, sum(recv_counts), send.device)
        self.complete("MPI Alltoallv", self.mpi.Ialltoallv([self.staging.send(send), send_counts], [into, recv_counts]))
        self._count(sum(send_counts) - send_counts[self.rank], sum(recv_counts) - recv_counts[self.rank])
        return result()

    def allgatherv(self, send: torch.Tensor, counts: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every rank's buffer (rank r's of ``counts[r]`` bytes), concatenated in rank order on all ranks.
        Where ``send`` already lies at this rank's place in ``out`` (CPU), it is not copied (MPI_IN_PLACE)."""
        if self.size == 1:
            return send
        into, result = self._receive_into(out, sum(counts), send.device)
        at = sum(counts[:self.rank])
        in_place = (out is not None and out.device.type == "cpu" and send.numel() == counts[self.rank]
                    and send.numel() > 0 and send.data_ptr() == out[at:].data_ptr())
        self.complete("MPI Allgatherv",
                      self.mpi.Iallgatherv(self.MPI.IN_PLACE if in_place else self.staging.send(send), [into, counts]))
        self._count((self.size - 1) * send.numel(), sum(counts) - counts[self.rank])
        return result()

    def send(self, buf: torch.Tensor, dest: int) -> None:
        self.complete(f"MPI Send to rank {dest}", self.mpi.Isend(self.staging.send(buf), dest=dest))
        self._count(buf.numel(), 0)

    def recv(self, nbytes: int, source: int, device: torch.device | str = "cpu",
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``nbytes`` from ``source``, as a uint8 tensor on ``device``."""
        into, result = self._receive_into(out, nbytes, torch.device(device))
        self.complete(f"MPI Recv from rank {source}", self.mpi.Irecv(into, source=source))
        self._count(0, nbytes)
        return result()

    def sendrecv(self, buf: torch.Tensor, dest: int, nbytes: int, source: int,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Send ``buf`` to ``dest`` while receiving ``nbytes`` from ``source`` (no deadlock in a ring)."""
        into, result = self._receive_into(out, nbytes, buf.device)
        self.complete(f"MPI Sendrecv with ranks {dest}/{source}", self.mpi.Irecv(into, source=source),
                      self.mpi.Isend(self.staging.send(buf), dest=dest))
        self._count(buf.numel(), nbytes)
        return result()

    def allreduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """MPI's Allreduce (sum) of a float32 tensor over this communicator, in place (not counted:
        the caller counts it as a ring allreduce)."""
        into, result = self.staging.inplace(t, fill=True)
        self.complete("MPI Allreduce", self.mpi.Iallreduce(self.MPI.IN_PLACE, into, op=self.MPI.SUM))
        return result()

    def count_ring_allreduce(self, wire: torch.Tensor) -> None:
        """A buffer handed to a ring allreduce (Horovod's, or MPI's on large buffers) moves 2·(M−1)/M of
        its bytes each way on every rank (fractional)."""
        volume = 2 * (self.size - 1) * wire.numel() * wire.element_size() / self.size
        self._count(volume, volume)

    # --- small control messages -----------------------------------------------------------------
    def max_ints(self, values: List[int]) -> List[int]:
        """The element-wise maximum of an int vector over the ranks (one small allreduce)."""
        mine = np.asarray(values, dtype=np.int32)
        out = np.empty_like(mine)
        self.complete("MPI Allreduce (step agreement)", self.mpi.Iallreduce(mine, out, op=self.MPI.MAX))
        return out.tolist()

    def allgather_obj(self, obj: Any) -> List[Any]:
        with self.watch("MPI Allgather"):
            return self.mpi.allgather(obj)
