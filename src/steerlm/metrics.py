"""Agreement metrics between predicted and human attribute levels (SPEC §5.1): the one place that defines them.

Used by `steerlm eval-apm` and by the evaluation report. Every function takes two equal-length sequences of
levels (floats allowed for predictions) and returns a float, or None when the metric is undefined (no pairs, or a
constant input for Spearman). `bootstrap_ci` gives any statistic an interval over prompts (the evaluation report's
and the steerability check's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def bootstrap_ci(rows: np.ndarray, stat: Callable[[np.ndarray], float | np.ndarray], n: int, confidence: float,
                 seed: int) -> tuple[float, float] | tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """Percentile interval at `confidence` of `stat` over `n` resamples (with replacement) of `rows`, one row per
    prompt (`scipy.stats.bootstrap`, seeded with `seed`): prompts are the unit of sampling, so all a prompt gives
    (both orders of a comparison, its answers at every level of a check) stays together. (low, high) as floats, or
    as arrays of `stat`'s shape when it returns an array (one interval per entry). None with < 2 rows or n = 0, or
    when the interval is not finite."""
    rows = np.asarray(rows, dtype=np.float64)
    if len(rows) < 2 or n <= 0:
        return None
    # Resampling the row indices keeps each row (a prompt) whole, whatever `stat` does with its columns.
    with np.errstate(divide="ignore", invalid="ignore"):
        res = stats.bootstrap((np.arange(len(rows)),), lambda i: stat(rows[i]), n_resamples=n, rng=seed,
                              confidence_level=confidence, method="percentile", vectorized=False)  # fmt: skip
    lo, hi = res.confidence_interval
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (np.asarray(lo), np.asarray(hi))
