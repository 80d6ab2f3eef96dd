"""Summaries per group of result cells: means over seeds, Student-t confidence intervals and Pareto-front flags
(``summarize_results``); ``mean_ci`` and ``t_quantile`` for a single sample."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence

import numpy as np
import pandas as pd

from embbench.report.columns import (
    GROUP_KEYS,
    METRIC_LABELS,
    NUMERIC_MEANS,
    PANEL_KEYS,
    number_column,
    summary_columns,
    text_column,
)
from embbench.report.pareto import front_with_uncertainty

CONFIDENCE = 0.95
# Beyond this many degrees of freedom the closed-form series gets long; a first-order expansion around the
# normal quantile is then accurate to ~1e-6.
EXACT_T_MAX_DF = 1000


def summarize_results(frame: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per (suite, dataset, model, device, scheme_label, budget) over the ok cells.

    Columns (``summary_columns``): the group keys, ``scheme``, ``seeds`` (ok cells), the mean of each of
    ``NUMERIC_MEANS`` (``size_bytes``, ``train_seconds``, ...), and for each metric of ``METRIC_LABELS``
    ``<metric>_mean/_low/_high`` (Student-t interval over seeds, as ``mean_ci``) and
    ``<metric>_on_front/_overlaps_front/_front_best`` from ``front_with_uncertainty`` within each panel
    (suite, dataset, model, device).
    """
    columns = summary_columns()
    ok = frame[text_column(frame, "status") == "ok"] if len(frame) else frame
    if ok.empty:
        return pd.DataFrame(columns=columns)
    ok = ok.assign(
        **{name: number_column(ok, name) for name in (*NUMERIC_MEANS, *METRIC_LABELS)},
        **{name: text_column(ok, name) for name in [*GROUP_KEYS, "scheme"]},
    )
    grouped = ok.groupby(GROUP_KEYS, sort=True, dropna=False)
    summary = grouped.agg(
        scheme=("scheme", "first"), seeds=("seed", "size"), **{name: (name, "mean") for name in NUMERIC_MEANS}
    )
    for metric in METRIC_LABELS:
        stats = grouped[metric].agg(["mean", "std", "count"])
        count = stats["count"].to_numpy()
        # The t quantile depends only on the seed count, of which a report has a handful of distinct values.
        t_value = np.array([t_quantile(confidence, int(n) - 1) if n >= 2 else 0.0 for n in count])
        standard_error = stats["std"].to_numpy() / np.sqrt(np.maximum(count, 1))
        half_width = np.where(count >= 2, t_value * standard_error, 0.0)
        summary[f"{metric}_mean"] = stats["mean"]
        summary[f"{metric}_low"] = stats["mean"] - half_width
        summary[f"{metric}_high"] = stats["mean"] + half_width
    order = [*PANEL_KEYS, "scheme_label", "size_bytes"]
    summary = summary.reset_index().sort_values(order, ignore_index=True)
    for metric in METRIC_LABELS:
        flags = [
            front_with_uncertainty(
                panel["size_bytes"], panel[f"{metric}_mean"], panel[f"{metric}_low"], panel[f"{metric}_high"]
            )
            for _, panel in summary.groupby(PANEL_KEYS, sort=False, dropna=False)
        ]
        flags_frame = pd.concat(flags).reindex(summary.index)
        summary[f"{metric}_on_front"] = flags_frame["on_front"].astype(bool)
        summary[f"{metric}_overlaps_front"] = flags_frame["overlaps_front"].astype(bool)
        summary[f"{metric}_front_best"] = flags_frame["front_best"]
    return summary[columns]


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
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


# Computed with the standard library only (scipy is not a dependency): the exact closed-form t distribution for
# integer degrees of freedom, inverted by bisection.
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
