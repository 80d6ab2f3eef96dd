"""The report's tables as blocks: one per panel (every scheme and budget with means, intervals and front marks),
the cells that failed or were skipped, and the commits, machines and library versions the cells ran with."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from embbench.report.columns import ENVIRONMENT_COLUMNS, FAILURE_COLUMNS, text_column
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
