"""Memory shared by the ranks of one node (``hierarchical``): one mapping of a file in ``/dev/shm``.

The node's local rank 0 creates the file and reserves its pages (``posix_fallocate``: a shared-memory
file system too small, such as a container's default 64 MiB ``/dev/shm``, fails here with a clear error
instead of a SIGBUS mid-step), every local rank maps it, and once all have it mapped the file is unlinked:
the memory lives as long as the mappings, which go with the topology that holds them (no collective is
needed to free it, unlike an MPI shared window's MPI_Win_free). Ranks synchronize their reads and writes
with the node communicator's barriers.
"""
from __future__ import annotations

import mmap
import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .comm import Comm

#: where the shared file is created: the shared-memory file system, else the temporary directory
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


class NodeBuffer:
    """``nbytes`` of memory shared by the ranks of ``local`` (one node), as a uint8 CPU tensor ``data``.

    Collective over ``everyone`` (the optimizer's ranks, a superset of ``local``'s): raises ValueError on
    every rank, naming the first rank that failed, where a node cannot create or map it (ranks of one
    ``local`` on different hosts: ``local_size`` groups ranks that share no memory; too little shared
    memory)."""

    def __init__(self, local: Comm, everyone: Comm, nbytes: int, purpose: str):
        self.nbytes = max(int(nbytes), 1)
        error: Optional[str] = None
        path = None
        if local.rank == 0:
            path = SHM_DIR / f"hvd_distef.{socket.gethostname()}.{os.getpid()}.{everyone.serial}.{id(self)}"
            error = self._create(path)
        path, leader_error = local.allgather_obj((None if path is None else str(path), error))[0]
        self._map = None
        if leader_error is None:
            error = self._attach(Path(path))
        errors = everyone.allgather_obj(error)
        if local.rank == 0 and path is not None:
            Path(path).unlink(missing_ok=True)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, e = failed[0]
            raise ValueError(f"{purpose} needs {self.nbytes:,} bytes of memory shared by the ranks of each node "
                             f"(in {SHM_DIR}); rank {rank}: {e}")
        self.data = torch.frombuffer(self._map, dtype=torch.uint8)

    def _create(self, path: Path) -> Optional[str]:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            finally:
                os.close(fd)
        except OSError as exc:
            path.unlink(missing_ok=True)
            return (f"cannot reserve it: {exc} (a container's /dev/shm is often 64 MiB: give it more, e.g. "
                    f"docker run --shm-size)")
        return None

    def _attach(self, path: Path) -> Optional[str]:
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, self.nbytes)
            finally:
                os.close(fd)
        except OSError as exc:
            return (f"cannot map its node's shared memory ({exc}): the ranks of a node must share a host "
                    f"(local_size= groups consecutive ranks)")
        return None
