"""End to end: real training against stock Horovod on emulated cluster links (root; see cluster.py).

    .venv/bin/python benchmarks/netem/run_train.py [--clusters 1gbit:2 1gbit:4] [--epochs 8]
    .venv/bin/python benchmarks/netem/run_train.py --clusters 1gbit:4:2 --methods horovod horovod-fp16 \
        ef-blocksgdm-sharded ef-blocksgdm-hierarchical --name e2e_nodes    # nodes of 2 ranks

bench_train.py trains every method of METHODS interleaved in one job per (rate, ranks), each from the same
initial weights on the same batches, launched alike (the same mpirun, binding and environment: Horovod's
defaults for every method): median step time (slowest rank), training time to ``--target`` test accuracy,
final accuracy, bytes per step (measured at the MPI boundary, or SPEC §3's ring formula where an
allreduce moves them). Writes benchmarks/results/e2e.json (``common.write_results``; per cluster whether
its ranks outnumbered this machine's cores); benchmarks/record.py makes BENCHMARKS.md's table and plots
from it, and ``python -m hvd_distef.experiments`` cites the newest such file as its headline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster import EmulatedCluster, HarnessError, rate_bits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import write_results  # noqa: E402

#: label -> hvd_distef.train flags; the first is the baseline of the ratios (SPEC §5b: stock Horovod and fp16)
METHODS = {
    "horovod": ["--method", "horovod"],
    "horovod-fp16": ["--method", "horovod", "--compression", "fp16"],
    "ef-blocksgdm-ps": ["--method", "ef-blocksgdm", "--topology", "ps"],
    "ef-blocksgdm-sharded": ["--method", "ef-blocksgdm", "--topology", "sharded"],
    "ef-blocksgdm-ps-overlap": ["--method", "ef-blocksgdm", "--topology", "ps", "--overlap"],
    "signum": ["--method", "signum"],
    "ef-blocksgdm-hierarchical": ["--method", "ef-blocksgdm", "--topology", "hierarchical"],
}
#: the methods of a run that names none (``hierarchical`` needs nodes of several ranks to differ from sharded)
DEFAULT_METHODS = [label for label in METHODS if label != "ef-blocksgdm-hierarchical"]
#: what mpirun prints when its --timeout ends a job (not tried again: it would run out of time again)
JOB_TIMED_OUT = "time limit for job execution has been reached"
RESULTS_NAME = "e2e"


def run_checked(run, argv, what) -> subprocess.CompletedProcess:
    proc = run(argv)
    if proc.returncode and JOB_TIMED_OUT not in proc.stderr:  # 8 ranks on 2 cores: a TCP connect has timed out once
        print(f"{what}: job failed ({proc.returncode}), once more", flush=True)
        proc = run(argv)
    if proc.returncode:
        raise HarnessError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clusters", nargs="+", default=["1gbit:2", "1gbit:4"],
                    help="RATE:RANKS[:RANKS_PER_NODE] of the training jobs (default: a rank a node)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                    help="the methods to train (the first must be horovod: the baseline of the ratios)")
    ap.add_argument("--overlap-bucket-cap-mb", type=float, default=10.0,
                    help="bucket_cap_mb of the overlapped contender (the best measured on ResNet-18 at 100 Mbit/s)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.9, help="test accuracy to reach (stock Horovod must)")
    ap.add_argument("--train-args", default="--model wide-mlp --data mnist5k --batch-size 32 --lr-decay-epochs 4 6",
                    help="hvd_distef.train flags for every method (default: the paper's schedule shape, the lr "
                         "divided by 10 at 50%% and 75%% of the epochs)")
    ap.add_argument("--job-timeout-s", type=float, default=7200,
                    help="seconds a training job may run (8 epochs at 100 Mbit/s, M = 4: over 30 minutes here)")
    ap.add_argument("--name", default=RESULTS_NAME, help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    if args.methods[0] != "horovod":
        ap.error("--methods: the first must be horovod (the baseline of the ratios)")
    methods = {label: [*METHODS[label], "--bucket-cap-mb", str(args.overlap_bucket_cap_mb)]
               if "--overlap" in METHODS[label] else METHODS[label] for label in args.methods}
    lines = Path(tempfile.mkdtemp()) / "records.jsonl"
    train_job = [sys.executable, str(HERE / "bench_train.py"), "--methods", json.dumps(methods), "--epochs",
                 str(args.epochs), "--out", str(lines)]
    cores = len(os.sched_getaffinity(0))
    clusters, failure = [], None
    try:
        for spec in args.clusters:
            rate, ranks, per_node = (spec.split(":") + ["1"])[:3]
            with EmulatedCluster(int(ranks), rate=rate, ranks_per_node=int(per_node)) as cluster:
                clusters.append({**cluster.settings(), "rate_gbit": rate_bits(rate) / 1e9, "ranks": int(ranks),
                                 "cores": cores, "oversubscribed": int(ranks) > cores})
                proc = run_checked(lambda argv: cluster.mpirun(argv, timeout=args.job_timeout_s),
                                   [*train_job, "--rate", rate, "--", *args.train_args.split()], f"training {spec}")
                print(proc.stdout, end="", flush=True)
    except HarnessError as exc:
        failure = str(exc)
        print(exc, file=sys.stderr)
    records = [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
    path = write_results(args.name, {"target": args.target, "epochs": args.epochs, "train_args": args.train_args,
                                     "methods": methods, "clusters": clusters, "records": records,
                                     "failure": failure})
    print("wrote", path)
    return 2 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
