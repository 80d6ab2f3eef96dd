"""Pareto fronts of quality against size (smaller and better wins), and Student-t confidence intervals.

The t quantile is computed here with the standard library only (scipy is not a dependency): the exact
closed-form t distribution for integer degrees of freedom, inverted by bisection.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence

import numpy as np
import pandas as pd

# Beyond this many degrees of freedom the closed-form series gets long; a first-order expansion around the
# normal quantile is then accurate to ~1e-6.
EXACT_T_MAX_DF = 1000


def pareto_front(sizes: Sequence[float], scores: Sequence[float]) -> np.ndarray:
    """Bool mask of the points no other point dominates (size <= and score >=, one of them strictly).

    Identical points do not dominate each other, so duplicates of a front point are all on the front.
    Points with a NaN size or score are never on the front and dominate nothing. O(n log n).
    """
    size = np.asarray(sizes, dtype=float)
    score = np.asarray(scores, dtype=float)
    if size.shape != score.shape or size.ndim != 1:
        raise ValueError(f"sizes and scores must be 1-d of equal length, got {size.shape} and {score.shape}")
    on_front = np.zeros(len(size), dtype=bool)
    valid = np.flatnonzero(~(np.isnan(size) | np.isnan(score)))
    if len(valid) == 0:
        return on_front
    order = valid[np.argsort(size[valid], kind="stable")]
    sorted_size, sorted_score = size[order], score[order]
    best_so_far = np.maximum.accumulate(sorted_score)
    # Best score among points strictly smaller than each point, and among points no larger than it.
    first_of_size = np.searchsorted(sorted_size, sorted_size, side="left")
    last_of_size = np.searchsorted(sorted_size, sorted_size, side="right") - 1
    best_smaller = np.where(first_of_size > 0, best_so_far[np.maximum(first_of_size - 1, 0)], -np.inf)
    best_no_larger = best_so_far[last_of_size]
    on_front[order] = (sorted_score > best_smaller) & (sorted_score >= best_no_larger)
    return on_front


def front_with_uncertainty(
    size: Sequence[float], mean: Sequence[float], low: Sequence[float], high: Sequence[float]
) -> pd.DataFrame:
    """Front membership from the means, and which off-front points cannot be told apart from the front.

    Columns: ``on_front``; ``front_best``, the best mean among front points no larger than the point
    (equivalently among all points no larger); ``overlaps_front``, true for an off-front point whose interval
    [low, high] reaches ``front_best``. The index is ``size``'s if it is a Series, else 0..n-1.
    """
    size_values = np.asarray(size, dtype=float)
    mean_values = np.asarray(mean, dtype=float)
    low_values = np.asarray(low, dtype=float)
    high_values = np.asarray(high, dtype=float)
    if not (size_values.shape == mean_values.shape == low_values.shape == high_values.shape):
        raise ValueError("size, mean, low and high must have equal lengths")
    on_front = pareto_front(size_values, mean_values)
    front_best = np.full(len(size_values), np.nan)
    valid = np.flatnonzero(~(np.isnan(size_values) | np.isnan(mean_values)))
    if len(valid):
        order = valid[np.argsort(size_values[valid], kind="stable")]
        best_so_far = np.maximum.accumulate(mean_values[order])
        last_of_size = np.searchsorted(size_values[order], size_values[order], side="right") - 1
        front_best[order] = best_so_far[last_of_size]
    with np.errstate(invalid="ignore"):
        overlaps = ~on_front & (high_values >= front_best)
    index = size.index if isinstance(size, pd.Series) else None
    columns = {"on_front": on_front, "front_best": front_best, "overlaps_front": overlaps}
    return pd.DataFrame(columns, index=index)


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` >= 1, by the closed-form finite series in cos(theta)."""
    theta = math.atan(t / math.sqrt(df))
    cos_sq = math.cos(theta) ** 2
    if df % 2 == 1:
        # (2/pi) * (theta + sin(theta) * cos(theta) * sum_{j=0}^{(df-3)/2} c_j cos^{2j}(theta)),
        # c_0 = 1, c_j = c_{j-1} * 2j / (2j + 1).
        term, total = 1.0, 0.0
        if df > 1:
            total = 1.0
            for j in range(1, (df - 1) // 2):
                term *= cos_sq * (2 * j) / (2 * j + 1)
                total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    # sin(theta) * sum_{j=0}^{df/2-1} c_j cos^{2j}(theta), c_0 = 1, c_j = c_{j-1} * (2j - 1) / (2j).
    term, total = 1.0, 1.0
    for j in range(1, df // 2):
        term *= cos_sq * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


@functools.lru_cache(maxsize=256)
def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student t critical value: P(|T| < t) = ``confidence`` with ``df`` degrees of freedom."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    if df > EXACT_T_MAX_DF:
        return z + (z**3 + z) / (4.0 * df)
    low, high = 0.0, max(z, 1.0)
    while _t_central_probability(high, df) < confidence:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _t_central_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval (mean, low, high) of ``values``, ignoring NaNs.

    One value gives (v, v, v); none gives NaNs.
    """
    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(data) == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if len(data) == 1:
        return mean, mean, mean
    half_width = t_quantile(confidence, len(data) - 1) * float(data.std(ddof=1)) / math.sqrt(len(data))
    return mean, mean - half_width, mean + half_width
