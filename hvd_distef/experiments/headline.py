"""EXPERIMENTS.md's headline: the paper's time-to-accuracy claim (SGDM's accuracy in 46% less wall-clock),
cited from the newest end-to-end results file of benchmarks/netem/run_train.py (``benchmarks/results/
e2e*.json``, written by ``benchmarks/common.write_results``; the newest by the date in its ``meta``), not
measured by the experiments driver and never a hard-wired file name."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

#: the paper's figure: dist-EF-BlockSGDM reaches SGDM's accuracy in 54% of its time
PAPER_RATIO = 0.54
OURS, BASELINE = "ef-blocksgdm-ps", "horovod"


def newest(results: Path) -> Optional[Tuple[Path, dict]]:
    """The end-to-end results file with the latest ``meta.date`` in ``results`` (and its contents), or
    None where there is none."""
    found = []
    for path in sorted(results.glob("e2e*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "date" in data.get("meta", {}) and "records" in data.get("results", {}):
            found.append((data["meta"]["date"], path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda f: f[0])
    return path, data


def time_to(record: dict, target: float) -> Optional[float]:
    """Training time (s) at the first evaluation with test accuracy >= target; None if never."""
    return next((p["train_time_s"] for p in record["curve"] if p["test_accuracy"] >= target), None)


def ratios(data: dict) -> Dict[Tuple[str, int], Optional[float]]:
    """(rate, ranks) -> our time to the target over stock Horovod's: inf where only Horovod reached it,
    None where Horovod did not (nothing to compare)."""
    res, out = data["results"], {}
    for c in res["clusters"]:
        by_label = {r["label"]: r for r in res["records"] if r["rate"] == c["rate"] and r["ranks"] == c["ranks"]}
        if OURS in by_label and BASELINE in by_label:
            base, ours = time_to(by_label[BASELINE], res["target"]), time_to(by_label[OURS], res["target"])
            out[(c["rate"], c["ranks"])] = None if not base else math.inf if ours is None else ours / base
    return out


def headline(results: Path, root: Path) -> str:
    """The headline section (markdown), from the newest end-to-end results file under ``results``
    (paths printed relative to ``root``)."""
    intro = ("## Headline: time to accuracy (the paper: SGDM's accuracy in 46% less wall-clock)\n\n"
             "Measured by the end-to-end benchmark on emulated cluster links, not by this driver: real training of "
             f"stock Horovod (`{BASELINE}`) and dist-EF-BlockSGDM (`{OURS}`), among other methods, interleaved in "
             "one job per link rate and rank count, every method launched alike (`benchmarks/netem/run_train.py`, "
             "as root; BENCHMARKS.md, \"End to end to a target accuracy\").")
    found = newest(results)
    if found is None:
        return intro + " No end-to-end results file yet: run `.venv/bin/python benchmarks/netem/run_train.py`.\n"
    path, data = found
    meta, res = data["meta"], data["results"]
    source = (f"Cited from the newest results file, `{path.relative_to(root) if root in path.parents else path}` "
              f"({meta['cpu']}, {meta['cores']} cores; {meta['date']}; commit `{meta['commit'][:12]}`; "
              f"`{meta['command']}`).")
    crowded = {(c["rate"], c["ranks"]) for c in res["clusters"] if c.get("oversubscribed")}
    rows: List[str] = []
    parts, words = [], set()
    for (rate, ranks), r in ratios(data).items():
        where = f"{rate}, M = {ranks}" + (" (more ranks than cores)" if (rate, ranks) in crowded else "")
        if r is None:
            text = "Horovod never reached the target"
        else:
            words.add(r <= PAPER_RATIO)
            text = ("ours never reached the target" if r == math.inf else f"{r:.2f}x") + \
                (" (agrees)" if r <= PAPER_RATIO else " (disagrees)")
        parts.append(f"{where}: {text}")
        rows.append(f"| {rate} | {ranks} | {'' if r is None or r == math.inf else f'{r:.2f}x'} | {text} |")
    if not parts:
        return f"{intro}\n\n{source}\n\n**Verdict**: not measurable: the file has no {BASELINE} and {OURS} runs.\n"
    word = "agrees" if words == {True} else "disagrees" if words == {False} else "mixed"
    table = "\n".join(["| rate | ranks | time to target, ours / Horovod's | verdict |", "|---|---|---|---|", *rows])
    return (f"{intro}\n\n{source} Target: {100 * res['target']:g}% test accuracy.\n\n{table}\n\n**Verdict: {word}.** "
            f"`{OURS}`'s time to the target over stock Horovod's, where the paper has {PAPER_RATIO}x: "
            + "; ".join(parts) + ".\n")
