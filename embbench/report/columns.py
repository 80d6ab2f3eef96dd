"""The result columns the report groups, averages and shows, with their labels, in one place; and reading a
column of a results frame as text or as numbers."""

from __future__ import annotations

import math

import pandas as pd

from embbench.run.record import GROUP_KEYS

# A summary row per group (the record's grouping columns); a panel (one table, one set of figures) per panel key.
PANEL_KEYS = [key for key in GROUP_KEYS if key not in ("scheme_label", "budget")]
# Quality metrics: a mean and confidence interval over seeds, a Pareto front, a figure each.
METRIC_LABELS = {"test_auc": "test AUC", "test_hr10": "test HR@10"}
# Averaged over seeds without an interval.
NUMERIC_MEANS = (
    "size_bytes", "full_bytes", "train_seconds", "embedding_latency_ms", "train_examples_per_second", "test_logloss",
)
# The cost axes of the figures; less is better on both.
SIZE_AXIS_LABEL = "embedding size (bytes, log scale)"
X_AXES = {
    "size_bytes": SIZE_AXIS_LABEL,
    "embedding_latency_ms": "embedding inference latency, all features, largest batch (ms, log scale)",
}
X_AXIS_NAMES = {"size_bytes": "size", "embedding_latency_ms": "latency"}  # in figure captions
# The tables of the cells that did not run and of where the cells ran: column -> header.
FAILURE_COLUMNS = {
    "suite": "suite", "dataset": "dataset", "model": "model", "device": "device", "scheme_label": "scheme",
    "budget": "budget", "seed": "seed", "status": "status",
}
ENVIRONMENT_COLUMNS = {
    "git_commit": "git commit", "host": "host", "device": "device", "device_name": "device name",
    "threads": "threads", "table_backend": "table backend",
}


def summary_columns() -> list[str]:
    """The columns of ``summarize_results``, in order."""
    sizes = ["size_bytes", "full_bytes"]
    columns = [*GROUP_KEYS, "scheme", *sizes, "seeds"]
    columns += [f"{metric}_{part}" for metric in METRIC_LABELS for part in ("mean", "low", "high")]
    columns += [name for name in NUMERIC_MEANS if name not in sizes]
    columns += [f"{metric}_{flag}" for metric in METRIC_LABELS
                for flag in ("on_front", "overlaps_front", "front_best")]
    return columns


def text_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as strings (missing values stay missing); an all-missing column where the frame lacks it."""
    if name not in frame:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    column = frame[name]
    return column.where(column.isna(), column.astype(str))


def number_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as floats (unparseable values become NaN); an all-NaN column where the frame lacks it."""
    if name not in frame:
        return pd.Series(math.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[name], errors="coerce").astype(float)
