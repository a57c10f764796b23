"""``python -m hvd_distef.report RUN_DIRS...``: compare training runs side by side.

Reads each run's ``config.json`` and ``metrics.jsonl`` (written by ``hvd_distef.train``), prints a
markdown table (method, topology, ranks, final and best test accuracy, time to a target accuracy,
mean bytes per step, mean step time) and writes it with PNG plots: test accuracy against epoch and
against wall time, and bytes sent per step per run.

The SGDM baseline of the ratios and of the default target is stock Horovod (``--method horovod``)
when it is among the runs, else our ``sgdm``. Horovod's bytes are SPEC §3's ring-allreduce formula,
computed, not measured (it has no counters): the table marks them "(computed)", the plot hatches them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from .train.cli import OneLineParser
from .train.loop import CONFIG_FILE, METRICS_FILE

#: methods that are the SGDM baseline, the first present wins
BASELINES = ("horovod", "sgdm")


def read_run(run_dir: Path) -> dict:
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    epochs = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    if not epochs:
        raise ValueError(f"{run_dir / METRICS_FILE} has no epochs")
    return {"dir": run_dir, "config": config, "epochs": epochs, "label": f"{run_dir.name}"}


def time_to(run: dict, target: float) -> Optional[float]:
    """Training wall time (s) until the test accuracy first reaches ``target``; None if never."""
    return next((e["wall_time_s"] for e in run["epochs"] if e["test_accuracy"] >= target), None)


def baseline_runs(runs: List[dict]) -> List[dict]:
    """The runs of the first method in BASELINES that is present (empty if none is)."""
    for method in BASELINES:
        found = [r for r in runs if r["config"]["method"] == method]
        if found:
            return found
    return []


def summarise(runs: List[dict], target: float) -> List[dict]:
    rows = []
    baseline = next(iter(baseline_runs(runs)), None)
    base_bytes = None if baseline is None else _mean(baseline, "bytes_sent_per_step")
    for run in runs:
        c, last = run["config"], run["epochs"][-1]
        sent = _mean(run, "bytes_sent_per_step")
        rows.append({
            "run": run["label"], "method": c["method"], "topology": c["topology"], "compression": c["compression"],
            "ranks": c["ranks"], "epochs": last["epoch"], "final_accuracy": last["test_accuracy"],
            "best_accuracy": max(e["test_accuracy"] for e in run["epochs"]), "time_to_target_s": time_to(run, target),
            "bytes_sent_per_step": sent, "max_bytes_sent_per_step": _mean(run, "max_bytes_sent_per_step"),
            "bytes_computed": last.get("bytes_source") == "computed",
            "bytes_vs_sgdm": None if not base_bytes else sent / base_bytes,
            "step_time_ms": 1000 * _mean(run, "step_time_s"),
            "comm_share": None if last.get("comm_time_s") is None else
            sum(e["comm_time_s"] for e in run["epochs"]) / max(1e-12, last["wall_time_s"]),
        })
    return rows


def _mean(run: dict, key: str) -> float:
    return sum(e[key] for e in run["epochs"]) / len(run["epochs"])


def markdown(rows: List[dict], target: float) -> str:
    head = ("| run | method | topology | compression | ranks | final acc | best acc | "
            f"time to {100 * target:.1f}% | bytes sent/step (rank 0) | max over ranks | vs SGDM | step time | comm share |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ttt = "never" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s"
        ratio = f"1/{1 / r['bytes_vs_sgdm']:.1f}" if r["bytes_vs_sgdm"] else ""
        computed = " (computed)" if r["bytes_computed"] else ""
        share = "n/a" if r["comm_share"] is None else f"{100 * r['comm_share']:.0f}%"
        lines.append(f"| {r['run']} | {r['method']} | {r['topology']} | {r['compression']} | {r['ranks']} | "
                     f"{100 * r['final_accuracy']:.2f}% | {100 * r['best_accuracy']:.2f}% | {ttt} | "
                     f"{r['bytes_sent_per_step']:,.0f}{computed} | {r['max_bytes_sent_per_step']:,.0f}{computed} | "
                     f"{ratio} | {r['step_time_ms']:.2f} ms | {share} |")
    return "\n".join(lines)


def plot(runs: List[dict], rows: List[dict], out: Path) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, x_label, name in (("epoch", "epoch", "accuracy_vs_epoch.png"),
                                 ("wall_time_s", "training wall time (s)", "accuracy_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            ax.plot([e[x_key] for e in run["epochs"]], [100 * e["test_accuracy"] for e in run["epochs"]],
                    marker=".", label=run["label"])
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar([r["run"] for r in rows], [r["bytes_sent_per_step"] for r in rows],
           hatch=["//" if r["bytes_computed"] else "" for r in rows], edgecolor="black")
    ax.set_yscale("log")
    ax.set_ylabel("bytes sent per step, rank 0 (log scale)")
    ax.set_title("hatched: computed from SPEC §3's ring formula (Horovod has no counters)", fontsize=9)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['bytes_sent_per_step']:,.0f}{' (computed)' if r['bytes_computed'] else ''}",
                    (i, r["bytes_sent_per_step"]), ha="center", va="bottom")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "bytes_per_step.png", dpi=120)
    plt.close(fig)
    paths.append(out / "bytes_per_step.png")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="hvd_distef.report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (--log-dir of hvd_distef.train)")
    p.add_argument("--out", type=Path, help="where to write report.md and the plots (default: next to the runs)")
    p.add_argument("--target", type=float, help="target test accuracy in [0, 1] (default: 99%% of the best of "
                                                "horovod's runs, else of sgdm's, else of all runs)")
    args = p.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / METRICS_FILE).is_file()]
    if missing:
        p.error(f"no {METRICS_FILE} in {', '.join(missing)}")
    runs = [read_run(d) for d in args.runs]
    target = args.target
    if target is None:
        pool = baseline_runs(runs) or runs
        target = 0.99 * max(e["test_accuracy"] for r in pool for e in r["epochs"])
    out = args.out or args.runs[0].parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs, target)
    table = markdown(rows, target)
    paths = plot(runs, rows, out)
    (out / "report.md").write_text(table + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    print(table)
    print("\nplots: " + " ".join(str(p) for p in paths))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
