"""Training runs of the experiments: what a setting is, the two phases of a claim (choosing each
setting's lr, then the evaluation seeds), how runs are launched and how they are read back.

Every run is one ``python -m hvd_distef.train`` training, with its own ``--log-dir``
``experiments/results/CLAIM/runs/[tune-]SETTING-lrLR-sSEED/`` (``config.json``, ``metrics.jsonl``,
``train.log``). On this machine all runs of a phase go through one ``mpirun`` of
``hvd_distef.experiments.sweep`` (one process per rank trains them in turn, as fresh processes would);
on a Slurm partition each run is its own ``sbatch`` job of ``launch/slurm/mpirun.sbatch``.

The design (SPEC §5b):

- **paired seeds**: evaluation seeds 0 .. n−1 are the same for every setting of a claim, and a seed
  fixes the initial weights (``torch.manual_seed`` before the model is built) and the data order
  (``Dataset.train_batches``), whatever the method; verdicts are on per-seed differences.
- **the same lr budget for every setting**: each tries its base lr times every multiplier of the grid,
  on ``tuning_seeds`` seeds of its own (``TUNING_SEED``, ``TUNING_SEED`` + 1, ...: never evaluation
  seeds), scored on the validation examples held out of the training set (``--validation``), never on
  the test set; the best mean final validation accuracy wins. While the best lies at an edge of the
  lrs tried, the next lr beyond it is tried too (``EXTENSIONS`` times at most, the same rule for every
  setting); a choice still at an edge is reported as not tuned.
- the evaluation runs train at the chosen lr on the same training examples (the validation ones held
  out too), and are scored on the test set.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..report import read_run
from ..train.files import CONFIG_FILE, METRICS_FILE
from ..train.methods import METHODS
from .verdict import mean_std

ROOT = Path(__file__).resolve().parents[2]
#: what ``hvd_distef.experiments.sweep`` leaves in a run folder besides the training's own files: rank 0's
#: output of the run, and why the run stopped when it did not finish
LOG_FILE = "train.log"
FAILURE_FILE = "failure.json"
#: the first of a setting's tuning seeds: far from the evaluation seeds 0 .. n−1
TUNING_SEED = 1000
#: how many times a setting's grid is widened by one lr beyond the edge where its best lies
EXTENSIONS = 2
#: classes of the data sets whose chance level is not 1/10 (a diverged run scores chance)
CLASSES = {"cifar100": 100}
#: (method, compression) -> base lr at the quick scale (LeNet-5 on mnist5k, batch 16-32 per worker, where
#: the presets' 0.1 diverges): the centre of a setting's grid. Each from a pilot of one tuning seed at lrs
#: a factor ~3 apart, 4 epochs, scored on the validation examples as the tuning is (EXPERIMENTS.md says
#: so); the full scale uses the presets' lr. Others fall back to the preset's.
QUICK_LR = {("ef-blocksgdm", "blocksign"): 0.02, ("ef-sgdm", "sign"): 0.02, ("sgdm", "none"): 0.03,
            ("signum", "sign"): 0.002, ("ef-blocksgdm", "qsgd"): 0.003, ("ef-blocksgdm", "topk"): 0.02}


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
    the data and model every run uses, ranks, evaluation seeds, the grid of lr multipliers each setting
    tries on ``tuning_seeds`` seeds, and the training examples held out to score them."""

    quick: bool
    data: str
    model: str  #: every run's --model (each claim has a default for each scale; --model overrides it)
    ranks: int
    seeds: int
    lr_grid: Tuple[float, ...]
    tuning_seeds: int
    validation: int
    data_dir: Optional[Path] = None

    def common_args(self) -> List[str]:
        args = ["--data", self.data, "--model", self.model, "--validation", str(self.validation)]
        return args + (["--data-dir", str(self.data_dir)] if self.data_dir else [])


@dataclass(frozen=True)
class Setting:
    """One configuration of a claim: a training method, its extra flags and its base lr (the centre of
    its grid). ``name`` labels tables, plots and run folders."""

    name: str
    method: str
    args: Tuple[str, ...]
    ranks: int
    lr: float
    #: False for a setting that only measures something no verdict compares between settings (a
    #: density, not an accuracy): it trains at its base lr, with no lr choice
    tune: bool = True

    @classmethod
    def of(cls, name: str, method: str, args: Sequence[str], scale: "Scale", lr_factor: float = 1.0,
           tune: bool = True) -> "Setting":
        """``method`` (a training CLI preset) with ``args``, on ``scale``'s ranks, at its base lr
        (``QUICK_LR`` at the quick scale, else the preset's) times ``lr_factor``."""
        args = tuple(args)
        compression = (args[args.index("--compression") + 1] if "--compression" in args
                       else METHODS[method]["compression"])
        base = METHODS[method]["lr"]
        if scale.quick:
            base = QUICK_LR.get((method, compression), base)
        return cls(name, method, args, scale.ranks, float(f"{base * lr_factor:.6g}"), tune)

    def lr_at(self, multiplier: float) -> float:
        return float(f"{self.lr * multiplier:.6g}")

    def grid(self, scale: "Scale") -> List[float]:
        return [self.lr_at(m) for m in scale.lr_grid]


def paper_schedule(scale: "Scale", quick_epochs: int, batch: int, *flags: str) -> List[str]:
    """The paper's schedule: 200 epochs, lr x0.1 after epochs 100 and 150 at the full scale; at the quick
    scale ``quick_epochs`` epochs with the drops at the same fractions (1/2 and 3/4, rounded down);
    ``batch`` per worker, then ``flags``."""
    if scale.quick:
        drops = [quick_epochs // 2, 3 * quick_epochs // 4]
        return ["--epochs", str(quick_epochs), "--batch-size", str(batch), "--lr-decay-epochs",
                *map(str, drops), *flags]
    return ["--epochs", "200", "--batch-size", str(batch), "--lr-decay-epochs", "100", "150", *flags]


@dataclass(frozen=True)
class Run:
    setting: Setting
    lr: float
    seed: int
    log_dir: Path  #: relative to the repository root, or absolute
    tuning: bool = False  #: a run of the lr choice (scored on validation examples), not an evaluation run

    @property
    def path(self) -> Path:
        """The run folder as seen from here."""
        return ROOT / self.log_dir

    def train_args(self, scale: Scale) -> List[str]:
        """The flags of ``python -m hvd_distef.train`` for this run."""
        return ["--method", self.setting.method, *scale.common_args(), *self.setting.args, "--lr", f"{self.lr:g}",
                "--seed", str(self.seed), "--log-dir", str(self.log_dir), "--no-progress"]

    def complete(self) -> bool:
        """Every epoch's metrics are there, or the run diverged."""
        metrics = self.path / METRICS_FILE
        if (self.path / FAILURE_FILE).is_file():
            return json.loads((self.path / FAILURE_FILE).read_text()).get("diverged", False)
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs_of(self)


def _tuning_runs(setting: Setting, lrs: Sequence[float], scale: Scale, runs_dir: Path) -> List[Run]:
    return [Run(setting, lr, seed, from_root(runs_dir) / f"tune-{setting.name}-lr{lr:g}-s{seed}", tuning=True)
            for lr in lrs for seed in range(TUNING_SEED, TUNING_SEED + scale.tuning_seeds)]


def plan_tuning(settings: Sequence[Setting], scale: Scale, runs_dir: Path) -> List[Run]:
    """Every (setting, lr of its grid, tuning seed) of a claim (settings that ``tune``)."""
    return [r for s in settings if s.tune for r in _tuning_runs(s, s.grid(scale), scale, runs_dir)]


def beyond(multiplier: float, up: bool) -> float:
    """The next multiplier past ``multiplier`` in the series ..., 0.1, 0.3, 1, 3, 10, ... (up or down)."""
    k = math.floor(math.log10(multiplier) + 1e-9)
    leading = multiplier / 10 ** k
    step = (3 if leading < 2 else 10) if up else (0.3 if leading < 2 else 1)
    return float(f"{step * 10 ** k:.6g}")


def plan_extension(settings: Sequence[Setting], tuning: Dict[str, "Tuning"], scale: Scale,
                   runs_dir: Path) -> List[Run]:
    """For every setting whose best lr lies at an edge of the lrs it tried, the tuning runs of the next lr
    beyond that edge (``beyond``): a grid is widened where its best lies, by the same rule for every
    setting (``EXTENSIONS`` times at most)."""
    more = []
    for s in settings:
        t = tuning[s.name]
        if t.at_edge:
            up = t.lr == max(t.scores)
            more += _tuning_runs(s, [s.lr_at(beyond(t.lr / s.lr, up))], scale, runs_dir)
    return more


def plan_evaluation(settings: Sequence[Setting], lrs: Dict[str, float], scale: Scale, runs_dir: Path) -> List[Run]:
    """Every (setting, evaluation seed 0 .. seeds − 1) at the setting's lr in ``lrs``."""
    runs_dir = from_root(runs_dir)
    return [Run(s, lrs[s.name], seed, runs_dir / f"{s.name}-lr{lrs[s.name]:g}-s{seed}")
            for s in settings for seed in range(scale.seeds)]


def epochs_of(run: Run) -> int:
    args = list(run.setting.args)
    return int(args[args.index("--epochs") + 1])


class Launcher:
    """Starts the runs of a phase: on this machine one ``mpirun -np M`` of ``hvd_distef.experiments.sweep``
    per rank count (under ``timeout``: ``timeout_s`` per run), or, with a Slurm ``partition``, every run as
    ``sbatch --wait -p PARTITION -n M launch/slurm/mpirun.sbatch`` at once (the queue decides what runs
    together). ``command(run)`` is what reproduces one run alone."""

    def __init__(self, scale: Scale, partition: Optional[str] = None, timeout_s: int = 1800,
                 python: str = sys.executable, mpiexec: str = "mpirun"):
        self.scale, self.partition, self.timeout_s = scale, partition, timeout_s
        self.python, self.mpiexec = str(from_root(python)), mpiexec

    def command(self, run: Run) -> List[str]:
        """The exact command line of ``run`` alone (run from the repository root)."""
        ranks = str(run.setting.ranks)
        train = run.train_args(self.scale)
        if self.partition:
            return ["sbatch", "--wait", "-p", self.partition, "-n", ranks, "--output",
                    str(run.log_dir / "slurm-%j.out"), "launch/slurm/mpirun.sbatch", *train]
        return [self.mpiexec, "-np", ranks, "--oversubscribe", self.python, "-m", "hvd_distef.train", *train]

    def sweep_command(self, ranks: int, plan: Path, runs: int) -> List[str]:
        """The ``mpirun`` of ``hvd_distef.experiments.sweep`` that trains the runs listed in ``plan``."""
        return ["timeout", str(self.timeout_s * runs), self.mpiexec, "-np", str(ranks), "--oversubscribe",
                self.python, "-m", "hvd_distef.experiments.sweep", str(from_root(plan))]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if os.geteuid() == 0:  # OpenMPI refuses root unless told (as launch/compare.sh does)
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return env

    def run_all(self, runs: Sequence[Run], plan_dir: Path, phase: str,
                progress: Callable[[str], None] = print) -> List[str]:
        """Launch ``runs``; returns the commands that ran them (sweeps or sbatch jobs). Raises
        ExperimentError naming every run that neither completed nor diverged, with its log."""
        for run in runs:
            run.path.mkdir(parents=True, exist_ok=True)
        launched: List[str] = []
        if not runs:
            return launched
        if self.partition:
            procs = [(run, self._start(self.command(run), run.path / LOG_FILE)) for run in runs]
            launched += [shlex.join(self.command(run)) for run in runs]
            try:
                for _, proc in procs:
                    self._wait(proc)
            except BaseException:  # interrupted: stop the other sbatch processes too
                for _, proc in procs:
                    proc.terminate()
                raise
        else:
            plan_dir.mkdir(parents=True, exist_ok=True)
            for ranks in sorted({r.setting.ranks for r in runs}):
                group = [r for r in runs if r.setting.ranks == ranks]
                plan = plan_dir / f"sweep-{phase}-np{ranks}.json"
                plan.write_text(json.dumps({"runs": [r.train_args(self.scale) for r in group]}, indent=0))
                command = self.sweep_command(ranks, plan, len(group))
                launched.append(shlex.join(command))
                progress(f"  {phase}: {len(group)} runs on {ranks} ranks: {shlex.join(command)}")
                self._stream(command, plan.with_suffix(".log"), progress)
        failed = [r for r in runs if not r.complete()]
        if failed:
            raise ExperimentError("training runs failed: " + ", ".join(
                f"{r.log_dir.name} (log: {r.path / LOG_FILE}; alone: {shlex.join(self.command(r))})" for r in failed))
        return launched

    def _stream(self, command: List[str], log: Path, progress: Callable[[str], None]) -> int:
        """Run ``command``, passing its lines to ``progress`` and into ``log``; returns its exit code."""
        with log.open("w") as f:
            proc = self._start(command, None)
            try:
                for line in proc.stdout:
                    f.write(line)
                    if line.startswith("  ["):
                        progress(line.rstrip("\n"))
                return proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise

    @staticmethod
    def _wait(proc: subprocess.Popen) -> int:
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise

    def _start(self, command: List[str], log: Optional[Path]) -> subprocess.Popen:
        if log is None:
            return subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        with open(log, "w") as f:
            return subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT)


def read(run: Run) -> dict:
    """``hvd_distef.report.read_run``'s dict of a finished run, with ``seed``, ``lr`` and ``diverged``
    (a NaN or inf stopped it; its accuracies then count as chance). Raises ExperimentError for a run
    that left no metrics."""
    failure = run.path / FAILURE_FILE
    diverged = failure.is_file() and json.loads(failure.read_text()).get("diverged", False)
    if not (run.path / CONFIG_FILE).is_file() or not (diverged or (run.path / METRICS_FILE).is_file()):
        raise ExperimentError(f"{run.path} has no {METRICS_FILE}: run the claim without --reuse")
    if (run.path / METRICS_FILE).is_file() and (run.path / METRICS_FILE).read_text().strip():
        record = read_run(run.path)
    else:  # diverged in its first epoch
        record = {"dir": run.path, "config": json.loads((run.path / CONFIG_FILE).read_text()), "epochs": [],
                  "label": run.path.name}
    last = record["epochs"][-1] if record["epochs"] else {}
    diverged = diverged or not math.isfinite(last.get("train_loss", math.nan))
    return dict(record, seed=run.seed, lr=run.lr, diverged=diverged)


def chance(run: dict) -> float:
    return 1 / CLASSES.get(run["config"]["data"], 10)


def final_accuracy(run: dict) -> float:
    """The last epoch's test accuracy; chance for a run that diverged."""
    return chance(run) if run["diverged"] else run["epochs"][-1]["test_accuracy"]


def final_validation(run: dict) -> float:
    """The last epoch's validation accuracy; chance for a run that diverged."""
    return chance(run) if run["diverged"] else run["epochs"][-1]["validation_accuracy"]


def mean_accuracy(first: int, last: int) -> Callable[[dict], float]:
    """The mean test accuracy over epochs ``first`` to ``last`` (both included; epochs count from 1);
    chance for the epochs a diverged run did not finish."""
    def value(run: dict) -> float:
        by_epoch = {e["epoch"]: e["test_accuracy"] for e in run["epochs"]}
        accs = [by_epoch.get(e, chance(run)) for e in range(first, last + 1)]
        return sum(accs) / len(accs)
    return value


def epoch_mean(key: str) -> Callable[[dict], Optional[float]]:
    """The mean over epochs of an epoch record's ``key`` (bytes per step, step time); None for a run
    that diverged (its figures stop early)."""
    return lambda run: None if run["diverged"] else sum(e[key] for e in run["epochs"]) / len(run["epochs"])


@dataclass
class Tuning:
    """A setting's lr choice: every lr of its grid with the mean final validation accuracy over the
    tuning seeds, the chosen lr, and whether it lies at an edge of the grid (then it is not tuned: a
    better lr may lie beyond)."""

    scores: Dict[float, float]
    lr: float

    @property
    def at_edge(self) -> bool:
        return len(self.scores) > 1 and self.lr in (min(self.scores), max(self.scores))

    @property
    def word(self) -> str:
        if not self.scores:
            return "fixed: measures only"
        if len(self.scores) == 1:
            return "one lr tried"
        return f"edge of the grid ({'lowest' if self.lr == min(self.scores) else 'highest'}): not tuned" \
            if self.at_edge else "tuned"


def choose(runs: Sequence[Run], settings: Sequence[Setting] = ()) -> Dict[str, Tuning]:
    """Per setting, the lr of the best mean final validation accuracy over its tuning runs (the lower lr
    on a tie); the base lr of ``settings`` that do not ``tune``."""
    scores: Dict[str, Dict[float, List[float]]] = {}
    for run in runs:
        scores.setdefault(run.setting.name, {}).setdefault(run.lr, []).append(final_validation(read(run)))
    out = {s.name: Tuning({}, s.lr) for s in settings if not s.tune}
    for name, by_lr in scores.items():
        means = {lr: mean_std(v)[0] for lr, v in sorted(by_lr.items())}
        out[name] = Tuning(means, max(means, key=lambda lr: (means[lr], -lr)))
    return out


@dataclass
class Outcome:
    """A setting's evaluation runs (seed -> ``read`` dict) at the lr its tuning chose."""

    setting: Setting
    tuning: Tuning
    runs: Dict[int, dict]

    @property
    def lr(self) -> float:
        return self.tuning.lr

    def values(self, value: Callable[[dict], Optional[float]]) -> Dict[int, Optional[float]]:
        """seed -> ``value(run)`` (None where the run has no such value)."""
        return {seed: value(run) for seed, run in self.runs.items()}

    def stat(self, value: Callable[[dict], Optional[float]]) -> Tuple[float, float]:
        """(mean, std) over the seeds of ``value(run)``, leaving out None."""
        return mean_std([v for v in self.values(value).values() if v is not None])

    def diverged(self) -> int:
        return sum(r["diverged"] for r in self.runs.values())

    def per_epoch(self, key) -> Tuple[List[int], List[float], List[float]]:
        """Epochs and the mean and std over the seeds that did not diverge of an epoch record's ``key``
        (a name, or a function of the record)."""
        value = key if callable(key) else (lambda e: e[key])
        runs = [r for r in self.runs.values() if not r["diverged"]] or list(self.runs.values())
        epochs = [e["epoch"] for e in runs[0]["epochs"]]
        rows = [mean_std([value(r["epochs"][i]) for r in runs if i < len(r["epochs"])]) for i in range(len(epochs))]
        return epochs, [m for m, _ in rows], [s for _, s in rows]


def collect(runs: Sequence[Run], tuning: Dict[str, Tuning]) -> Dict[str, Outcome]:
    """Read every evaluation run back, by setting (in the order of ``runs``) and seed."""
    outcomes: Dict[str, Outcome] = {}
    for run in runs:
        name = run.setting.name
        outcomes.setdefault(name, Outcome(run.setting, tuning[name], {})).runs[run.seed] = read(run)
    return outcomes
