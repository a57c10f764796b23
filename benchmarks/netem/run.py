"""Step time of every contender on emulated cluster links (root; see cluster.py): stock Horovod (float32
and fp16) against each topology of hvd_distef, with synthetic gradients.

    .venv/bin/python benchmarks/netem/run.py [--ranks 2 4 8] [--params 1e6 2.5e7] [--rates 1gbit 10gbit]
        [--ranks-per-node 2 --contenders horovod ps sharded hierarchical --name netem_nodes]
        [--ranks-per-node all: one node, its ranks on shared memory alone]

Every contender of one (rate, ranks, params) runs in the same job, in turn, launched alike (the same
mpirun, binding and environment). Writes benchmarks/results/netem_step.json (``common.write_results``:
the records, and per cluster whether its ranks outnumbered this machine's cores); BENCHMARKS.md's
tables and plots are made from it by benchmarks/record.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from cluster import EmulatedCluster, HarnessError, rate_bits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import write_results  # noqa: E402

CONTENDERS = ["horovod", "horovod-fp16", "ps", "sharded", "tree", "ring", "allgather", "majority_vote"]
RESULTS_NAME = "netem_step"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 2.5e7])
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    ap.add_argument("--delay", help="one-way delay per link end, e.g. 0.1ms")
    ap.add_argument("--contenders", nargs="+", default=CONTENDERS)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per contender (their median)")
    ap.add_argument("--ranks-per-node", default="1",
                    help="ranks sharing one node's link (shared memory inside a node), or 'all': one node")
    ap.add_argument("--name", default=RESULTS_NAME, help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    lines = Path(tempfile.mkdtemp()) / "records.jsonl"
    cores = len(os.sched_getaffinity(0))
    clusters, failure = [], None
    try:
        for rate in args.rates:
            for ranks in args.ranks:
                per_node = ranks if args.ranks_per_node == "all" else int(args.ranks_per_node)
                with EmulatedCluster(ranks, rate=rate, delay=args.delay, ranks_per_node=per_node) as cluster:
                    clusters.append({**cluster.settings(), "rate_gbit": rate_bits(rate) / 1e9, "ranks": ranks,
                                     "cores": cores,
                                     "oversubscribed": ranks > cores, "delay": args.delay})
                    for params in args.params:
                        job = [sys.executable, str(HERE / "bench_step.py"), "--params", str(params), "--topologies",
                               *args.contenders, "--steps", str(args.steps), "--rate", rate, "--out", str(lines),
                               "--ranks-per-node", str(per_node)]
                        proc = cluster.mpirun(job)
                        if proc.returncode:  # 8 ranks on 2 cores: a TCP connect has timed out once
                            print(f"job failed ({proc.returncode}), once more", flush=True)
                            proc = cluster.mpirun(job)
                        print(proc.stdout, end="", flush=True)
                        if proc.returncode:
                            raise HarnessError(f"benchmark failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    except HarnessError as exc:
        failure = str(exc)
        print(exc, file=sys.stderr)
    records = [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
    path = write_results(args.name, {"clusters": clusters, "records": records, "failure": failure})
    print("wrote", path)
    return 2 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
