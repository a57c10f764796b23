"""Verdicts from seed statistics: does the measured difference go the claim's way, beyond the spread
of the seeds? One rule for every claim, so that a claim is never judged more kindly than another."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Tuple

AGREES = "agrees"
DISAGREES = "disagrees"
NOT_MEASURABLE = "not measurable at this scale"

#: the order a combined verdict looks for: any disagreement wins, then any doubt
_PRECEDENCE = (DISAGREES, NOT_MEASURABLE, AGREES)


@dataclass(frozen=True)
class Verdict:
    word: str  #: AGREES, DISAGREES or NOT_MEASURABLE
    why: str   #: the numbers behind it, in one sentence
    parts: Tuple["Verdict", ...] = ()  #: the verdicts it combines (``combine``)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value).

    Raises ValueError for an empty sequence."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def difference(a: Tuple[float, float], b: Tuple[float, float]) -> Tuple[float, float]:
    """(mean, std) of a − b for independent (mean, std) pairs: the std is sqrt(std_a² + std_b²)."""
    return a[0] - b[0], math.hypot(a[1], b[1])


def better(a_name: str, a: Tuple[float, float], b_name: str, b: Tuple[float, float], what: str,
           scale: float = 100.0, unit: str = " points") -> Verdict:
    """Verdict on the claim "``a`` is higher than ``b``", both (mean, std) over seeds.

    The difference of the means counts when it exceeds the noise sqrt(std_a² + std_b²): above it the
    claim agrees, below minus it the claim disagrees, in between (a tie within the seeds' spread) it
    is not measurable at this scale. ``scale`` and ``unit`` only format the sentence (accuracies in
    [0, 1] are printed as percentage points)."""
    diff, noise = difference(a, b)
    numbers = (f"{what}: {a_name} {scale * a[0]:.2f} ± {scale * a[1]:.2f} vs {b_name} {scale * b[0]:.2f} ± "
               f"{scale * b[1]:.2f}, difference {scale * diff:+.2f}{unit} against a seed noise of {scale * noise:.2f}")
    if diff > noise:
        return Verdict(AGREES, numbers)
    if diff < -noise:
        return Verdict(DISAGREES, numbers)
    return Verdict(NOT_MEASURABLE, numbers + " (within the noise)")


def combine(parts: Iterable[Verdict]) -> Verdict:
    """One verdict for a claim made of several parts: it agrees only if every part agrees, disagrees
    if any part disagrees, and is otherwise not measurable. Raises ValueError for no parts."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine needs at least one verdict")
    word = next(w for w in _PRECEDENCE if any(p.word == w for p in parts))
    return Verdict(word, "; ".join(f"{p.why} [{p.word}]" for p in parts), tuple(parts))
