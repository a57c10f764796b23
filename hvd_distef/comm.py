"""hvd_distef's MPI handle: a duplicate of Horovod's world communicator, with byte counters.

We talk MPI through mpi4py on the same world as Horovod. Duplicating the communicator gives our
collectives their own context, so they never match or interleave with the collectives Horovod's
background thread runs at the same time.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .errors import HvdDistefError

GLOO_HINT = ("hvd_distef talks MPI through mpi4py; launch with MPI (horovodrun --mpi, mpirun or "
             "srun --mpi=pmix) and install mpi4py against the same MPI as Horovod")
#: seconds a collective may wait before the job is aborted (a launcher sets it; timeout_s= wins)
TIMEOUT_ENV = "HVD_DISTEF_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


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


#: one duplicate per base communicator, shared by every optimizer built on it: a sweep that builds
#: many optimizers holds one communicator, not one each (our collectives never interleave, they run
#: in the thread that calls step())
_DUPLICATES: Dict[tuple, Any] = {}  # (handle, world ranks) of a base communicator -> its duplicate
_PROCESS_SETS: Dict[tuple, Any] = {}  # ranks of a Horovod process set -> their communicator


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


def _np(buf: torch.Tensor) -> np.ndarray:
    return buf.numpy()


class Comm:
    """MPI collectives on raw byte buffers (uint8 CPU tensors), counting what each rank sends and receives."""

    def __init__(self, mpi_comm: Optional[Any] = None, timeout_s: Optional[float] = None,
                 process_set: Optional[Any] = None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise HvdDistefError(f"cannot use MPI ({exc}); {GLOO_HINT}") from exc
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

    def watch(self, what: str):
        """Bound a collective by this communicator's timeout (see ``Watchdog``)."""
        return self.watchdog.watch(what, self.timeout_s)

    def _count(self, sent: float, received: float) -> None:
        self.bytes_sent += sent
        self.bytes_received += received

    # --- byte collectives ---------------------------------------------------------------------
    # Each counts the bytes of the buffers it hands to MPI that leave or reach this rank: a rank's
    # own part of a collective never crosses the wire; gather and broadcast count as the flat trees
    # of point-to-point messages they stand for (SPEC §3).
    def gather(self, buf: torch.Tensor, root: int) -> Optional[torch.Tensor]:
        """Equal-size buffers from every rank, concatenated in rank order on ``root`` (None elsewhere)."""
        out = torch.empty(buf.numel() * self.size, dtype=torch.uint8) if self.rank == root else None
        with self.watch("MPI Gather"):
            self.mpi.Gather(_np(buf), None if out is None else _np(out), root=root)
        self._count(0, (self.size - 1) * buf.numel()) if self.rank == root else self._count(buf.numel(), 0)
        return out

    def bcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s buffer, in place on every rank."""
        with self.watch("MPI Bcast"):
            self.mpi.Bcast(_np(buf), root=root)
        self._count((self.size - 1) * buf.numel(), 0) if self.rank == root else self._count(0, buf.numel())
        return buf

    def alltoallv(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int]) -> torch.Tensor:
        """Rank j gets ``send[offset_j : offset_j + send_counts[j]]`` from every rank, concatenated in rank order."""
        recv = torch.empty(sum(recv_counts), dtype=torch.uint8)
        with self.watch("MPI Alltoallv"):
            self.mpi.Alltoallv([_np(send), send_counts], [_np(recv), recv_counts])
        self._count(sum(send_counts) - send_counts[self.rank], sum(recv_counts) - recv_counts[self.rank])
        return recv

    def allgatherv(self, send: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Every rank's buffer (rank r's of ``counts[r]`` bytes), concatenated in rank order on all ranks."""
        recv = torch.empty(sum(counts), dtype=torch.uint8)
        with self.watch("MPI Allgatherv"):
            self.mpi.Allgatherv(_np(send), [_np(recv), counts])
        self._count((self.size - 1) * send.numel(), sum(counts) - counts[self.rank])
        return recv

    def send(self, buf: torch.Tensor, dest: int) -> None:
        with self.watch(f"MPI Send to rank {dest}"):
            self.mpi.Send(_np(buf), dest=dest)
        self._count(buf.numel(), 0)

    def recv(self, nbytes: int, source: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with self.watch(f"MPI Recv from rank {source}"):
            self.mpi.Recv(_np(buf), source=source)
        self._count(0, nbytes)
        return buf

    def sendrecv(self, buf: torch.Tensor, dest: int, nbytes: int, source: int) -> torch.Tensor:
        """Send ``buf`` to ``dest`` while receiving ``nbytes`` from ``source`` (no deadlock in a ring)."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        with self.watch(f"MPI Sendrecv with ranks {dest}/{source}"):
            self.mpi.Sendrecv(_np(buf), dest=dest, recvbuf=_np(out), source=source)
        self._count(buf.numel(), nbytes)
        return out

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
        with self.watch("MPI Allreduce (step agreement)"):
            self.mpi.Allreduce(mine, out, op=self.MPI.MAX)
        return out.tolist()

    def allgather_obj(self, obj: Any) -> List[Any]:
        with self.watch("MPI Allgather"):
            return self.mpi.allgather(obj)
