"""Runs named check functions on every rank of an MPI job and writes {case: {ok, detail}} from rank 0.

A check raises AssertionError (or anything) to fail; the failure is gathered from all ranks, so a
case fails if it failed anywhere. Each case runs even if an earlier one failed.
"""
import argparse
import json
import traceback
from pathlib import Path


def run(cases):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    from mpi4py import MPI
    try:
        import horovod.torch as hvd
    except ImportError:  # the checks that need no Horovod run without it (scripts/gpu_check.sh)
        hvd = None
    if hvd is not None:
        hvd.init(comm=MPI.COMM_WORLD)
    comm = MPI.COMM_WORLD
    results = {}
    for name, fn in cases.items():
        if args.only and name not in args.only:
            continue
        try:
            detail = fn() or "ok"
            ok = True
        except Exception:  # noqa: BLE001 - every failure is reported per case
            ok, detail = False, f"rank {comm.rank}: {traceback.format_exc()}"
        everyone = comm.allgather((ok, detail))
        failed = [d for o, d in everyone if not o]
        results[name] = {"ok": not failed, "detail": "\n".join(failed) if failed else everyone[0][1]}
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
