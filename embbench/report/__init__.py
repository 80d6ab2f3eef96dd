"""The report, in Markdown and as one self-contained HTML page: per panel (suite, dataset, model, device) a table
and Pareto plots, then the cells that did not run, the environment and the suite configuration."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from embbench.errors import EmbbenchError
from embbench.paths import unwritable_reason
from embbench.report.columns import METRIC_LABELS, PANEL_KEYS, X_AXIS_NAMES, text_column
from embbench.report.configuration import configuration_blocks, shipped_suite_sources, suite_configurations
from embbench.report.document import (
    Block,
    FigureLink,
    Heading,
    KeyValues,
    Paragraph,
    render_html,
    render_markdown,
    slug,
)
from embbench.report.figures import pareto_figure, plot_pareto, scheme_styles
from embbench.report.formatting import context_value, format_bytes
from embbench.report.pareto import front_with_uncertainty, pareto_front
from embbench.report.sections import FRONT_MARK, OVERLAP_MARK, environment_blocks, failure_table, panel_table
from embbench.report.statistics import CONFIDENCE, mean_ci, summarize_results, t_quantile

__all__ = [
    "format_bytes", "front_with_uncertainty", "mean_ci", "pareto_figure", "pareto_front", "plot_pareto",
    "render_html", "render_markdown", "report_blocks", "scheme_styles", "shipped_suite_sources",
    "suite_configurations", "summarize_results", "t_quantile", "write_report",
]


def write_report(
    frame: pd.DataFrame,
    out_dir: Path,
    title: str = "embbench report",
    context: dict[str, Any] | None = None,
    suite_sources: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and the self-contained ``out_dir/report.html`` with figures under
    ``out_dir/figures/``; returns the Markdown report's path.

    ``suite_sources`` maps a suite name to the text of its suite file, shown verbatim next to the configuration
    its stored cells actually ran with (``shipped_suite_sources`` reads the shipped ones).

    A folder that cannot be created or written is refused with one line before anything is written.
    """
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    try:
        reason = unwritable_reason(out_dir)
        if reason is not None:
            fix = "a folder" if reason.endswith("is a file") else "a folder you can write"
            raise EmbbenchError(f"cannot write the report to {out_dir}: {reason}; pass --out with {fix}")
        figures_dir.mkdir(parents=True, exist_ok=True)
        blocks = report_blocks(frame, figures_dir, title, context, suite_sources)
        path = out_dir / "report.md"
        path.write_text(render_markdown(blocks), encoding="utf-8")
        (out_dir / "report.html").write_text(render_html(blocks, out_dir, title), encoding="utf-8")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise EmbbenchError(
            f"cannot write the report to {out_dir}: {exc.strerror or exc}{where}; pass --out with a folder you can "
            "write"
        ) from None
    return path


#: longest figure file name (bytes); file systems allow 255, and long suite or label names must still fit
FIGURE_NAME_BYTES = 120


def figure_file_name(text: str) -> str:
    """A figure's file name: the slug of ``text``, cut and made unique by a hash where it would be too long."""
    name = slug(text)
    if len(name.encode()) > FIGURE_NAME_BYTES:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        name = name.encode()[: FIGURE_NAME_BYTES - len(digest) - 1].decode(errors="ignore") + "-" + digest
    return name + ".png"


def report_blocks(
    frame: pd.DataFrame,
    figures_dir: Path,
    title: str = "embbench report",
    context: dict[str, Any] | None = None,
    suite_sources: Mapping[str, str] | None = None,
) -> list[Block]:
    """The report's content (drawing its figures into ``figures_dir``), for ``render_markdown``/``render_html``."""
    figures_dir = Path(figures_dir)
    summary = summarize_results(frame)
    status = text_column(frame, "status") if len(frame) else pd.Series(dtype=object)
    counts = {name: int((status == name).sum()) for name in ("ok", "failed", "skipped")}

    details = dict(context or {})
    details.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    details["cells"] = (
        f"{len(frame)} ({counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped)"
    )
    blocks: list[Block] = [Heading(1, title)]
    blocks.append(KeyValues(tuple((str(key), context_value(value)) for key, value in details.items())))

    if summary.empty:
        blocks.append(Paragraph("No successful cells: there is nothing to summarise or plot."))
    else:
        blocks.append(Paragraph(
            f"Values are means over seeds ± the half-width of a {CONFIDENCE:.0%} Student-t confidence "
            f"interval. {FRONT_MARK} marks a point on the Pareto front of mean quality against size (smaller "
            f"and better wins); {OVERLAP_MARK} a point off the front whose interval reaches the front's best "
            "score at its size. Latency is the embedding look-up of a user and an item batch at the largest "
            "measured batch size (median ms). See docs/reporting.md."
        ))
        labels = sorted(summary["scheme_label"].unique())
        several_suites = summary["suite"].nunique() > 1
        for (suite, dataset, model, device), panel in summary.groupby(PANEL_KEYS, sort=True, dropna=False):
            heading = f"{dataset} · {model} · {device}"
            blocks += [Heading(2, f"{f'{suite} · ' if several_suites else ''}{heading}"), panel_table(panel)]
            for x, x_label in X_AXIS_NAMES.items():
                for metric, metric_label in METRIC_LABELS.items():
                    if (panel[f"{metric}_mean"].notna() & panel[x].notna()).any():
                        suffix = "" if x == "size_bytes" else "__latency"
                        name = figure_file_name(f"{suite}__{dataset}__{model}__{device}__{metric}{suffix}")
                        plot_pareto(summary, dataset, model, device, metric, figures_dir / name, suite=suite,
                                    labels=labels, x=x)
                        blocks.append(FigureLink(f"{metric_label} vs {x_label}: {heading}",
                                                 f"{figures_dir.name}/{name}"))

    not_ok = frame[status != "ok"] if len(frame) else frame
    if len(not_ok):
        blocks += [Heading(2, "Failed and skipped cells"), failure_table(not_ok)]
    blocks += environment_blocks(frame)
    blocks += configuration_blocks(frame, suite_sources or {})
    return blocks
