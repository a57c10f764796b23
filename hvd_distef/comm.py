"""hvd_distef's MPI handle: a duplicate of Horovod's world communicator, with byte counters.

We talk MPI through mpi4py on the same world as Horovod. Duplicating the communicator gives our
collectives their own context, so they never match or interleave with the collectives Horovod's
background thread runs at the same time.
"""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
import torch

from .errors import HvdDistefError

GLOO_HINT = ("hvd_distef talks MPI through mpi4py; launch with MPI (horovodrun --mpi, mpirun or "
             "srun --mpi=pmix) and install mpi4py against the same MPI as Horovod")


def _np(buf: torch.Tensor) -> np.ndarray:
    return buf.numpy()


class Comm:
    """MPI collectives on raw byte buffers (uint8 CPU tensors), counting what each rank sends and receives."""

    def __init__(self, mpi_comm: Optional[Any] = None):
        try:
            from mpi4py import MPI
        except ImportError as exc:  # e.g. a Horovod-with-Gloo launch, where mpi4py cannot start
            raise HvdDistefError(f"cannot use MPI ({exc}); {GLOO_HINT}") from exc
        self.MPI = MPI
        self.mpi = (MPI.COMM_WORLD if mpi_comm is None else mpi_comm).Dup()
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.bytes_sent = 0
        self.bytes_received = 0

    def count(self, sent: float, received: float) -> None:
        """Add this rank's bytes of one exchange to the counters (fractional for Horovod's ring formula)."""
        self.bytes_sent += sent
        self.bytes_received += received

    # --- byte collectives ---------------------------------------------------------------------
    def gather(self, buf: torch.Tensor, root: int) -> Optional[torch.Tensor]:
        """Equal-size buffers from every rank, concatenated in rank order on ``root`` (None elsewhere)."""
        out = torch.empty(buf.numel() * self.size, dtype=torch.uint8) if self.rank == root else None
        self.mpi.Gather(_np(buf), None if out is None else _np(out), root=root)
        return out

    def bcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s buffer, in place on every rank."""
        self.mpi.Bcast(_np(buf), root=root)
        return buf

    def alltoallv(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int]) -> torch.Tensor:
        """Rank j gets ``send[offset_j : offset_j + send_counts[j]]`` from every rank, concatenated in rank order."""
        recv = torch.empty(sum(recv_counts), dtype=torch.uint8)
        self.mpi.Alltoallv([_np(send), send_counts], [_np(recv), recv_counts])
        return recv

    def allgatherv(self, send: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Every rank's buffer (rank r's of ``counts[r]`` bytes), concatenated in rank order on all ranks."""
        recv = torch.empty(sum(counts), dtype=torch.uint8)
        self.mpi.Allgatherv(_np(send), [_np(recv), counts])
        return recv

    def send(self, buf: torch.Tensor, dest: int) -> None:
        self.mpi.Send(_np(buf), dest=dest)

    def recv(self, nbytes: int, source: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.mpi.Recv(_np(buf), source=source)
        return buf

    def sendrecv(self, buf: torch.Tensor, dest: int, nbytes: int, source: int) -> torch.Tensor:
        """Send ``buf`` to ``dest`` while receiving ``nbytes`` from ``source`` (no deadlock in a ring)."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        self.mpi.Sendrecv(_np(buf), dest=dest, recvbuf=_np(out), source=source)
        return out

    # --- small control messages -----------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        return bool(self.mpi.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def allgather_obj(self, obj: Any) -> List[Any]:
        return self.mpi.allgather(obj)

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        return self.mpi.bcast(obj, root=root)
