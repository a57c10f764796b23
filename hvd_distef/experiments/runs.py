"""Training runs of the experiments: what a setting is, how its runs are launched (mpirun on this
machine, Slurm's ``sbatch`` on a partition) and how their per-seed results are read back.

Every run is one ``python -m hvd_distef.train`` job, exactly as a user would launch it; its
``--log-dir`` is ``experiments/results/CLAIM/runs/SETTING-lrLR-sSEED/`` (``config.json``,
``metrics.jsonl``, ``train.log``).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..report import read_run
from ..train.cli import METHODS
from ..train.loop import METRICS_FILE
from .verdict import mean_std

ROOT = Path(__file__).resolve().parents[2]


def from_root(path: Path) -> Path:
    """``path`` (absolute, or relative to the working directory) relative to the repository root when it
    lies inside it (commands and logs then hold no machine-specific prefix), else absolute; runs are
    launched from the root."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


class ExperimentError(RuntimeError):
    """A training run failed or left no metrics; the message names the run and its log."""


@dataclass(frozen=True)
class Scale:
    """What the user chose on the command line: ``quick`` (this machine) or the full setting (a cluster),
    the data and model every run uses, ranks, seeds and the grid of lr multipliers each setting tries."""

    quick: bool
    data: str
    model: str  #: every run's --model (each claim has a default for each scale; --model overrides it)
    ranks: int
    seeds: int
    lr_grid: Tuple[float, ...]
    data_dir: Optional[Path] = None

    def common_args(self) -> List[str]:
        args = ["--data", self.data, "--model", self.model]
        return args + (["--data-dir", str(self.data_dir)] if self.data_dir else [])


@dataclass(frozen=True)
class Setting:
    """One configuration of a claim: a training method, its extra flags and its base lr (the grid
    multiplies it). ``name`` labels tables, plots and run folders."""

    name: str
    method: str
    args: Tuple[str, ...]
    ranks: int
    lr: float

    @classmethod
    def of(cls, name: str, method: str, args: Sequence[str], scale: "Scale") -> "Setting":
        """``method`` (a training CLI preset) with ``args``, on ``scale``'s ranks, at the preset's lr."""
        return cls(name, method, tuple(args), scale.ranks, METHODS[method]["lr"])


def paper_schedule(scale: "Scale", quick_epochs: int, batch: int, *flags: str) -> List[str]:
    """The paper's schedule at the full scale (200 epochs, lr x0.1 after epochs 100 and 150), or
    ``quick_epochs`` epochs without a drop at the quick scale; ``batch`` per worker, then ``flags``."""
    if scale.quick:
        return ["--epochs", str(quick_epochs), "--batch-size", str(batch), *flags]
    return ["--epochs", "200", "--batch-size", str(batch), "--lr-decay-epochs", "100", "150", *flags]


@dataclass(frozen=True)
class Run:
    setting: Setting
    lr: float
    seed: int
    log_dir: Path  #: relative to the repository root, or absolute

    @property
    def path(self) -> Path:
        """The run folder as seen from here."""
        return ROOT / self.log_dir

    def train_args(self, scale: Scale) -> List[str]:
        """The flags of ``python -m hvd_distef.train`` for this run."""
        return ["--method", self.setting.method, *scale.common_args(), *self.setting.args, "--lr", f"{self.lr:g}",
                "--seed", str(self.seed), "--log-dir", str(self.log_dir), "--no-progress"]

    def complete(self, epochs: int) -> bool:
        metrics = self.path / METRICS_FILE
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs


def plan(settings: Sequence[Setting], scale: Scale, runs_dir: Path) -> List[Run]:
    """Every (setting, lr multiplier, seed) of a claim, seeds 0 .. seeds − 1."""
    runs_dir = from_root(runs_dir)
    return [Run(s, s.lr * m, seed, runs_dir / f"{s.name}-lr{s.lr * m:g}-s{seed}")
            for s in settings for m in scale.lr_grid for seed in range(scale.seeds)]


def epochs_of(run: Run) -> int:
    args = list(run.setting.args)
    return int(args[args.index("--epochs") + 1])


class Launcher:
    """Starts the runs: one ``mpirun -np M`` after another on this machine (under ``timeout``), or,
    with a Slurm ``partition``, every run as ``sbatch --wait -p PARTITION -n M launch/slurm/mpirun.sbatch``
    at once (the queue decides what runs together)."""

    def __init__(self, scale: Scale, partition: Optional[str] = None, timeout_s: int = 1800,
                 python: str = sys.executable, mpiexec: str = "mpirun"):
        self.scale, self.partition, self.timeout_s = scale, partition, timeout_s
        self.python, self.mpiexec = str(from_root(python)), mpiexec

    def command(self, run: Run) -> List[str]:
        """The exact command line of ``run`` (run from the repository root)."""
        ranks = str(run.setting.ranks)
        train = run.train_args(self.scale)
        if self.partition:
            return ["sbatch", "--wait", "-p", self.partition, "-n", ranks, "--output",
                    str(run.log_dir / "slurm-%j.out"), "launch/slurm/mpirun.sbatch", *train]
        return ["timeout", str(self.timeout_s), self.mpiexec, "-np", ranks, "--oversubscribe", self.python,
                "-m", "hvd_distef.train", *train]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if os.geteuid() == 0:  # OpenMPI refuses root unless told (as launch/compare.sh does)
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return env

    def run_all(self, runs: Sequence[Run], progress: Callable[[str], None] = print) -> None:
        """Launch ``runs``; raises ExperimentError naming every run that failed, with its log."""
        for run in runs:
            run.path.mkdir(parents=True, exist_ok=True)
        if self.partition:
            procs = [(run, self._start(run)) for run in runs]
            try:
                failed = [run for run, proc in procs if self._wait(proc) != 0]
            except BaseException:  # interrupted: stop the other sbatch processes too
                for _, proc in procs:
                    proc.terminate()
                raise
        else:
            failed = []
            for i, run in enumerate(runs, 1):
                start = time.perf_counter()
                if self._wait(self._start(run)) != 0:
                    failed.append(run)
                    progress(f"  [{i}/{len(runs)}] {run.log_dir.name}: FAILED (see {run.path / 'train.log'})")
                    continue
                last = read_run(run.path)["epochs"][-1]
                progress(f"  [{i}/{len(runs)}] {run.log_dir.name}: test accuracy "
                         f"{100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs "
                         f"({time.perf_counter() - start:.0f} s)")
        if failed:
            raise ExperimentError("training runs failed: " + ", ".join(
                f"{r.log_dir.name} (log: {r.path / 'train.log'}; command: {shlex.join(self.command(r))})"
                for r in failed))

    @staticmethod
    def _wait(proc: subprocess.Popen) -> int:
        """The exit code; an interrupted wait (Ctrl-C) stops the job before passing the interrupt on."""
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise

    def _start(self, run: Run) -> subprocess.Popen:
        log = open(run.path / "train.log", "w")
        with log:
            return subprocess.Popen(self.command(run), cwd=ROOT, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT)


@dataclass
class Outcome:
    """A setting's runs at the lr the grid chose (best mean final test accuracy over the seeds),
    one read ``hvd_distef.report.read_run`` dict per seed, and every lr's mean final accuracy."""

    setting: Setting
    lr: float
    runs: List[dict]
    lr_scores: Dict[float, float] = field(default_factory=dict)

    def stat(self, value: Callable[[dict], float]) -> Tuple[float, float]:
        """(mean, std) over the seeds of ``value(run)``."""
        return mean_std([value(r) for r in self.runs])

    def per_epoch(self, key) -> Tuple[List[int], List[float], List[float]]:
        """Epochs and the mean and std over seeds of an epoch record's ``key`` (a name, or a function
        of the record)."""
        value = key if callable(key) else (lambda e: e[key])
        epochs = [e["epoch"] for e in self.runs[0]["epochs"]]
        rows = [mean_std([value(r["epochs"][i]) for r in self.runs]) for i in range(len(epochs))]
        return epochs, [m for m, _ in rows], [s for _, s in rows]


def final_accuracy(run: dict) -> float:
    return run["epochs"][-1]["test_accuracy"]


def mean_accuracy(first: int, last: int) -> Callable[[dict], float]:
    """The mean test accuracy over epochs ``first`` to ``last`` (both included; epochs count from 1)."""
    def value(run: dict) -> float:
        accs = [e["test_accuracy"] for e in run["epochs"] if first <= e["epoch"] <= last]
        return sum(accs) / len(accs)
    return value


def epoch_mean(key: str) -> Callable[[dict], float]:
    """The mean over epochs of an epoch record's ``key`` (bytes per step, step time)."""
    return lambda run: sum(e[key] for e in run["epochs"]) / len(run["epochs"])


def collect(runs: Sequence[Run]) -> Dict[str, Outcome]:
    """Read every run back and keep, per setting, the lr of the best mean final accuracy."""
    by_setting: Dict[str, Dict[float, List[dict]]] = {}
    settings: Dict[str, Setting] = {}
    for run in runs:
        if not (run.path / METRICS_FILE).is_file():
            raise ExperimentError(f"{run.path} has no {METRICS_FILE}: run the claim without --reuse")
        settings[run.setting.name] = run.setting
        by_setting.setdefault(run.setting.name, {}).setdefault(run.lr, []).append(read_run(run.path))
    outcomes = {}
    for name, by_lr in by_setting.items():
        scores = {lr: mean_std([final_accuracy(r) for r in rs])[0] for lr, rs in by_lr.items()}
        best = max(scores, key=scores.get)
        outcomes[name] = Outcome(settings[name], best, by_lr[best], scores)
    return outcomes
