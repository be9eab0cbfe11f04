"""Agreement metrics between predicted and human attribute levels (SPEC §5.1): the one place that defines them.

Used by `steerlm eval-apm` and by the evaluation report. Every function takes two equal-length sequences of
levels (floats allowed for predictions) and returns a float, or None when the metric is undefined (no pairs, or a
constant input for Spearman).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _pair(pred: Sequence[float], gold: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(pred) != len(gold):
        raise ValueError(f"predictions ({len(pred)}) and labels ({len(gold)}) differ in length")
    return np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)


def mae(pred: Sequence[float], gold: Sequence[float]) -> float | None:
    """Mean absolute error in levels (on the values as given: float predictions stay float)."""
    p, g = _pair(pred, gold)
    return float(np.abs(p - g).mean()) if len(p) else None


def exact_acc(pred: Sequence[float], gold: Sequence[float]) -> float | None:
    """Fraction of predictions that, rounded to a level, equal the human level."""
    p, g = _pair(pred, gold)
    return float((np.rint(p) == np.rint(g)).mean()) if len(p) else None


def within1(pred: Sequence[float], gold: Sequence[float]) -> float | None:
    """Fraction of predictions that, rounded to a level, are at most one level from the human level."""
    p, g = _pair(pred, gold)
    return float((np.abs(np.rint(p) - np.rint(g)) <= 1).mean()) if len(p) else None


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float | None:
    """Spearman rank correlation (scipy, ties averaged); None when either side is constant or < 2 pairs."""
    p, g = _pair(pred, gold)
    if len(p) < 2 or np.all(p == p[0]) or np.all(g == g[0]):
        return None
    rho = stats.spearmanr(p, g).statistic
    return None if rho is None or math.isnan(rho) else float(rho)


ALL = {"mae": mae, "exact": exact_acc, "within1": within1, "spearman": spearman}
"""Name -> function, in the order reports print them."""


def summarize(pred: Sequence[float], gold: Sequence[float]) -> dict[str, float | None]:
    """Every metric of `ALL` for one attribute, plus the number of pairs `n`."""
    return {"n": len(gold), **{name: fn(pred, gold) for name, fn in ALL.items()}}
