"""Verdicts on paired differences (SPEC §5b): one rule for every claim, so that no claim is judged
more kindly than another, and one that a rerun on another machine should repeat (issue 21).

Both contenders of a comparison run the same seeds, and a seed gives them the same initial weights
and the same data order; the verdict is on the per-seed differences d_s = A_s − B_s (n seeds), with
their mean d̄, sample standard deviation s and t = t(0.975, n−1):

- the 95% interval of the mean difference, d̄ ± t·s/√n;
- the range a rerun's mean difference falls in with 95% probability, d̄ ± t·s·√(2/n) (a rerun is an
  independent sample of n seeds: on another machine the per-seed figures differ, their distribution
  does not);
- **agrees** when that rerun range lies above 0 (the claim's direction: "A is higher than B"),
  **disagrees** when it lies below 0, otherwise **no difference resolved**. The rerun range, not the
  95% interval, decides: a difference whose interval excludes 0 but whose rerun range does not is one
  a rerun may well not find (issue 21 saw a verdict flip between AVX-512 and AVX2 torch kernels under
  the interval rule); the sentence says so;
- the smallest difference the setup detects: a true mean difference of (t·√2 + t(0.80, n−1))·s/√n
  is resolved by this rule in 80% of reruns. A difference resolved below it is flagged: a rerun may
  not resolve it.

A comparison with a constant (a threshold, a model's value) is the same test with B_s = c.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from scipy.stats import t as student_t

AGREES = "agrees"
DISAGREES = "disagrees"
UNRESOLVED = "no difference resolved"

#: the order a combined verdict looks for: any disagreement wins, then any unresolved part
_PRECEDENCE = (DISAGREES, UNRESOLVED, AGREES)
#: two-sided level of the intervals, and the power at which the smallest detectable difference is stated
CONFIDENCE = 0.95
POWER = 0.80


@dataclass(frozen=True)
class Verdict:
    word: str  #: AGREES, DISAGREES or UNRESOLVED
    why: str   #: the numbers behind it, in one sentence
    parts: Tuple["Verdict", ...] = ()  #: the verdicts it combines (``combine``)
    stats: Optional["Paired"] = None   #: the paired statistics it was judged on (None for ``combine``)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value).

    Raises ValueError for an empty sequence."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    return float(student_t.ppf(p, df))


@dataclass(frozen=True)
class Paired:
    """Statistics of per-seed differences (module docstring): ``n`` seeds, ``mean`` and ``sd`` of the
    differences, the 95% interval (``low``, ``high``), the smallest detectable difference ``mde`` and
    the half-width ``rerun`` of the interval a rerun's mean falls in."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    mde: float
    rerun: float

    @classmethod
    def of(cls, diffs: Sequence[float]) -> "Paired":
        """Raises ValueError for fewer than 2 differences (no interval without a spread)."""
        n = len(diffs)
        if n < 2:
            raise ValueError(f"a paired verdict needs at least 2 seeds, got {n}")
        mean, sd = mean_std(list(diffs))
        t = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1)
        se = sd / math.sqrt(n)
        return cls(n, mean, sd, mean - t * se, mean + t * se, (t * math.sqrt(2) + t_quantile(POWER, n - 1)) * se,
                   t * se * math.sqrt(2))

    @property
    def word(self) -> str:
        """Decided by the rerun range (module docstring)."""
        return AGREES if self.mean - self.rerun > 0 else DISAGREES if self.mean + self.rerun < 0 else UNRESOLVED


def paired_differences(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]]) -> Dict[int, float]:
    """seed -> a − b over the seeds both have a value for (None: a run that left no such value)."""
    return {s: a[s] - b[s] for s in sorted(a) if s in b and a[s] is not None and b[s] is not None}


def higher(a_name: str, a: Mapping[int, Optional[float]], b_name: str, b: Mapping[int, Optional[float]],
           what: str, scale: float = 100.0, unit: str = " points", digits: int = 2) -> Verdict:
    """Verdict on the claim "``a`` is higher than ``b``" from per-seed values (seed -> value; ``b`` may be
    a constant, the same for every seed). ``scale``, ``unit`` and ``digits`` only format the sentence
    (accuracies in [0, 1] are printed as percentage points)."""
    if not isinstance(b, Mapping):
        b = {s: b for s in a}
    diffs = paired_differences(a, b)
    p = Paired.of(list(diffs.values()))
    both = [s for s in diffs]
    mean_a = sum(a[s] for s in both) / len(both)
    mean_b = sum(b[s] for s in both) / len(both)

    def f(x: float, sign: bool = False) -> str:
        return f"{scale * x:{'+' if sign else ''}.{digits}f}"
    why = (f"{what}: {a_name} {f(mean_a)} vs {b_name} {f(mean_b)}; paired difference over {p.n} seeds "
           f"{f(p.mean, True)}{unit} (sd {f(p.sd)}), 95% interval [{f(p.low, True)}, {f(p.high, True)}]; "
           f"smallest detectable difference {f(p.mde)}{unit}; a rerun's mean difference: "
           f"{f(p.mean - p.rerun, True)} to {f(p.mean + p.rerun, True)}")
    if p.word == UNRESOLVED and (p.low > 0 or p.high < 0):
        why += " (the 95% interval excludes 0, a rerun's range does not: not claimed)"
    elif p.word != UNRESOLVED and abs(p.mean) < p.mde:
        why += " (resolved, but below the smallest detectable difference: a rerun may not resolve it)"
    return Verdict(p.word, why, stats=p)


def combine(parts: Iterable[Verdict]) -> Verdict:
    """One verdict for a claim made of several parts: it agrees only if every part agrees, disagrees
    if any part disagrees, and otherwise resolves no difference. Raises ValueError for no parts."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine needs at least one verdict")
    word = next(w for w in _PRECEDENCE if any(p.word == w for p in parts))
    return Verdict(word, "; ".join(f"{p.why} [{p.word}]" for p in parts), tuple(parts))
