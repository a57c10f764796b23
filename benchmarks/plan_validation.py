"""The step-time model of ``python -m hvd_distef.plan`` against our own emulated-cluster measurements.

    flock /tmp/bench.lock .venv/bin/python benchmarks/plan_validation.py [--files netem_step netem_nodes
        netem_one_node] [--fit-on 1e6]

Every measured configuration (contender, ranks, ranks per node, parameters, link rate) is predicted by
the model with: the device profile measured here for that many parameters (``calibrate.measure_device``,
the layer sizes ``bench_step.py`` used), the link's rate as given to netem, and two constants of this
machine's network path: the CPU's network stack speed (``transport_gbs``) and the latency of one message
(``alpha``). Those two cannot be measured apart from the emulated cluster (loopback TCP between two ranks
has neither netem's queues nor 8 ranks on 2 cores): they are fitted on the 1M-parameter configurations
only and every 25M-parameter configuration is a held-out check (``--fit-on`` changes the subset). The
ping-pong over loopback is measured and reported beside them. What was timed there is ``opt.step()``
alone, so compute is 0; every rank of the cluster shares this machine's cores (``ranks_per_machine`` =
M): each all-ranks pass is charged max(1, M/cores) times its one-rank time.

Writes benchmarks/results/plan_validation.json and plan_validation.png (predicted against measured).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, ROOT, layer_sizes, read_results, write_results  # noqa: E402

from hvd_distef.plan import model  # noqa: E402
from hvd_distef.plan.calibrate import measure_device  # noqa: E402
from hvd_distef.plan.cli import parse_rate  # noqa: E402

VALIDATED = ("horovod", "horovod-fp16", "ps", "sharded", "hierarchical")
TARGET = 0.25
#: rounds of the device calibration per parameter count (the one with the faster optimizer step is kept)
CALIBRATIONS = 3
#: the fit's grid: per-message latency (s) and network stack speed (GB/s), log-spaced
ALPHAS = [10e-6 * 2 ** (i / 2) for i in range(13)]
TRANSPORTS = [0.25 * 2 ** (i / 4) for i in range(21)]


def loopback_link() -> dict:
    """Ping-pong between two ranks of this machine over loopback TCP (what MPI's TCP path costs here)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--mca", "btl", "tcp,self", "--mca",
                           "btl_tcp_if_include", "lo", sys.executable, "-m", "hvd_distef.plan.pingpong"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("alpha")), None)
    if proc.returncode or line is None:
        return {"error": proc.stderr[-500:]}
    words = line.replace(",", "").split()
    return {"alpha_us": float(words[1]), "bandwidth_gbs": float(words[4])}


def configurations(files: List[str]) -> List[dict]:
    """The measured records of the results files to predict (the methods the plan knows), with their source."""
    rows = []
    for name in files:
        data = read_results(name)
        if data is None:
            print(f"no results file {name}.json: skipped", file=sys.stderr)
            continue
        cores = data["meta"]["cores"]
        for r in data["results"]["records"]:
            if r["topology"] in VALIDATED:
                rows.append({"file": name, "contender": r["topology"], "ranks": r["ranks"],
                             "ranks_per_node": r.get("ranks_per_node") or 1, "params": r["params"],
                             "tensors": r["tensors"], "rate": r["rate"], "cores": cores,
                             "measured_s": r["step_time_median_s"],
                             # how much the timed steps themselves vary: (slowest − fastest) / median
                             "spread_pct": 100 * (max(r["step_times_s"]) - min(r["step_times_s"]))
                             / r["step_time_median_s"]})
    return rows


def predict(row: dict, device, alpha: float, transport_gbs: float) -> model.Breakdown:
    dev = replace(device, transport_gbs=transport_gbs, cores=row["cores"])
    setup = model.Setup(numel=row["params"], blocks=row["tensors"], ranks=row["ranks"], local=row["ranks_per_node"],
                        alpha=alpha, bandwidth=parse_rate(row["rate"]), device=dev, compute_s=0.0,
                        ranks_per_machine=row["ranks"], allreduce="halving-doubling")
    return model.predict(setup, row["contender"])


def error(row, device, alpha, transport) -> float:
    return predict(row, device, alpha, transport).total / row["measured_s"] - 1


def fit(rows: List[dict], devices: Dict[int, object]) -> tuple:
    """(alpha, transport_gbs) of the grid with the most rows within TARGET, ties by the median |error|."""
    def score(pair):
        errs = sorted(abs(error(r, devices[r["params"]], *pair)) for r in rows)
        return sum(e <= TARGET for e in errs), -errs[len(errs) // 2]
    return max(itertools.product(ALPHAS, TRANSPORTS), key=score)


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 6))
    marks = dict(zip(VALIDATED, "osD^v"))
    for c in VALIDATED:
        mine = [r for r in rows if r["contender"] == c]
        if mine:
            ax.scatter([r["measured_s"] for r in mine], [r["predicted_s"] for r in mine], marker=marks[c], label=c)
    lo = min(r["measured_s"] for r in rows) / 2
    hi = max(r["measured_s"] for r in rows) * 2
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * (1 - TARGET), hi * (1 - TARGET)], [lo * (1 + TARGET), hi * (1 + TARGET)],
                    color="grey", alpha=0.2, label="±25%")
    ax.set(xscale="log", yscale="log", xlabel="measured median step (s)", ylabel="predicted step (s)",
           title="hvd_distef.plan against the emulated cluster")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: List[dict]) -> dict:
    """How many rows lie within the target: all, held out, and with ranks no more than cores or more."""
    def count(part):
        return {"within_target": sum(abs(r["error_pct"]) <= 100 * TARGET for r in part), "configurations": len(part)}
    return {"all": count(rows), "held_out": count([r for r in rows if r["role"] == "held out"]),
            "a core per rank": count([r for r in rows if r["ranks"] <= r["cores"]]),
            "ranks sharing cores": count([r for r in rows if r["ranks"] > r["cores"]])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs="+", default=["netem_step", "netem_nodes", "netem_one_node"],
                    help="results files of benchmarks/netem/run.py to predict")
    ap.add_argument("--fit-on", type=float, default=1e6, help="fit alpha and the stack speed on this many params")
    args = ap.parse_args()
    rows = configurations(args.files)
    if not rows:
        print("no results files to validate against: run benchmarks/netem/run.py first", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(1)
    devices = {}
    for attempt in range(CALIBRATIONS):  # interference only slows a measurement: the faster round is kept
        for params in sorted({r["params"] for r in rows}):
            print(f"calibrating the device at {params:,} parameters ({attempt + 1} of {CALIBRATIONS})", flush=True)
            device = measure_device(layer_sizes(params), cores=1)
            if params not in devices or device.worker_update_ns < devices[params].worker_update_ns:
                devices[params] = device
    loopback = loopback_link()
    training = [r for r in rows if r["params"] == int(args.fit_on)]
    alpha, transport = fit(training, devices)
    for r in rows:
        b = predict(r, devices[r["params"]], alpha, transport)
        r.update(predicted_s=b.total, error_pct=100 * (b.total / r["measured_s"] - 1),
                 role="fit" if r in training else "held out", breakdown=b._asdict())
    counts = summary(rows)
    for r in rows:
        print(f"{r['contender']:>13} M={r['ranks']} L={r['ranks_per_node']} {r['params'] / 1e6:g}M {r['rate']:>6}: "
              f"measured {1e3 * r['measured_s']:8.1f} ms, predicted {1e3 * r['predicted_s']:8.1f} ms "
              f"({r['error_pct']:+.0f}%) {r['role']}")
    print(counts)
    plot(rows, RESULTS / "plan_validation.png")
    path = write_results("plan_validation", {
        "target": TARGET, "fit_on_params": int(args.fit_on), "alpha_s": alpha, "transport_gbs": transport,
        "loopback_pingpong": loopback, "devices": {str(k): v.to_dict() for k, v in devices.items()},
        "sources": args.files, "rows": rows, "summary": counts})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
