"""The report's tables as blocks: one per panel (every scheme and budget with means, intervals and front marks),
its paired comparisons, leaderboard and published references, the cells that failed or were skipped, and the
commits, machines and library versions the cells ran with."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from embbench.report.columns import ENVIRONMENT_COLUMNS, FAILURE_COLUMNS, METRIC_LABELS, text_column
from embbench.report.document import Block, Heading, Table
from embbench.report.formatting import context_value, format_bytes, number_text

FRONT_MARK, OVERLAP_MARK = "★", "☆"


def panel_table(panel: pd.DataFrame) -> Table:
    """The panel's rows; classification tasks (no HR@10) show log-loss in its place."""
    ranking = bool(panel["test_hr10_mean"].notna().any())
    rows = []
    for row in panel.itertuples(index=False):
        size = format_bytes(row.size_bytes)
        if row.full_bytes > 0:  # False for NaN too
            size += f" ({100 * row.size_bytes / row.full_bytes:.3g}% of full)"
        rows.append([
            row.scheme_label, str(row.budget), size,
            _metric_cell(row, "test_auc"),
            _metric_cell(row, "test_hr10") if ranking else number_text(row.test_logloss, ".4f"),
            str(row.seeds), number_text(row.train_seconds, ".1f"),
            number_text(row.train_examples_per_second, ",.0f"), number_text(row.embedding_latency_ms, ".3g"),
        ])
    second = "test HR@10" if ranking else "test log-loss"
    header = ("scheme", "budget", "size", "test AUC", second, "seeds", "train s", "train ex/s", "latency ms")
    return Table(header, tuple(tuple(row) for row in rows), "lllrrrrrr")


def _metric_cell(row: Any, metric: str) -> str:
    """Mean ± interval half-width, marked when on the front or overlapping it."""
    mean, high = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_high")
    if math.isnan(mean):
        return "–"
    text = f"{mean:.4f}" if high == mean else f"{mean:.4f} ± {high - mean:.4f}"
    if getattr(row, f"{metric}_on_front"):
        text += f" {FRONT_MARK}"
    elif getattr(row, f"{metric}_overlaps_front"):
        text += f" {OVERLAP_MARK}"
    return text


def failure_table(cells: pd.DataFrame) -> Table:
    """The cells that did not run ok, with the last line of each one's error as the reason."""
    shown = pd.DataFrame({name: text_column(cells, name).fillna("–") for name in FAILURE_COLUMNS})
    shown["reason"] = text_column(cells, "error").map(_last_line)
    shown = shown.sort_values([name for name in FAILURE_COLUMNS if name != "status"], ignore_index=True)
    header = (*FAILURE_COLUMNS.values(), "reason")
    rows = tuple(tuple(str(cell) for cell in row) for row in shown.to_numpy().tolist())
    return Table(header, rows, "l" * len(header))


def _last_line(error: Any, limit: int = 200) -> str:
    if not isinstance(error, str):
        return "–"
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "–"
    return lines[-1] if len(lines[-1]) <= limit else lines[-1][: limit - 1] + "…"


def environment_blocks(frame: pd.DataFrame) -> list[Block]:
    """Where and with what the stored cells ran: commit, host, device, threads, table backend, versions."""
    if not len(frame):
        return []
    columns = list(ENVIRONMENT_COLUMNS)
    shown = pd.DataFrame({name: text_column(frame, name).fillna("–") for name in columns})
    machines = shown.groupby(columns, sort=True).size().reset_index(name="cells")
    blocks: list[Block] = [
        Heading(2, "Environment of the stored cells"),
        Table((*ENVIRONMENT_COLUMNS.values(), "cells"),
              tuple(tuple(str(value) for value in row) for row in machines.to_numpy().tolist()), "llllrlr"),
    ]
    versions: dict[str, int] = {}
    for environment in text_column(frame, "environment_json").dropna():
        try:
            recorded = json.loads(environment).get("versions") or {}
        except (ValueError, AttributeError):
            continue
        text = context_value(recorded)
        versions[text] = versions.get(text, 0) + 1
    if versions:
        blocks.append(Table(("library versions", "cells"),
                            tuple((text, str(count)) for text, count in sorted(versions.items())), "lr"))
    return blocks


SIGNIFICANT_MARK = "†"


def comparison_table(comparisons: pd.DataFrame) -> Table:
    """One panel's paired comparisons with the best scheme at each budget; † marks a significant difference."""
    rows = []
    for row in comparisons.itertuples(index=False):
        if row.significant is None or (isinstance(row.significant, float) and math.isnan(row.significant)):
            difference, p_value = f"n/a ({row.pairs} paired seed{'s' if row.pairs != 1 else ''})", "n/a"
        else:
            difference = f"{row.difference_mean:+.4f} [{row.difference_low:+.4f}, {row.difference_high:+.4f}]"
            difference += f" {SIGNIFICANT_MARK}" if row.significant else ""
            p_value = "< 0.0001" if row.p_value < 1e-4 else f"{row.p_value:.4f}"
        rows.append((METRIC_LABELS.get(row.metric, row.metric), str(row.budget), row.best, row.scheme_label,
                     str(row.pairs), difference, p_value))
    header = ("metric", "budget", "best", "scheme", "paired seeds", "difference to best [95% CI]", "p")
    return Table(header, tuple(rows), "lllllrr")


def leaderboard_table(ranked: pd.DataFrame) -> Table:
    """One panel's leaderboard: rank, scheme, normalised area ± interval half-width, seeds and budgets."""
    rows = []
    for row in ranked.itertuples(index=False):
        area = f"{row.area_mean:.4f}" if row.area_high == row.area_mean else (
            f"{row.area_mean:.4f} ± {row.area_high - row.area_mean:.4f}")
        rows.append((METRIC_LABELS.get(row.metric, row.metric), str(row.rank), row.scheme_label, area,
                     str(row.seeds), str(row.budgets)))
    header = ("metric", "rank", "scheme", "normalised area", "seeds", "budgets")
    return Table(header, tuple(rows), "lrlrrr")


def left_out_table(left_out: pd.DataFrame) -> Table:
    """The scheme labels a panel's leaderboard does not rank, and why."""
    rows = tuple((METRIC_LABELS.get(row.metric, row.metric), row.scheme_label, row.reason)
                 for row in left_out.itertuples(index=False))
    return Table(("metric", "scheme", "not ranked because"), rows, "lll")


def reference_table(comparisons: pd.DataFrame) -> Table:
    """One panel's published reference points beside our measurement of the same method, budget and metric."""
    rows = []
    for row in comparisons.itertuples(index=False):
        if row.ours_seeds == 0:
            ours, difference = "not run", "–"
        else:
            ours = f"{row.ours_mean:.4f}" if row.ours_high == row.ours_mean else (
                f"{row.ours_mean:.4f} ± {row.ours_high - row.ours_mean:.4f}")
            ours += f" ({row.ours_seeds} seed{'s' if row.ours_seeds != 1 else ''})"
            difference = f"{row.difference:+.4f}"
        source = f"{row.source} ({row.url})" if row.url else row.source
        rows.append((row.scheme_label, str(row.budget), format_bytes(row.x_bytes), row.metric, f"{row.value:.4g}",
                     ours, difference, source, row.note or "–"))
    header = ("scheme", "budget", "at size", "metric", "reference", "embbench", "difference", "source", "note")
    return Table(header, tuple(rows), "lllllrrll")
