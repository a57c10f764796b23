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
from typing import Any, List, Optional

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
    """Aborts the whole job when one of our collectives waits longer than ``timeout_s`` (a peer rank
    died or hung), so no allocation burns waiting forever. One daemon thread, polling once a second."""

    def __init__(self, world, rank: int, timeout_s: float):
        self.world, self.rank, self.timeout_s = world, rank, timeout_s
        self.since: Optional[float] = None
        self.what = ""
        threading.Thread(target=self._run, name="hvd_distef-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, what: str):
        self.what, self.since = what, time.monotonic()
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
                                 f"{self.what}: a peer rank has died or hung. Aborting the job (the bound is "
                                 f"timeout_s= of DistributedOptimizer or {TIMEOUT_ENV}).\n")
                sys.stderr.flush()
                self.world.Abort(1)


def _np(buf: torch.Tensor) -> np.ndarray:
    return buf.numpy()


class Comm:
    """MPI collectives on raw byte buffers (uint8 CPU tensors), counting what each rank sends and receives."""

    def __init__(self, mpi_comm: Optional[Any] = None, timeout_s: Optional[float] = None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise HvdDistefError(f"cannot use MPI ({exc}); {GLOO_HINT}") from exc
        self.MPI = MPI
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        check_not_gloo(MPI.COMM_WORLD.Get_size())
        self.mpi = base.Dup()
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.bytes_sent = 0
        self.bytes_received = 0
        if timeout_s is None:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.watchdog = Watchdog(MPI.COMM_WORLD, self.rank, timeout_s)
        self.watch = self.watchdog.watch

    def count(self, sent: float, received: float) -> None:
        """Add this rank's bytes of one exchange to the counters (fractional for Horovod's ring formula)."""
        self.bytes_sent += sent
        self.bytes_received += received

    # --- byte collectives ---------------------------------------------------------------------
    def gather(self, buf: torch.Tensor, root: int) -> Optional[torch.Tensor]:
        """Equal-size buffers from every rank, concatenated in rank order on ``root`` (None elsewhere)."""
        out = torch.empty(buf.numel() * self.size, dtype=torch.uint8) if self.rank == root else None
        with self.watch("MPI Gather"):
            self.mpi.Gather(_np(buf), None if out is None else _np(out), root=root)
        return out

    def bcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s buffer, in place on every rank."""
        with self.watch("MPI Bcast"):
            self.mpi.Bcast(_np(buf), root=root)
        return buf

    def alltoallv(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int]) -> torch.Tensor:
        """Rank j gets ``send[offset_j : offset_j + send_counts[j]]`` from every rank, concatenated in rank order."""
        recv = torch.empty(sum(recv_counts), dtype=torch.uint8)
        with self.watch("MPI Alltoallv"):
            self.mpi.Alltoallv([_np(send), send_counts], [_np(recv), recv_counts])
        return recv

    def allgatherv(self, send: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Every rank's buffer (rank r's of ``counts[r]`` bytes), concatenated in rank order on all ranks."""
        recv = torch.empty(sum(counts), dtype=torch.uint8)
        with self.watch("MPI Allgatherv"):
            self.mpi.Allgatherv(_np(send), [_np(recv), counts])
        return recv

    def send(self, buf: torch.Tensor, dest: int) -> None:
        with self.watch(f"MPI Send to rank {dest}"):
            self.mpi.Send(_np(buf), dest=dest)

    def recv(self, nbytes: int, source: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with self.watch(f"MPI Recv from rank {source}"):
            self.mpi.Recv(_np(buf), source=source)
        return buf

    def sendrecv(self, buf: torch.Tensor, dest: int, nbytes: int, source: int) -> torch.Tensor:
        """Send ``buf`` to ``dest`` while receiving ``nbytes`` from ``source`` (no deadlock in a ring)."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        with self.watch(f"MPI Sendrecv with ranks {dest}/{source}"):
            self.mpi.Sendrecv(_np(buf), dest=dest, recvbuf=_np(out), source=source)
        return out

    # --- small control messages -----------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        with self.watch("MPI Allreduce (non-finite check)"):
            return bool(self.mpi.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def allgather_obj(self, obj: Any) -> List[Any]:
        with self.watch("MPI Allgather"):
            return self.mpi.allgather(obj)
