"""Summaries per group of result cells: means over seeds, Student-t confidence intervals and Pareto-front flags
(``summarize_results``); paired t-tests of each scheme against the best one per budget (``paired_comparisons``);
``mean_ci``, ``t_quantile`` and ``paired_t_test`` for a single sample."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of per-seed differences: their mean with its interval, t, the two-sided p-value."""

    pairs: int
    mean: float
    low: float
    high: float
    t: float
    p_value: float

    def significant(self, confidence: float = CONFIDENCE) -> bool:
        """Whether the mean difference differs from 0 at ``confidence`` (two-sided)."""
        return self.p_value < 1.0 - confidence


def paired_t_test(differences: Sequence[float], confidence: float = CONFIDENCE) -> PairedTest | None:
    """Student's paired t-test of ``differences`` (one per seed, NaNs ignored) against 0; None below 2 pairs.

    Equal non-zero differences (no spread) are significant (t = ±inf, p = 0); all-zero ones are not (p = 1).
    """
    data = np.asarray(differences, dtype=float)
    data = data[~np.isnan(data)]
    if len(data) < 2:
        return None
    mean, low, high = mean_ci(data, confidence)
    spread = float(data.std(ddof=1))
    if spread == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (spread / math.sqrt(len(data)))
    return PairedTest(len(data), mean, low, high, t, t_two_sided_p(t, len(data) - 1))


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return min(1.0, max(0.0, 1.0 - _t_central_probability(abs(t), df)))


#: per-seed values of one metric: one row per panel, scheme label, budget and seed
SEED_KEYS = [*PANEL_KEYS, "scheme_label", "budget", "seed"]


def seed_values(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The ok cells' ``metric`` per (panel, scheme label, budget, seed), with ``size_bytes`` and ``budget_bytes``.

    Rows of one seed that repeat (e.g. tuning trials) are averaged; cells without the metric are left out.
    """
    columns = [*SEED_KEYS, metric, "size_bytes", "budget_bytes"]
    if not len(frame) or metric not in frame:
        return pd.DataFrame(columns=columns)
    ok = frame[text_column(frame, "status") == "ok"]
    values = pd.DataFrame({
        **{name: text_column(ok, name) for name in SEED_KEYS if name != "seed"},
        "seed": number_column(ok, "seed"),
        **{name: number_column(ok, name) for name in (metric, "size_bytes", "budget_bytes")},
    })
    values = values[values[metric].notna() & values["seed"].notna()]
    if values.empty:
        return pd.DataFrame(columns=columns)
    return values.groupby(SEED_KEYS, sort=True, dropna=False).mean().reset_index()[columns]


COMPARISON_COLUMNS = [
    *PANEL_KEYS, "metric", "budget", "budget_bytes", "best", "scheme_label", "pairs", "difference_mean",
    "difference_low", "difference_high", "t", "p_value", "significant",
]


def paired_comparisons(frame: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per panel, metric and budget, each scheme label against the best one there (highest mean over seeds).

    The per-seed differences (scheme − best) of the seeds both ran (matched by ``seed``) are tested with
    :func:`paired_t_test`; with fewer than two such seeds ``pairs`` is their count and the test columns are NaN
    (``significant`` None). Budgets run by a single scheme label have no rows. Columns: ``COMPARISON_COLUMNS``,
rows in panel, metric and budget-size order.
    """
    rows = []
    for metric in METRIC_LABELS:
        values = seed_values(frame, metric)
        for keys, budget_cells in values.groupby([*PANEL_KEYS, "budget"], sort=False, dropna=False):
            by_label = budget_cells.pivot_table(index="seed", columns="scheme_label", values=metric)
            if by_label.shape[1] < 2:
                continue
            means = by_label.mean()
            best = sorted(means.index, key=lambda label: (-means[label], label))[0]
            for label in sorted(means.index):
                if label == best:
                    continue
                paired = (by_label[label] - by_label[best]).dropna()
                test = paired_t_test(paired.to_numpy(), confidence)
                rows.append([
                    *keys[:-1], metric, keys[-1], budget_cells["budget_bytes"].mean(), best, label, len(paired),
                    *((test.mean, test.low, test.high, test.t, test.p_value, test.significant(confidence))
                      if test else (math.nan,) * 5 + (None,)),
                ])
    comparisons = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    return comparisons.sort_values([*PANEL_KEYS, "metric", "budget_bytes", "budget", "scheme_label"],
                                   ignore_index=True, kind="stable")
