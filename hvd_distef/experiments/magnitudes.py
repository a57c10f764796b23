"""Claim 5 (rebuttal lines 42-43, the paper's Figure 1a): gradients of a deep network have similar
magnitudes within a layer, so a sign scale per layer loses less than one scale for the whole model.
Along training (``--log-gradient-stats``): per-tensor mean |g|, per-block δ_b of SPEC §2 and the
share of ||g||² kept by blocksign against one scale (whole-buffer δ), per seed."""
from __future__ import annotations

import math
from typing import Dict, List

from .report import Analysis, lines, pm, table
from .runs import Outcome, Scale, Setting, paper_schedule
from .verdict import combine, higher, mean_std

NAME = "magnitudes"
TITLE = "gradient magnitudes are similar within a layer"
LINES = "42–43"
CLAIM = ("gradients in a deep network typically have similar magnitudes in each layer (evidence: the paper's "
         "Figure 1(a), lines 181-182)")
#: δ of a vector of i.i.d. Gaussian entries (E|g|)²/E[g²]: magnitudes "similar" at least in that loose sense
GAUSSIAN_DELTA = 2 / math.pi


def schedule(scale: Scale) -> List[str]:
    return paper_schedule(scale, 4, 32, "--log-gradient-stats")


def settings(scale: Scale) -> List[Setting]:
    return [Setting.of("ef-blocksgdm", "ef-blocksgdm", schedule(scale), scale)]


def _run_mean(run: dict, key) -> float:
    """The mean over a run's epochs of ``key(grad_stats)``."""
    return sum(key(e["grad_stats"]) for e in run["epochs"]) / len(run["epochs"])


def median(values: List[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def analyse(outcomes: Dict[str, Outcome], scale: Scale, out) -> Analysis:
    o = outcomes["ef-blocksgdm"]
    ok = [r for r in o.runs.values() if not r["diverged"]]
    names = list(ok[0]["epochs"][0]["grad_stats"]["mean_abs"])
    layer_lines = {n: o.per_epoch(lambda e, n=n: e["grad_stats"]["mean_abs"][n]) for n in names}
    delta_lines = {f"δ_b {n}": o.per_epoch(lambda e, n=n: e["grad_stats"]["delta"][n]) for n in names}
    for key, label in (("delta_whole", "whole buffer (one scale)"), ("delta_blockwise", "blocksign, kept share")):
        delta_lines[label] = o.per_epoch(lambda e, key=key: e["grad_stats"][key])
    plots = [lines(layer_lines, "mean |g| of the tensor (log)", out / "mean_abs_per_layer.png", scale=1.0, log=True),
             lines(delta_lines, "δ (share of ||g||² kept by the sign scale)", out / "delta.png", scale=1.0)]

    def per_seed(key):
        return o.values(lambda r: None if r["diverged"] else _run_mean(r, key))
    keys = {k: (lambda g, k=k: g[k]) for k in ("delta_whole", "delta_blockwise", "delta_min")}
    keys["median δ_b"] = lambda g: median(list(g["delta"].values()))
    seeds = {k: per_seed(key) for k, key in keys.items()}
    stat = {k: mean_std([v for v in values.values() if v is not None]) for k, values in seeds.items()}
    spread = o.stat(lambda r: None if r["diverged"] else
                    _run_mean(r, lambda g: max(g["mean_abs"].values()) / min(g["mean_abs"].values())))
    last = {n: mean_std([r["epochs"][-1]["grad_stats"]["mean_abs"][n] for r in ok]) for n in names}
    last_delta = {n: mean_std([r["epochs"][-1]["grad_stats"]["delta"][n] for r in ok]) for n in names}
    t1 = table(["tensor", "mean abs g, last epoch", "δ_b, last epoch"],
               [[n, f"{last[n][0]:.3g} ± {last[n][1]:.2g}", pm(last_delta[n], 1, 3)] for n in names])
    t2 = table(["over training (mean of epochs)", "value"],
               [["δ of one scale for the whole buffer", pm(stat["delta_whole"], 1, 3)],
                ["blocksign's kept share of the squared norm, 1 − ‖C(g) − g‖²/‖g‖²", pm(stat["delta_blockwise"], 1, 3)],
                ["median per-tensor δ_b", pm(stat["median δ_b"], 1, 3)],
                ["SPEC §2's δ of blocksign, min_b δ_b", pm(stat["delta_min"], 1, 3)],
                ["largest / smallest per-tensor mean abs g", pm(spread, 1, 1)]])
    what = "share of the squared norm kept"
    verdict = combine([higher("blocksign", seeds["delta_blockwise"], "one scale", seeds["delta_whole"], what,
                              scale=1.0, unit="", digits=3),
                       higher("blocksign", seeds["delta_blockwise"], "i.i.d. Gaussian entries (2/π)", GAUSSIAN_DELTA,
                              what, scale=1.0, unit="", digits=3)])
    setup = (f"`ef-blocksgdm` on model `{scale.model}`, `{' '.join(schedule(scale))}`. Measured on rank 0's own "
             "gradient after the last backward pass of each epoch, one block per parameter tensor (the default "
             "blocks), averaged over the epochs of a seed: δ_b = ‖g_b‖₁²/(d_b·‖g_b‖²) is 1 when every entry of "
             "the block has the same magnitude and 2/π for Gaussian entries. blocksign keeps Σ_b δ_b·‖g_b‖² of "
             "‖g‖² (each block's δ_b weighted by its energy), never less than one scale's δ (Cauchy–Schwarz): the "
             "first part asks whether the gain is resolved (per-tensor scales help), the second whether the "
             "layers' magnitudes are \"similar\" at least as i.i.d. Gaussian entries are (kept share above 2/π), "
             "the claim read literally; both on the per-seed values.")
    return Analysis(setup, [t1, t2], plots, verdict, {"delta": stat, "mean_abs_spread": spread})
