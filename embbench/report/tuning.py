"""The tuning section of a report: trial rows kept out of the panels, and per tuned point the spread of its
trials' validation metric, the chosen configuration, and the tuned cells beside the untuned (default) ones."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from embbench.report.columns import PANEL_KEYS, text_column
from embbench.report.document import Block, Heading, Paragraph, Table
from embbench.report.statistics import mean_ci

TUNED_SUFFIX = " (tuned)"


def split_trials(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows the panels show, the tuning trials): trials are selected on validation and never tested."""
    if "tuning" not in frame.columns or not len(frame):
        return frame, frame.iloc[0:0]
    trial = text_column(frame, "tuning") == "trial"
    return frame[~trial], frame[trial]


def _search(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        try:
            return json.loads(value)
        except ValueError:
            return {}
    return {}


def _values_text(values: dict[str, Any]) -> str:
    parts = []
    for name, value in sorted(values.items()):
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{name.removeprefix('params.')}={shown}")
    return ", ".join(parts) or "–"


def _mean_text(values: pd.Series) -> str:
    mean, low, high = mean_ci(pd.to_numeric(values, errors="coerce").tolist())
    if math.isnan(mean):
        return "–"
    if len(values.dropna()) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {(high - low) / 2:.4f}"


def tuning_blocks(frame: pd.DataFrame, trials: pd.DataFrame) -> list[Block]:
    """Per panel with tuned points: for each (scheme, budget), its trials (ok of all), the spread of their
    validation metric, the chosen trial and values, and the default and tuned cells' validation and test metric
    (means over seeds ± interval half-width)."""
    if not len(trials):
        return []
    blocks: list[Block] = [
        Heading(2, "Tuning"),
        Paragraph(
            "Each point (dataset, model, scheme, budget) had the same number of trials, proposed by a seeded Optuna "
            "TPE sampler (trial 0 is the default configuration where the search space holds it) on the first seed. "
            "A trial is trained and scored on validation only; the trial with the best validation metric is "
            "chosen, and its configuration is trained for every seed and tested (rows labelled '(tuned)'). The "
            "'default' columns are the suite's untuned cells. Trial rows are not in the tables and plots above."
        ),
    ]
    selected = frame[text_column(frame, "tuning") == "selected"] if "tuning" in frame.columns else frame.iloc[0:0]
    untuned = frame[frame["tuning"].isna()] if "tuning" in frame.columns else frame
    for keys, panel in trials.groupby(PANEL_KEYS, sort=True, dropna=False):
        rows = []
        for (scheme_label, budget), group in panel.groupby(["scheme_label", "budget"], sort=True):
            search = _search(group["tuning_json"].iloc[0])
            metric = search.get("metric", "auc")
            column = "val_" + metric.replace("@", "")
            ok = group[text_column(group, "status") == "ok"]
            values = pd.to_numeric(ok.get(column, pd.Series(dtype=float)), errors="coerce").dropna()
            spread = f"{values.min():.4f} / {values.median():.4f} / {values.max():.4f}" if len(values) else "–"

            def rows_of(cells: pd.DataFrame, label: str, budget: str = budget, keys: tuple = keys) -> pd.DataFrame:
                found = cells[(cells["scheme_label"] == label) & (cells["budget"] == budget)]
                for name, value in zip(PANEL_KEYS, keys, strict=True):
                    found = found[found[name] == value]
                return found[text_column(found, "status") == "ok"]

            tuned = rows_of(selected, scheme_label + TUNED_SUFFIX)
            default = rows_of(untuned, scheme_label)
            chosen = "–"
            if len(tuned):
                chosen_search = _search(tuned["tuning_json"].iloc[0])
                chosen = f"{int(tuned['trial'].iloc[0])}: {_values_text(chosen_search.get('values', {}))}"
            test_column = "test_" + metric.replace("@", "")
            rows.append((
                scheme_label, str(budget), f"{len(ok)}/{len(group)}", spread, chosen,
                _mean_text(default.get(column, pd.Series(dtype=float))),
                _mean_text(tuned.get(column, pd.Series(dtype=float))),
                _mean_text(default.get(test_column, pd.Series(dtype=float))),
                _mean_text(tuned.get(test_column, pd.Series(dtype=float))),
            ))
        suite, dataset, model, device = keys
        metric_name = _search(panel["tuning_json"].iloc[0]).get("metric", "auc")
        blocks.append(Heading(3, f"Tuning: {suite} · {dataset} · {model} · {device}"))
        header = ("scheme", "budget", "trials ok", f"trials' val {metric_name}: min / median / max",
                  "chosen trial: values", f"default val {metric_name}", f"tuned val {metric_name}",
                  f"default test {metric_name}", f"tuned test {metric_name}")
        blocks.append(Table(header, tuple(rows), "llrrlrrrr"))
    return blocks
