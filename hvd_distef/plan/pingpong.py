"""The link between two ranks, measured with MPI ping-pong (mpi4py): its latency alpha (half the round
trip of an 8-byte message) and its bandwidth (one-way time of a large message, alpha taken off).

    mpirun -np 2 [--host a,b] python -m hvd_distef.plan --measure-link ...

Place the two ranks on two nodes to measure the network; on one node (loopback TCP:
``--mca btl tcp,self``) the same numbers are the CPU's network stack (``transport_gbs``).
"""
from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import numpy as np

#: bytes of the message that measures the bandwidth: large enough to hide alpha, like a payload of a step
BANDWIDTH_BYTES = 16 << 20


class LinkMeasurement(NamedTuple):
    alpha_s: float
    bandwidth_bytes_s: float


def _one_way(comm, nbytes: int, repeats: int) -> float:
    """Median one-way time (half the round trip) of ``nbytes`` between ranks 0 and 1, s."""
    buf = np.zeros(nbytes, np.uint8)
    buf[:] = 1  # touch the pages before timing
    peer = 1 - comm.rank
    times = []
    for i in range(repeats + 2):
        comm.Barrier()
        start = time.perf_counter()
        if comm.rank == 0:
            comm.Send(buf, peer)
            comm.Recv(buf, peer)
        else:
            comm.Recv(buf, peer)
            comm.Send(buf, peer)
        if i >= 2:
            times.append((time.perf_counter() - start) / 2)
    return statistics.median(times)


def measure_link(comm, repeats: int = 20) -> LinkMeasurement:
    """Alpha and bandwidth between ranks 0 and 1 of ``comm`` (other ranks wait); same answer on both."""
    if comm.Get_size() < 2:
        raise ValueError("measuring a link needs two ranks: mpirun -np 2 python -m hvd_distef.plan --measure-link")
    sub = comm.Split(0 if comm.rank < 2 else 1, comm.rank)
    result = None
    if comm.rank < 2:
        alpha = _one_way(sub, 8, repeats)
        big = _one_way(sub, BANDWIDTH_BYTES, max(3, repeats // 4))
        result = LinkMeasurement(alpha, BANDWIDTH_BYTES / max(big - alpha, 1e-9))
    sub.Free()
    return comm.bcast(result, root=0)


def main() -> None:  # mpirun -np 2 python -m hvd_distef.plan.pingpong
    from mpi4py import MPI
    link = measure_link(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        print(f"alpha {link.alpha_s * 1e6:.1f} us, bandwidth {link.bandwidth_bytes_s / 1e9:.3f} GB/s", flush=True)


if __name__ == "__main__":
    main()
