"""End-to-end training against stock Horovod on emulated cluster links (root; see cluster.py), and
Horovod's own synthetic benchmark with only the optimizer class swapped.

    .venv/bin/python benchmarks/netem/run_train.py          # the defaults: about 70 minutes on 2 cores

Training (bench_train.py): real forward and backward of ``--model`` on ``--data``, every method of
METHODS interleaved in one job per (rate, ranks): median step time (slowest rank), training time to
``--target`` test accuracy, final accuracy, bytes per step (ours measured, Horovod's computed from
SPEC §3). Synthetic: images per second of pytorch_synthetic_benchmark.py, stock against swapped,
alternating for ``--rounds`` rounds, on one machine (plain mpirun, 2 ranks) and on the emulated links;
the swapped script is launched as the README advises (Horovod's thread cycling every 50 ms), and once
more as ported, with Horovod's defaults.

Writes benchmarks/results/e2e.json (every record, the CPU model and the commands), e2e.md (tables) and
e2e_<rate>_M<ranks>.png (test accuracy against training time per method).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster import EmulatedCluster, HarnessError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from common import RESULTS, cpu_model  # noqa: E402

sys.path.insert(0, str(ROOT))
from hvd_distef.train.cli import parser as train_parser  # noqa: E402
from hvd_distef.train.loop import IDLE_HOROVOD_CYCLE_MS  # noqa: E402

#: label -> hvd_distef.train flags; the first is the baseline of the ratios
METHODS = {
    "horovod": ["--method", "horovod"],
    "ef-blocksgdm-ps": ["--method", "ef-blocksgdm", "--topology", "ps"],
    "ef-blocksgdm-sharded": ["--method", "ef-blocksgdm", "--topology", "sharded"],
    "signum": ["--method", "signum"],
}
#: methods that need a flag the training CLI may not have yet: included once `--help` shows it
WHEN_FLAG = {"--overlap": {"ef-blocksgdm-ps-overlap": ["--method", "ef-blocksgdm", "--topology", "ps", "--overlap"]}}
#: what the launcher adds for our contenders (README, "Porting a Horovod script"): the script still calls
#: hvd.init(), and Horovod's thread, idle under our optimizer, cycles every 50 ms instead of every 1 ms
QUIET_HOROVOD = ["-x", f"HOROVOD_CYCLE_TIME={IDLE_HOROVOD_CYCLE_MS}"]
#: label -> (launcher flags, script flags); the last one is the script as ported with Horovod's defaults
SYNTHETIC = {"horovod": ([], []),
             "ef-blocksgdm-ps": (QUIET_HOROVOD, ["--distef-topology", "ps"]),
             "ef-blocksgdm-ps-overlap": (QUIET_HOROVOD, ["--distef-topology", "ps", "--distef-overlap"]),
             "ef-blocksgdm-ps, Horovod's 1 ms cycle": ([], ["--distef-topology", "ps"])}
SYNTHETIC_ARGS = ["--model", "resnet18", "--batch-size", "16", "--image-size", "32", "--num-warmup-batches", "2",
                  "--num-batches-per-iter", "3", "--num-iters", "5"]
#: what mpirun prints when its --timeout ends a job (not tried again: it would run out of time again)
JOB_TIMED_OUT = "time limit for job execution has been reached"
IMG_SEC = re.compile(r"Total img/sec on \d+ CPU\(s\): ([0-9.]+)")


def methods(bucket_cap_mb: float) -> dict:
    """METHODS, and those of WHEN_FLAG the CLI knows; overlapped ones with buckets of ``bucket_cap_mb``."""
    found = dict(METHODS)
    help_text = train_parser().format_help()
    for flag, extra in WHEN_FLAG.items():
        if flag in help_text:
            found.update(extra)
    return {label: [*flags, "--bucket-cap-mb", str(bucket_cap_mb)] if "--overlap" in flags else flags
            for label, flags in found.items()}


def time_to(record: dict, target: float):
    """Training time (s) at the first evaluation with test accuracy >= target; None if never."""
    return next((p["train_time_s"] for p in record["curve"] if p["test_accuracy"] >= target), None)


def run_checked(run, argv, what):
    proc = run(argv)
    if proc.returncode and JOB_TIMED_OUT not in proc.stderr:  # 8 ranks on 2 cores: a TCP connect has timed out once
        print(f"{what}: job failed ({proc.returncode}), once more", flush=True)
        proc = run(argv)
    if proc.returncode:
        raise HarnessError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def synthetic(run, ranks: int, rate: str, rounds: int, bucket_cap_mb: float) -> list:
    """Stock and swapped in turn (SYNTHETIC), ``rounds`` times, the overlapped one with buckets of
    ``bucket_cap_mb``; one record per run. ``run(argv)``: mpirun with ``argv`` (launcher flags, then
    the command) on every rank."""
    out = []
    for i in range(rounds):
        for label, (launcher, extra) in SYNTHETIC.items():
            if "--distef-overlap" in extra:
                extra = [*extra, "--distef-bucket-cap-mb", str(bucket_cap_mb)]
            proc = run_checked(run, [*launcher, sys.executable, str(HERE / "pytorch_synthetic_benchmark.py"),
                                     *SYNTHETIC_ARGS, *extra], f"synthetic {label}")
            img_sec = float(IMG_SEC.search(proc.stdout).group(1))
            print(f"synthetic {label:>24} M={ranks} {rate} round {i + 1}: {img_sec:.1f} img/s", flush=True)
            out.append({"label": label, "ranks": ranks, "rate": rate, "round": i + 1, "img_per_s": img_sec})
    return out


def local_mpirun(ranks: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(ROOT))

    def run(argv):
        return subprocess.run(["timeout", "1800", "mpirun", "-np", str(ranks), "--oversubscribe", *argv],
                              capture_output=True, text=True, env=env)
    return run


def train_table(records: list, target: float) -> str:
    lines = [f"| rate | ranks | method | median step | vs horovod | time to {100 * target:.0f}% | vs horovod | "
             "final acc | bytes sent/step (rank 0) | max over ranks |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        base = next(b for b in records if b["label"] == next(iter(METHODS)) and b["ranks"] == r["ranks"]
                    and b["rate"] == r["rate"])
        ttt, base_ttt = time_to(r, target), time_to(base, target)
        ttt_ratio = f"{ttt / base_ttt:.2f}x" if ttt is not None and base_ttt else ""
        computed = " (computed)" if r["bytes_source"] == "computed" else ""
        lines.append(f"| {r['rate']} | {r['ranks']} | {r['label']} | {1000 * r['step_time_median_s']:.0f} ms | "
                     f"{r['step_time_median_s'] / base['step_time_median_s']:.2f}x | "
                     f"{'never' if ttt is None else f'{ttt:.1f} s'} | {ttt_ratio} | {100 * r['final_accuracy']:.1f}% | "
                     f"{r['bytes_sent_per_step']:,.0f}{computed} | {r['max_bytes_sent_per_step']:,.0f}{computed} |")
    return "\n".join(lines)


def synthetic_table(records: list) -> str:
    """Medians of images per second over all ranks; each swapped run as a ratio to stock Horovod's
    (median over rounds, and per round)."""
    swapped = [label for label in SYNTHETIC if label != "horovod"]
    lines = ["| where | ranks | horovod img/s | " + " | ".join(f"{label} img/s (ratio; per round)" for label in swapped)
             + " |", "|---|---:|---:|" + "---:|" * len(swapped)]
    for rate, ranks in dict.fromkeys((r["rate"], r["ranks"]) for r in records):
        runs = [r for r in records if r["rate"] == rate and r["ranks"] == ranks]
        by_round = {(r["label"], r["round"]): r["img_per_s"] for r in runs}
        stock = statistics.median(v for (label, _), v in by_round.items() if label == "horovod")
        cells = []
        for label in swapped:
            mine = {i: v for (lab, i), v in by_round.items() if lab == label}
            if not mine:
                cells.append("")
                continue
            ratios = ", ".join(f"{v / by_round[('horovod', i)]:.2f}" for i, v in sorted(mine.items()))
            median = statistics.median(mine.values())
            cells.append(f"{median:.1f} ({median / stock:.2f}x; {ratios})")
        lines.append(f"| {rate} | {ranks} | {stock:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list, target: float) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for rate, ranks in dict.fromkeys((r["rate"], r["ranks"]) for r in records):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in records:
            if r["rate"] == rate and r["ranks"] == ranks:
                ax.plot([0] + [p["train_time_s"] for p in r["curve"]], [10] + [100 * p["test_accuracy"] for p in r["curve"]],
                        marker=".", label=r["label"])
        ax.axhline(100 * target, color="grey", linestyle=":", label=f"target {100 * target:.0f}%")
        ax.set_xlabel("training time (s, sum of slowest-rank steps)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=50)
        ax.set_title(f"{records[0]['model']} on {records[0]['data']}, M = {ranks}, {rate} links")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = RESULTS / f"e2e_{rate}_M{ranks}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clusters", nargs="*", default=["1gbit:2", "1gbit:4", "1gbit:8", "100mbit:4"],
                    help="RATE:RANKS of the training runs (none: the synthetic benchmark only)")
    ap.add_argument("--synthetic", nargs="*", default=["local:2", "1gbit:4", "100mbit:4"],
                    help="RATE:RANKS of the synthetic benchmark (local: plain mpirun, shared memory)")
    ap.add_argument("--rounds", type=int, default=2, help="synthetic: rounds of stock and swapped in turn")
    ap.add_argument("--overlap-bucket-cap-mb", type=float, default=25.0,
                    help="bucket_cap_mb of the overlapped contenders (default: DDP's 25)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.9, help="test accuracy to reach (stock Horovod must)")
    ap.add_argument("--train-args", default="--model wide-mlp --data mnist5k --batch-size 32 --lr-decay-epochs 4 6",
                    help="hvd_distef.train flags for every method (default: the paper's schedule shape, the lr "
                         "divided by 10 at 50%% and 75%% of the epochs)")
    ap.add_argument("--job-timeout-s", type=float, default=7200,
                    help="seconds a training job may run (8 epochs at 100 Mbit/s, M = 4: over 30 minutes here)")
    ap.add_argument("--out", type=Path, default=RESULTS / "e2e.json")
    ap.add_argument("--render", action="store_true", help="run nothing: tables and plots from --out as it is")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.out.read_text())
        return render(saved, saved["training"], saved["synthetic"], saved["target"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    chosen = methods(args.overlap_bucket_cap_mb)
    lines = Path(tempfile.mkdtemp()) / "records.jsonl"
    train_job = [sys.executable, str(HERE / "bench_train.py"), "--methods", json.dumps(chosen), "--epochs",
                 str(args.epochs), "--out", str(lines)]
    header = {"cpu": cpu_model(), "command": " ".join(map(shlex.quote, [sys.executable, *sys.argv])),
              "methods": chosen, "train_args": args.train_args, "target": args.target,
              "synthetic_args": SYNTHETIC_ARGS, "synthetic_contenders": SYNTHETIC}
    print(f"CPU: {header['cpu']}\ncommand: {header['command']}", flush=True)
    wanted = list(dict.fromkeys(args.clusters + [s for s in args.synthetic if not s.startswith("local")]))
    synth = []
    try:
        for spec in args.synthetic:
            rate, ranks = spec.split(":")
            if rate == "local":
                synth += synthetic(local_mpirun(int(ranks)), int(ranks), rate, args.rounds,
                                   args.overlap_bucket_cap_mb)
        for spec in wanted:
            rate, ranks = spec.split(":")
            with EmulatedCluster(int(ranks), rate=rate) as cluster:
                if spec in args.clusters:
                    proc = run_checked(lambda argv: cluster.mpirun(argv, timeout=args.job_timeout_s),
                                       [*train_job, "--rate", rate, "--", *args.train_args.split()], f"training {spec}")
                    print(proc.stdout, end="", flush=True)
                if spec in args.synthetic:
                    synth += synthetic(cluster.mpirun, int(ranks), rate, args.rounds, args.overlap_bucket_cap_mb)
    except HarnessError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        records = [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
        args.out.write_text(json.dumps({**header, "training": records, "synthetic": synth}, indent=1))
    return render(header, records, synth, args.target)


def render(header: dict, records: list, synth: list, target: float) -> int:
    """e2e.md and the plots from the records; prints the tables."""
    md = (f"CPU: {header['cpu']}; command: `{header['command']}`\n\n" + train_table(records, target) + "\n\n"
          + synthetic_table(synth) + "\n")
    (RESULTS / "e2e.md").write_text(md)
    paths = plot(records, target)
    print(md)
    print("wrote", RESULTS / "e2e.md", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
