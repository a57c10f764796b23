"""What an experiment writes: ``runs.jsonl`` (a line per training run), ``summary.json`` (per setting,
mean ± std, and the verdict), ``report.md`` (the claim's section) and PNG plots in
``experiments/results/CLAIM/``, and ``EXPERIMENTS.md``, rebuilt from every claim's section found there."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .runs import Outcome, Scale, final_accuracy, from_root
from .verdict import AGREES, DISAGREES, NOT_MEASURABLE, Verdict

SECTION_FILE = "report.md"
SUMMARY_FILE = "summary.json"
RUNS_FILE = "runs.jsonl"
E2E_REPORT = Path("benchmarks/results/e2e.md")


@dataclass
class Analysis:
    """A claim's findings: the setup it adds to the common one, markdown tables, plots (file names in
    the claim's folder), the numbers behind them (``summary.json``) and the verdict."""

    setup: str
    tables: List[str]
    plots: List[str]
    verdict: Verdict
    numbers: Dict[str, object] = field(default_factory=dict)


def pm(stat: Tuple[float, float], scale: float = 100.0, digits: int = 2) -> str:
    """"mean ± std" of a (mean, std) pair, multiplied by ``scale`` (100: accuracies in %)."""
    return f"{scale * stat[0]:.{digits}f} ± {scale * stat[1]:.{digits}f}"


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(outcomes: Dict[str, Outcome], extra: Sequence[Tuple[str, callable]] = ()) -> str:
    """Per setting: chosen lr, final test accuracy (%) mean ± std over seeds, and ``extra`` columns
    (header, function of the outcome returning a string)."""
    head = ["setting", "lr (chosen)", "final test acc (%)", *[h for h, _ in extra]]
    rows = [[name, f"{o.lr:g}", pm(o.stat(final_accuracy)), *[f(o) for _, f in extra]] for name, o in outcomes.items()]
    return table(head, rows)


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
    return (f"{'quick' if scale.quick else 'full'} scale: `{scale.data}`, model `{scale.model}`, {scale.ranks} ranks, "
            f"{scale.seeds} seeds per setting (mean ± sample std). Learning rates: every setting tries its "
            f"method's default lr (`hvd_distef.train --help`) times each of [{grid}] and keeps the one with the "
            f"best mean final test accuracy: the same budget of lr choices for every method")


def section(number: int, claim, scale: Scale, analysis: Analysis, command: str, prefix: str) -> str:
    """A claim's markdown section; plot paths are prefixed with ``prefix`` (where the section is read from)."""
    plots = "\n".join(f"![{Path(p).stem}]({prefix}{p})" for p in analysis.plots)
    return "\n\n".join([
        f"## Claim {number}: {claim.TITLE}",
        f"**Claim** (rebuttal lines {claim.LINES}): {claim.CLAIM}",
        f"**Setup**: {common_setup(scale)}. {analysis.setup}",
        "**Figures**:\n\n" + "\n\n".join(analysis.tables),
        plots,
        verdict_text(analysis.verdict),
        f"**Command**: `{command}` (one training run per setting and seed, listed in "
        f"`{prefix}{RUNS_FILE}` with its exact command line)",
    ]) + "\n"


def verdict_text(verdict: Verdict) -> str:
    """The verdict line, and a table of its parts when it combines several."""
    if not verdict.parts:
        return f"**Verdict: {verdict.word}.** {verdict.why}"
    rows = [[i, p.word, p.why] for i, p in enumerate(verdict.parts, 1)]
    return (f"**Verdict: {verdict.word}** (it agrees only if every part agrees, disagrees if any part does):\n\n"
            + table(["part", "verdict", "measured"], rows))


def write_claim(out: Path, md_dir: Path, number: int, claim, scale: Scale, outcomes: Dict[str, Outcome],
                analysis: Analysis, command: str, commands: Dict[str, str]) -> None:
    """runs.jsonl, summary.json and report.md of one claim in ``out`` (its results folder), and
    section.md, the same section with paths relative to ``md_dir`` (where EXPERIMENTS.md lives)."""
    with (out / RUNS_FILE).open("w") as f:
        for name, o in outcomes.items():
            for run in o.runs:
                last = run["epochs"][-1]
                f.write(json.dumps({"setting": name, "lr": o.lr, "seed": run["config"]["seed"],
                                    "final_test_accuracy": last["test_accuracy"], "epochs": last["epoch"],
                                    "bytes_sent_per_step": last["bytes_sent_per_step"],
                                    "log_dir": str(from_root(run["dir"])), "command": commands[str(run["dir"])]}) + "\n")
    summary = {"claim": claim.NAME, "verdict": analysis.verdict.word, "why": analysis.verdict.why,
               "parts": [{"verdict": p.word, "why": p.why} for p in analysis.verdict.parts],
               "command": command, "quick": scale.quick, "lr_grid": list(scale.lr_grid),
               "settings": {name: {"lr": o.lr, "lr_scores": {f"{k:g}": v for k, v in o.lr_scores.items()},
                                   "final_test_accuracy": o.stat(final_accuracy)} for name, o in outcomes.items()},
               "numbers": analysis.numbers}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    (out / SECTION_FILE).write_text(section(number, claim, scale, analysis, command, prefix=""))
    (out / "section.md").write_text(section(number, claim, scale, analysis, command,
                                            prefix=os.path.relpath(out, md_dir) + "/"))


def headline(path: Path) -> str:
    """The end-to-end benchmark's time-to-accuracy table (``path``: its ``e2e.md``), cited, with the ratio
    of ef-blocksgdm's (ps) time to Horovod's for each link and rank count, against the paper's 0.54x."""
    intro = ("## Headline: time to accuracy (the paper: SGDM's accuracy in 46% less wall-clock)\n\n"
             "Measured by the end-to-end benchmark on emulated links, not by this driver: real training of "
             "`horovod` (stock `hvd.DistributedOptimizer`) and `ef-blocksgdm` interleaved in one job per link "
             "rate and rank count (`.venv/bin/python benchmarks/netem/run_train.py`, as root; its setup and "
             "discussion are in `BENCHMARKS.md`). Cited from its result file `" + str(E2E_REPORT) + "`.")
    if not path.is_file():
        return intro + " That file is not there yet: run the benchmark first.\n"
    text = path.read_text()
    first = next((t for t in text.split("\n\n") if "time to" in t), "")
    ratios = time_to_accuracy_ratios([line for line in first.splitlines() if line.startswith("|")])
    if not ratios:
        return f"{intro}\n\n{first.strip()}\n\n**Verdict**: not measurable: the table has no horovod and ef-blocksgdm-ps rows.\n"
    parts = [f"{where}: " + ("Horovod never reached the target" if r is None else
                             "ours never reached the target (disagrees)" if r == math.inf else
                             f"{r:.2f}x ({'agrees' if r <= 0.54 else 'disagrees'})") for where, r in ratios.items()]
    words = {None if r is None else r <= 0.54 for r in ratios.values()}
    word = "agrees" if words == {True} else "disagrees" if words == {False} else "mixed"
    return (f"{intro}\n\n{first.strip()}\n\n**Verdict: {word}.** ef-blocksgdm (ps) time to the target over Horovod's, "
            f"where the paper has 0.54x: " + "; ".join(parts) + ".\n")


def time_to_accuracy_ratios(rows: Sequence[str]) -> Dict[str, Optional[float]]:
    """"RATE, M ranks" -> ef-blocksgdm-ps's time to the target over horovod's, from the benchmark's
    markdown table rows (header first); inf where only Horovod reached it, None where Horovod did not.
    Empty when the table has no such columns."""
    if not rows:
        return {}
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    if not {"rate", "ranks", "method"} <= set(head) or not any(h.startswith("time to") for h in head):
        return {}
    col = {k: head.index(k) for k in ("rate", "ranks", "method")}
    t = next(i for i, h in enumerate(head) if h.startswith("time to"))
    times: Dict[str, Dict[str, Optional[float]]] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) != len(head):
            continue
        value = re.match(r"([0-9.]+)\s*(ms|s)\b", cells[t])
        seconds = None if value is None else float(value.group(1)) / (1000 if value.group(2) == "ms" else 1)
        times.setdefault(f"{cells[col['rate']]}, {cells[col['ranks']]} ranks", {})[cells[col["method"]]] = seconds
    ratios = {}
    for where, by_method in times.items():
        if "horovod" in by_method and "ef-blocksgdm-ps" in by_method:
            hv, ours = by_method["horovod"], by_method["ef-blocksgdm-ps"]
            # Horovod never reaching the target leaves nothing to compare; ours never reaching it is infinitely slower
            ratios[where] = None if not hv else math.inf if ours is None else ours / hv
    return ratios


def write_experiments_md(path: Path, results: Path, claims: Sequence, command_of, e2e: Path) -> Path:
    """Write EXPERIMENTS.md at ``path``: the headline (from the end-to-end benchmark's ``e2e`` report),
    a verdict table and each claim's section (or the command that makes it, when its results are not
    in ``results``). ``command_of(claim)`` is the command that makes a claim's results."""
    verdicts, sections = [], []
    for number, claim in enumerate(claims, 1):
        part = results / claim.NAME / "section.md"
        summary = results / claim.NAME / SUMMARY_FILE
        if part.is_file() and summary.is_file():
            s = json.loads(summary.read_text())
            words = [p["verdict"] for p in s.get("parts", [])]
            tally = ", ".join(f"{words.count(w)} {w}" for w in (AGREES, NOT_MEASURABLE, DISAGREES) if w in words)
            verdicts.append([number, claim.TITLE, s["verdict"], tally or "—", f"`{s['command']}`"])
            sections.append(part.read_text())
        else:
            verdicts.append([number, claim.TITLE, "not run yet", "", f"`{command_of(claim)}`"])
            sections.append(f"## Claim {number}: {claim.TITLE}\n\nNot run yet: `{command_of(claim)}`.\n")
    text = "\n\n".join([
        "# Experiments: the authors' claims, measured\n\n"
        "Generated by `python -m hvd_distef.experiments` (`make experiments` runs every claim with `--quick`); "
        "do not edit by hand. Each claim comes from the authors' answer to their reviewers "
        "(`shared/seed/000_b5bde2ffd1bf61ad.txt`, line numbers as in that file). Every number is a mean ± "
        "sample standard deviation over seeds; a verdict \"agrees\" or \"disagrees\" needs the difference to "
        "exceed the seeds' noise (sqrt(std_a² + std_b²)), otherwise it is \"not measurable at this scale\" "
        "(`hvd_distef/experiments/verdict.py`). The quick scale (small data, small models, few epochs, 2-4 "
        "ranks on 2 cores) is far from the paper's (CIFAR-100 and ImageNet on 16 GPUs): the full setting is the "
        "same command without `--quick`, with `--data cifar100 --data-dir DIR` on a cluster (`--partition P`).",
        table(["claim", "what", "verdict", "its parts", "command"], verdicts),
        headline(e2e), *sections])
    path.write_text(text.rstrip() + "\n")
    return path
