"""Step time against stock allreduce on emulated cluster links (root; see cluster.py).

    sudo .venv/bin/python benchmarks/netem/run.py --ranks 2 4 8 --params 1e6 1e7 2.5e7 --rates 1gbit 10gbit

Writes benchmarks/results/netem.json (a list of records: topology, compression, ranks, params,
rate_gbit, step_time_median_s, bytes_sent_per_step of rank 0 and the largest over ranks), netem.md
(a table) and netem_<rate>_<params>.png (step time against ranks per topology).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cluster import EmulatedCluster, HarnessError, rate_bits

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
TOPOLOGIES = ["allreduce", "ps", "sharded", "tree", "ring", "allgather", "majority_vote"]


def table(records) -> str:
    lines = ["| rate | params | ranks | topology | compression | step time (median) | vs allreduce | "
             "bytes sent/step rank 0 | max over ranks |", "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in records:
        base = next((b for b in records if b["topology"] == "allreduce" and b["ranks"] == r["ranks"]
                     and b["params"] == r["params"] and b["rate"] == r["rate"]), None)
        ratio = f"{r['step_time_median_s'] / base['step_time_median_s']:.2f}x" if base else ""
        lines.append(f"| {r['rate']} | {r['params'] / 1e6:.1f}M | {r['ranks']} | {r['topology']} | {r['compression']} | "
                     f"{1000 * r['step_time_median_s']:.1f} ms | {ratio} | {r['bytes_sent_per_step']:,.0f} | "
                     f"{r['max_bytes_sent_per_step']:,.0f} |")
    return "\n".join(lines)


def plot(records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for rate, params in sorted({(r["rate"], r["params"]) for r in records}):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        mine = [r for r in records if r["rate"] == rate and r["params"] == params]
        for topo in TOPOLOGIES:
            pts = sorted((r["ranks"], r["step_time_median_s"]) for r in mine if r["topology"] == topo)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=topo)
        ax.set_xlabel("ranks")
        ax.set_ylabel("median step time (s)")
        ax.set_yscale("log")
        ax.set_title(f"{params / 1e6:.1f}M parameters, {rate} links")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = RESULTS / f"netem_{rate}_{params / 1e6:.0f}M.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 2.5e7])
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    ap.add_argument("--delay", help="one-way delay per link end, e.g. 0.1ms")
    ap.add_argument("--topologies", nargs="+", default=TOPOLOGIES)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "netem.json")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    records = []
    lines = Path(tempfile.mkdtemp()) / "records.jsonl"
    try:
        for rate in args.rates:
            for ranks in args.ranks:
                with EmulatedCluster(ranks, rate=rate, delay=args.delay) as cluster:
                    for params in args.params:
                        for topology in args.topologies:  # one job each: a topology's memory goes with it
                            job = [sys.executable, str(HERE / "bench_step.py"), "--params", str(params),
                                   "--topologies", topology, "--steps", str(args.steps), "--rate", rate,
                                   "--out", str(lines)]
                            proc = cluster.mpirun(job)
                            if proc.returncode:  # 8 ranks on 2 cores: a TCP connect has timed out once
                                print(f"{topology}: job failed ({proc.returncode}), once more", flush=True)
                                proc = cluster.mpirun(job)
                            print(proc.stdout, end="", flush=True)
                            if proc.returncode:
                                raise HarnessError(f"benchmark failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    except HarnessError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        if lines.exists():
            records = [json.loads(line) for line in lines.read_text().splitlines()]
            for r in records:
                r["rate_gbit"] = rate_bits(r["rate"]) / 1e9
            args.out.write_text(json.dumps(records, indent=1))
    md = table(records)
    (RESULTS / "netem.md").write_text(md + "\n")
    paths = plot(records)
    print(md)
    print("wrote", args.out, RESULTS / "netem.md", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
