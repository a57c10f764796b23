"""Waiting in MPI beside Horovod's background thread: a small gather and broadcast (a ps step's payload
of a small model) with MPI's blocking calls against ours (``Comm``: nonblocking, completed by polling
``MPI_Test``), and no communication at all, each between the same compute, at Horovod's default cycle
(1 ms) and at 50 ms. Two ranks on this machine.

    .venv/bin/python benchmarks/mpi_wait.py [--cycles 1 50] [--rounds 12]

Each cycle time is one ``mpirun -np 2`` job (Horovod reads its cycle at ``hvd.init()``); inside a job the
three ways take turns, ``--rounds`` times, so the noise of the machine falls on all of them. Writes
benchmarks/results/mpi_wait.json (``common.write_results``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAYLOAD = 1218  # bytes: a blocksign payload of scikit-learn digits' MLP (the demo's)
ITERATIONS = 50


def rank_job(rounds: int) -> None:
    """Runs on each rank: the three ways in turn; rank 0 prints one JSON line of medians (ms)."""
    import numpy as np
    import torch

    import hvd_distef  # noqa: F401  (MPI is mpi4py's, before hvd.init())
    import horovod.torch as hvd
    from hvd_distef.comm import Comm

    hvd.init()
    comm = Comm()
    raw = comm.mpi
    buf = torch.zeros(PAYLOAD, dtype=torch.uint8)
    gathered = np.zeros(PAYLOAD * comm.size, dtype=np.uint8)

    def compute():  # about a millisecond of the rank's own work, holding the GIL as Python does
        x = 0.0
        for i in range(20000):
            x += i * 0.5
        return x

    def blocking():
        raw.Gather(buf.numpy(), gathered if comm.rank == 0 else None, root=0)
        raw.Bcast(buf.numpy(), root=0)

    def polled():
        comm.gather(buf, 0)
        comm.bcast(buf, 0)

    ways = {"blocking": blocking, "polled": polled, "none": lambda: None}
    times = {w: [] for w in ways}
    for _ in range(rounds + 2):
        for w, exchange in ways.items():
            raw.Barrier()
            start = time.perf_counter()
            for _ in range(ITERATIONS):
                exchange()
                compute()
            times[w].append((time.perf_counter() - start) / ITERATIONS)
    if comm.rank == 0:
        print(json.dumps({w: 1000 * statistics.median(t[2:]) for w, t in times.items()}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=float, nargs="+", default=[1, 50], help="HOROVOD_CYCLE_TIME values (ms)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_job:
        rank_job(args.rounds)
        return 0
    sys.path.insert(0, str(HERE))
    from common import write_results
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    rows = []
    for cycle in args.cycles:
        proc = subprocess.run(["timeout", "600", "mpirun", "-np", "2", "--oversubscribe", "-x", f"HOROVOD_CYCLE_TIME={cycle:g}",
                               "-x", "OMP_NUM_THREADS", sys.executable, __file__, "--rank-job", "--rounds",
                               str(args.rounds)], capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        ms = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"horovod_cycle_ms": cycle, **{f"{w}_ms": v for w, v in ms.items()}})
        print(f"Horovod cycle {cycle:g} ms: " + ", ".join(f"{w} {v:.2f} ms" for w, v in ms.items()), flush=True)
    print(f"wrote {write_results('mpi_wait', {'payload_bytes': PAYLOAD, 'iterations': ITERATIONS, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
