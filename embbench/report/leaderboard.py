"""The leaderboard of each panel: scheme labels ranked by the normalised area under their metric-against-log-size
curve over the panel's swept budgets, computed per seed, with its mean and confidence interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from embbench.report.columns import METRIC_LABELS, PANEL_KEYS
from embbench.report.statistics import CONFIDENCE, mean_ci, seed_values

LEADERBOARD_COLUMNS = [
    *PANEL_KEYS, "metric", "rank", "scheme_label", "seeds", "budgets", "area_mean", "area_low", "area_high",
]
LEFT_OUT_COLUMNS = [*PANEL_KEYS, "metric", "scheme_label", "reason"]


@dataclass(frozen=True)
class Leaderboard:
    """``ranked``: one row per ranked scheme label (``LEADERBOARD_COLUMNS``, best first within a panel and
    metric); ``left_out``: the labels not ranked and why (``LEFT_OUT_COLUMNS``)."""

    ranked: pd.DataFrame
    left_out: pd.DataFrame


def normalised_area(sizes: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid area under ``values`` against log10(``sizes``), divided by the log-size span.

    That is the curve's mean height, in the metric's units, whatever the span. A single size (span 0) gives
    the mean of ``values``.
    """
    size = np.asarray(sizes, dtype=float)
    value = np.asarray(values, dtype=float)
    if size.shape != value.shape or size.ndim != 1 or len(size) == 0:
        raise ValueError(f"sizes and values must be 1-d, non-empty and of equal length, got {size.shape} and "
                         f"{value.shape}")
    if not (np.all(np.isfinite(size)) and np.all(size > 0) and np.all(np.isfinite(value))):
        raise ValueError("sizes must be positive and finite, values finite")
    order = np.argsort(size, kind="stable")
    log_size, value = np.log10(size[order]), value[order]
    span = float(log_size[-1] - log_size[0])
    if span == 0.0:
        return float(value.mean())
    area = float(np.sum(np.diff(log_size) * (value[1:] + value[:-1]) / 2.0))
    return area / span


def swept_budgets(panel: pd.DataFrame) -> list[str]:
    """The budgets a panel's curves are compared over: those two or more scheme labels ran (a budget only one
    label ran, like the full table's ``1``, is no sweep); all budgets where the panel has one label. In size
    order (``budget_bytes``)."""
    labels = panel.groupby("budget", sort=False)["scheme_label"].nunique()
    chosen = labels.index if panel["scheme_label"].nunique() == 1 else labels.index[labels >= 2]
    sizes = panel.groupby("budget", sort=False)["budget_bytes"].mean()
    return sorted(chosen, key=lambda budget: (sizes[budget], budget))


def leaderboard(frame: pd.DataFrame, confidence: float = CONFIDENCE) -> Leaderboard:
    """Per panel and metric (of ``METRIC_LABELS``), each scheme label's :func:`normalised_area` over the panel's
    :func:`swept_budgets`, at the sizes its cells stored, per seed; mean and Student-t interval over the seeds
    that ran every swept budget. Labels that missed a swept budget, or have no seed that ran all, are left out."""
    ranked, left_out = [], []
    for metric in METRIC_LABELS:
        values = seed_values(frame, metric)
        for keys, panel in values.groupby(PANEL_KEYS, sort=True, dropna=False):
            budgets = swept_budgets(panel)
            if not budgets:
                left_out += [[*keys, metric, label, "no budget of the panel was run by two or more schemes"]
                             for label in sorted(panel["scheme_label"].unique())]
                continue
            rows = []
            for label, cells in panel.groupby("scheme_label", sort=True):
                missing = [budget for budget in budgets if budget not in set(cells["budget"])]
                if missing:
                    ran = len(budgets) - len(missing)
                    left_out.append([*keys, metric, label, f"ran {ran} of the {len(budgets)} swept budgets "
                                                           f"(not {', '.join(missing)})"])
                    continue
                swept = cells[cells["budget"].isin(budgets)]
                areas = [
                    normalised_area(seed_cells["size_bytes"], seed_cells[metric])
                    for _, seed_cells in swept.groupby("seed", sort=True)
                    if len(seed_cells) == len(budgets) and seed_cells["size_bytes"].gt(0).all()
                ]
                if not areas:
                    left_out.append([*keys, metric, label, "no seed ran every swept budget with a stored size"])
                    continue
                rows.append([*keys, metric, 0, label, len(areas), len(budgets), *mean_ci(areas, confidence)])
            rows.sort(key=lambda row: (-row[-3], row[len(PANEL_KEYS) + 2]))
            for rank, row in enumerate(rows, start=1):
                row[len(PANEL_KEYS) + 1] = rank
            ranked += rows
    return Leaderboard(pd.DataFrame(ranked, columns=LEADERBOARD_COLUMNS),
                       pd.DataFrame(left_out, columns=LEFT_OUT_COLUMNS))
