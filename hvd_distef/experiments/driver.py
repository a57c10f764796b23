"""Run the claims of the authors' rebuttal as training experiments and rebuild EXPERIMENTS.md.

``python -m hvd_distef.experiments CLAIM... [--quick] [--ranks M] [--data D] [--partition P]``: for
each claim, plan its runs (settings x lr grid x seeds), launch them (``mpirun`` one after another,
or ``sbatch --wait`` on ``--partition`` all at once), read them back, judge, and write
``experiments/results/CLAIM/`` (runs.jsonl, summary.json, report.md, PNG plots, the runs' folders);
then rebuild ``EXPERIMENTS.md`` from every claim's results present. ``all`` runs every claim.
``--quick`` is this machine's scale (digits, small models, a few epochs: each claim a few minutes on 2
cores); without it, the paper's (CIFAR-100, ResNet-20, 200 epochs; give ``--data-dir``).
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..train.cli import OneLineParser, positive_float, positive_int
from ..train.data import CIFAR, LOADERS
from ..train.models import MODELS
from . import CLAIMS
from .report import E2E_REPORT, write_claim, write_experiments_md
from .runs import ROOT, ExperimentError, Launcher, Scale, collect, epochs_of, plan

#: data and model of each scale when neither the claim nor the user names one
DEFAULT_DATA = {True: "digits", False: "cifar100"}
DEFAULT_MODEL = {True: "mlp", False: "resnet20"}
DEFAULT_LR_GRID = {True: (1.0,), False: (0.3, 1.0, 3.0)}
DEFAULT_RANKS = 2


def parser() -> OneLineParser:
    p = OneLineParser(prog="hvd_distef.experiments", description=__doc__.split("\n")[0],
                      epilog="claims: " + "; ".join(f"{k}: {m.TITLE} (lines {m.LINES})" for k, m in CLAIMS.items()))
    p.add_argument("claims", nargs="+", metavar="CLAIM", choices=["all", *CLAIMS], help="a claim's name, or all")
    p.add_argument("--quick", action="store_true", help="this machine's scale: digits, small models, few epochs")
    p.add_argument("--ranks", type=positive_int, help="ranks per run (default 2; tree-ring: 4)")
    p.add_argument("--data", choices=sorted(LOADERS), help="default: digits with --quick, else cifar100")
    p.add_argument("--data-dir", type=Path, help="folder with the CIFAR archive (hvd_distef.train --data-dir)")
    p.add_argument("--model", choices=sorted(MODELS), help="default: the claim's (mlp or cnn quick, resnet20 full)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--lr-grid", type=positive_float, nargs="+",
                   help="multipliers of each method's default lr tried by every setting (default: 1 with "
                        "--quick, else 0.3 1 3)")
    p.add_argument("--partition", help="submit every run to this Slurm partition (launch/slurm/mpirun.sbatch)")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds per mpirun run before it is killed")
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
                        ("--model", args.model), ("--partition", args.partition)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    if args.seeds != 3:
        parts += ["--seeds", str(args.seeds)]
    if args.lr_grid:
        parts += ["--lr-grid", *[f"{m:g}" for m in args.lr_grid]]
    return " ".join(parts)


def scale_for(claim, args) -> Scale:
    model = args.model or getattr(claim, "MODEL", DEFAULT_MODEL)[args.quick]
    return Scale(quick=args.quick, data=args.data or DEFAULT_DATA[args.quick], model=model,
                 ranks=args.ranks or getattr(claim, "DEFAULT_RANKS", DEFAULT_RANKS), seeds=args.seeds,
                 lr_grid=tuple(args.lr_grid or DEFAULT_LR_GRID[args.quick]), data_dir=args.data_dir)


def run_claim(number: int, claim, args) -> Optional[str]:
    """Run one claim and write its results; returns its verdict (None on --dry-run)."""
    scale = scale_for(claim, args)
    out = args.out / claim.NAME
    runs = plan(claim.settings(scale), scale, out / "runs")
    launcher = Launcher(scale, args.partition, args.timeout)
    commands = {str(r.path): shlex.join(launcher.command(r)) for r in runs}
    print(f"== claim {number} ({claim.NAME}): {claim.TITLE}; {len(runs)} runs", flush=True)
    if args.dry_run:
        print("\n".join(commands.values()))
        return None
    todo = [r for r in runs if not (args.reuse and r.complete(epochs_of(r)))]
    start = time.perf_counter()
    launcher.run_all(todo, progress=lambda line: print(line, flush=True))
    outcomes = collect(runs)
    out.mkdir(parents=True, exist_ok=True)
    analysis = claim.analyse(outcomes, scale, out)
    write_claim(out, args.experiments_md.parent, number, claim, scale, outcomes, analysis,
                command_of(claim, args), commands)
    print(f"   verdict: {analysis.verdict.word} ({time.perf_counter() - start:.0f} s; {out / 'report.md'})",
          flush=True)
    return analysis.verdict.word


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    data = args.data or DEFAULT_DATA[args.quick]
    if data in CIFAR and args.data_dir is None:
        p.error(f"--data {data} needs --data-dir (the full setting trains on CIFAR; or use --quick)")
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
                                lambda claim: command_of(claim, args), ROOT / E2E_REPORT)
    for name, word in verdicts.items():
        print(f"claim {numbers[name]} ({name}): {word}")
    print(f"report: {path}")
    return 0
