"""``python -m hvd_distef.report RUN_DIRS...``: compare training runs side by side (SPEC §5b).

Reads each run's ``config.json`` and ``metrics.jsonl`` (written by ``hvd_distef.train``), prints a
markdown table (method, topology, ranks, final and best test accuracy, time to a target accuracy,
mean step time, bytes per step of rank 0 and of the busiest rank, and how much less the busiest rank
moves than stock Horovod's at the same rank count) and writes it with PNG plots: test accuracy
against epoch and against wall time, and bytes per step per run.

The baseline of the ratios and of the default target is stock Horovod at its defaults
(``--method horovod``, float32) of the same rank count when it is among the runs, else our ``sgdm``.
Bytes inside an allreduce (Horovod's, or ours under ``topology="allreduce"``) cannot be counted: they
are SPEC §3's ring-allreduce formula, marked "computed (ring formula)" in the table and hatched in the
plot; every other method's are measured at the MPI boundary.

Below the table: the environment the runs had (CPU, launcher, threads, Horovod's and Open MPI's
settings), every setting in which contenders of one rank count differ (a comparison is fair only when
they differ in the one thing compared), a line when ranks shared cores, and, when every run had all its
ranks on one machine, a line saying what time means there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .train.cli import OneLineParser
from .train.environment import differences
from .train.files import CONFIG_FILE, METRICS_FILE

#: methods that are the baseline, the first present wins (stock Horovod, float32, then ours)
BASELINES = (("horovod", "none"), ("sgdm", "none"))
ONE_MACHINE = ("All ranks of these runs shared one machine, where a link costs almost nothing: compare bytes and "
               "accuracy here, not time. For time on a network, see BENCHMARKS.md (\"Step on emulated links\" and "
               "\"End to end\"), where every contender runs on emulated cluster links.")


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
    """The runs of the first (method, compression) in BASELINES that is present (empty if none is)."""
    for method, compression in BASELINES:
        found = [r for r in runs if r["config"]["method"] == method and r["config"]["compression"] == compression]
        if found:
            return found
    return []


def busiest_bytes(run: dict) -> float:
    """Mean over epochs of the largest bytes sent plus received per step by one rank (the busiest
    link's traffic); from rank 0 alone where a run did not record every rank's."""
    def per_epoch(e: dict) -> float:
        if "bytes_sent_by_rank" in e:
            return max(s + r for s, r in zip(e["bytes_sent_by_rank"], e["bytes_received_by_rank"]))
        return e["bytes_sent_per_step"] + e.get("bytes_received_per_step", e["bytes_sent_per_step"])
    return sum(per_epoch(e) for e in run["epochs"]) / len(run["epochs"])


def summarise(runs: List[dict], target: float) -> List[dict]:
    rows = []
    baselines = {r["config"]["ranks"]: r for r in reversed(baseline_runs(runs))}  # the first per rank count
    for run in runs:
        c, last = run["config"], run["epochs"][-1]
        base = baselines.get(c["ranks"])
        busiest = busiest_bytes(run)
        rows.append({
            "run": run["label"], "method": c["method"], "topology": c["topology"], "compression": c["compression"],
            "ranks": c["ranks"], "epochs": last["epoch"], "final_accuracy": last["test_accuracy"],
            "best_accuracy": max(e["test_accuracy"] for e in run["epochs"]), "time_to_target_s": time_to(run, target),
            "bytes_sent_per_step": _mean(run, "bytes_sent_per_step"), "busiest_bytes_per_step": busiest,
            "bytes_source": last.get("bytes_source", "measured"),
            "baseline": None if base is None else base["label"],
            "cut_vs_baseline": None if base is None or not busiest else busiest_bytes(base) / busiest,
            "step_time_ms": 1000 * _mean(run, "step_time_s"),
            "comm_share": None if last.get("comm_time_s") is None else
            sum(e["comm_time_s"] for e in run["epochs"]) / max(1e-12, last["wall_time_s"]),
        })
    return rows


def _mean(run: dict, key: str) -> float:
    return sum(e[key] for e in run["epochs"]) / len(run["epochs"])


def _bytes(value: float, source: str) -> str:
    return f"{value:,.0f}" + ("" if source == "measured" else f" [{source}]")


def markdown(rows: List[dict], target: float) -> str:
    head = ("| run | method | topology | compression | ranks | final acc | best acc | "
            f"time to {100 * target:.1f}% | step time | comm share | bytes sent/step (rank 0) | "
            "sent+received/step (busiest rank) | busiest rank's bytes cut vs baseline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ttt = "never" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s"
        cut = "" if r["cut_vs_baseline"] is None else f"{r['cut_vs_baseline']:.1f}x"
        share = "n/a" if r["comm_share"] is None else f"{100 * r['comm_share']:.0f}%"
        lines.append(f"| {r['run']} | {r['method']} | {r['topology']} | {r['compression']} | {r['ranks']} | "
                     f"{100 * r['final_accuracy']:.2f}% | {100 * r['best_accuracy']:.2f}% | {ttt} | "
                     f"{r['step_time_ms']:.2f} ms | {share} | {_bytes(r['bytes_sent_per_step'], r['bytes_source'])} | "
                     f"{_bytes(r['busiest_bytes_per_step'], r['bytes_source'])} | {cut} |")
    return "\n".join(lines)


def on_one_machine(runs: List[dict]) -> bool:
    """Whether every run recorded its environment and had all its ranks on one host."""
    envs = [r["config"].get("environment") for r in runs]
    return all(envs) and all(e["hosts"] == 1 for e in envs)


def environment_notes(runs: List[dict]) -> List[str]:
    """The runs' common environment, what differs between contenders of one rank count, shared cores,
    and the one-machine line (module docstring)."""
    envs = {r["label"]: r["config"].get("environment") for r in runs}
    known = [e for e in envs.values() if e]
    notes = []
    if known:
        e = known[0]
        set_ = ", ".join(f"{k}={v}" for k, v in e["settings"].items() if v is not None) or "none"
        notes.append(f"Environment: {e['cpu']}, {e['host_cores']} cores per host; launcher {e['launcher']}; "
                     f"{e['torch_threads']} torch thread(s) per rank; compiled kernels: {e['compiled_kernels']}; "
                     f"settings: {set_} (unset ones are the libraries' defaults: Horovod cycles every 1 ms).")
    by_ranks: Dict[int, Dict[str, Optional[dict]]] = {}
    for r in runs:
        by_ranks.setdefault(r["config"]["ranks"], {})[r["label"]] = envs[r["label"]]
    for ranks, group in sorted(by_ranks.items()):
        for key, values in differences(group).items():
            notes.append(f"**Not a like-for-like comparison at {ranks} ranks**: the runs differ in {key} ("
                         + ", ".join(f"{run}: {v}" for run, v in values.items()) + ").")
    crowded = sorted({r["config"]["ranks"] for r in runs if (envs[r["label"]] or {}).get("oversubscribed")})
    if crowded:
        notes.append(f"At {', '.join(map(str, crowded))} ranks some host ran more ranks than it has cores: ranks "
                     "shared cores, so a contender with a busy helper thread (Horovod's background thread cycles "
                     "every millisecond) also paid for the crowding, which a cluster with a core per rank does not.")
    if on_one_machine(runs):
        notes.append(ONE_MACHINE)
    return notes


def plot(runs: List[dict], rows: List[dict], out: Path, one_machine: bool = False) -> List[Path]:
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
        if one_machine and x_key == "wall_time_s":
            ax.set_title("all ranks on one machine: no link to pay for, so time says little", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    computed = [r["bytes_source"] != "measured" for r in rows]
    ax.bar([r["run"] for r in rows], [r["busiest_bytes_per_step"] for r in rows],
           hatch=["//" if c else "" for c in computed], edgecolor="black")
    ax.set_yscale("log")
    ax.set_ylabel("bytes sent + received per step, busiest rank (log)")
    ax.set_title("hatched: computed (SPEC §3's ring formula: the allreduce runs inside Horovod or MPI)", fontsize=9)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['busiest_bytes_per_step']:,.0f}", (i, r["busiest_bytes_per_step"]), ha="center", va="bottom")
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
    text = "\n\n".join([markdown(rows, target), *environment_notes(runs)])
    paths = plot(runs, rows, out, on_one_machine(runs))
    (out / "report.md").write_text(text + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    print("\nplots: " + " ".join(str(p) for p in paths))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
