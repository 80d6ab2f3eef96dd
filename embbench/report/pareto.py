"""Pareto fronts of quality against cost (smaller and better wins), and which points off a front cannot be told
apart from it given their confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


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
