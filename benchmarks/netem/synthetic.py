"""Horovod's own synthetic benchmark (pytorch_synthetic_benchmark.py) as users port it: stock Horovod
(float32 and fp16) against the script with only the optimizer class swapped (it keeps its
``hvd.Compression.none``: ``ps`` uncompressed), with blocksign as the README advises, and overlapped;
on this machine (plain mpirun) and on emulated cluster links (root; see cluster.py).

    .venv/bin/python benchmarks/netem/synthetic.py [--where local:2 1gbit:2 100mbit:2 1gbit:4] [--rounds 3]

Every contender is launched alike (the same launcher, binding and environment: Horovod's defaults); the
contenders take turns, ``--rounds`` times, so the noise of a shared machine falls on all of them.
Writes benchmarks/results/synthetic.json (``common.write_results``; per place whether its ranks
outnumbered this machine's cores); benchmarks/record.py makes BENCHMARKS.md's tables from it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from cluster import EmulatedCluster, HarnessError
from run_train import run_checked

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from common import write_results  # noqa: E402

#: label -> the script's flags; the first is the baseline of the ratios
CONTENDERS = {
    "horovod": [],
    "horovod-fp16": ["--fp16-allreduce"],
    "ported (class swapped)": ["--distef-topology", "ps"],
    "ef-blocksgdm-ps": ["--distef-topology", "ps", "--distef-compression", "blocksign"],
    "ef-blocksgdm-ps-overlap": ["--distef-topology", "ps", "--distef-compression", "blocksign", "--distef-overlap"],
}
SCRIPT_ARGS = ["--model", "resnet18", "--batch-size", "16", "--image-size", "32", "--num-warmup-batches", "2",
               "--num-batches-per-iter", "3", "--num-iters", "5"]
IMG_SEC = re.compile(r"Total img/sec on \d+ CPU\(s\): ([0-9.]+)")
RESULTS_NAME = "synthetic"


def rounds_of(run, ranks: int, where: str, rounds: int, bucket_cap_mb: float) -> list:
    """Every contender in turn, ``rounds`` times, the overlapped one with buckets of ``bucket_cap_mb``;
    one record per run. ``run(argv)``: mpirun with ``argv`` on every rank."""
    out = []
    for i in range(rounds):
        for label, flags in CONTENDERS.items():
            if "--distef-overlap" in flags:
                flags = [*flags, "--distef-bucket-cap-mb", str(bucket_cap_mb)]
            proc = run_checked(run, [sys.executable, str(HERE / "pytorch_synthetic_benchmark.py"), *SCRIPT_ARGS,
                                     *flags], f"synthetic {label}")
            img_sec = float(IMG_SEC.search(proc.stdout).group(1))
            print(f"synthetic {label:>26} M={ranks} {where} round {i + 1}: {img_sec:.1f} img/s", flush=True)
            out.append({"label": label, "ranks": ranks, "where": where, "round": i + 1, "img_per_s": img_sec})
    return out


def local_mpirun(ranks: int):
    """mpirun on this machine, as a user launches it (Open MPI's default binding)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(ROOT))

    def run(argv):
        return subprocess.run(["timeout", "1800", "mpirun", "-np", str(ranks), "--oversubscribe", "-x",
                               "OMP_NUM_THREADS", *argv], capture_output=True, text=True, env=env)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--where", nargs="+", default=["local:2", "1gbit:2", "100mbit:2", "1gbit:4"],
                    help="RATE:RANKS on emulated links, or local:RANKS (plain mpirun, shared memory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-cap-mb", type=float, default=10.0, help="bucket_cap_mb of the overlapped contender")
    ap.add_argument("--name", default=RESULTS_NAME, help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    places, records, failure = [], [], None
    try:
        for spec in args.where:
            where, ranks = spec.split(":")
            places.append({"where": where, "ranks": int(ranks), "cores": cores, "oversubscribed": int(ranks) > cores})
            if where == "local":
                records += rounds_of(local_mpirun(int(ranks)), int(ranks), where, args.rounds, args.bucket_cap_mb)
                continue
            with EmulatedCluster(int(ranks), rate=where) as cluster:
                records += rounds_of(cluster.mpirun, int(ranks), where, args.rounds, args.bucket_cap_mb)
    except HarnessError as exc:
        failure = str(exc)
        print(exc, file=sys.stderr)
    path = write_results(args.name, {"script_args": SCRIPT_ARGS, "contenders": CONTENDERS,
                                     "bucket_cap_mb": args.bucket_cap_mb, "places": places, "records": records,
                                     "failure": failure})
    print("wrote", path)
    return 2 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
