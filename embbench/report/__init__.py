"""The report, in Markdown and as one self-contained HTML page: per panel (suite, dataset, model, device) a table,
published references, Pareto plots, paired comparisons and a leaderboard; then the cells that did not run, the
environment and the suite configuration."""

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
from embbench.report.leaderboard import leaderboard, normalised_area
from embbench.report.pareto import front_with_uncertainty, pareto_front
from embbench.report.references import reference_comparisons, suite_references
from embbench.report.sections import (
    FRONT_MARK,
    OVERLAP_MARK,
    SIGNIFICANT_MARK,
    comparison_table,
    environment_blocks,
    failure_table,
    leaderboard_table,
    left_out_table,
    panel_table,
    reference_table,
)
from embbench.report.statistics import (
    CONFIDENCE,
    mean_ci,
    paired_comparisons,
    paired_t_test,
    summarize_results,
    t_quantile,
)
from embbench.report.tuning import split_trials, tuning_blocks

__all__ = [
    "format_bytes", "front_with_uncertainty", "leaderboard", "mean_ci", "normalised_area", "paired_comparisons",
    "paired_t_test", "pareto_figure", "pareto_front", "plot_pareto", "reference_comparisons", "render_html",
    "render_markdown", "report_blocks", "scheme_styles", "shipped_suite_sources", "suite_configurations",
    "suite_references", "summarize_results", "t_quantile", "write_report",
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
    its stored cells actually ran with (``shipped_suite_sources`` reads the shipped ones); its ``[[references]]``
    (published numbers) are drawn on the plots and listed beside our measurements.

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


def _in_panel(rows: pd.DataFrame, keys: tuple[Any, ...]) -> pd.DataFrame:
    """The rows of one panel (values of ``PANEL_KEYS``) of a frame keyed by them."""
    if not len(rows):
        return rows
    selected = pd.Series(True, index=rows.index)
    for name, value in zip(PANEL_KEYS, keys, strict=True):
        selected &= rows[name] == value
    return rows[selected]


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
    frame, trials = split_trials(frame)  # tuning trials: validation only, shown in their own section
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

    references, unreadable = suite_references(suite_sources or {})
    if summary.empty:
        blocks.append(Paragraph("No successful cells: there is nothing to summarise or plot."))
    else:
        blocks.append(Paragraph(
            f"Values are means over seeds ± the half-width of a {CONFIDENCE:.0%} Student-t confidence "
            f"interval. {FRONT_MARK} marks a point on the Pareto front of mean quality against size (smaller "
            f"and better wins); {OVERLAP_MARK} a point off the front whose interval reaches the front's best "
            "score at its size. Latency is the embedding look-up of a user and an item batch at the largest "
            "measured batch size (median ms). Published reference points (a suite's [[references]]) are hollow "
            "markers in their scheme's colour. At each budget, every scheme is compared with the best one there "
            f"by a two-sided paired t-test over the seeds both ran (matched by seed); {SIGNIFICANT_MARK} marks a "
            f"difference significant at {CONFIDENCE:.0%} (p < {1 - CONFIDENCE:.2g}); with fewer than two paired "
            "seeds there is no test (n/a). The leaderboard ranks schemes by the area under their quality against "
            "log10(size) curve over the panel's swept budgets (trapezoids), divided by its log-size span (so it "
            "is the curve's mean height, in the metric's units), per seed, then its mean and interval. See "
            "docs/reporting.md."
        ))
        for name, error in unreadable.items():
            blocks.append(Paragraph(f"The references of suite '{name}' could not be read: {error}"))
        labels = sorted(summary["scheme_label"].unique())
        several_suites = summary["suite"].nunique() > 1
        published = reference_comparisons(frame, references)
        comparisons = paired_comparisons(frame)
        board = leaderboard(frame)
        for keys, panel in summary.groupby(PANEL_KEYS, sort=True, dropna=False):
            suite, dataset, model, device = keys
            heading = f"{dataset} · {model} · {device}"
            blocks += [Heading(2, f"{f'{suite} · ' if several_suites else ''}{heading}"), panel_table(panel)]
            panel_references = _in_panel(published, keys)
            panel_references = panel_references[panel_references["scheme_cells"] > 0]
            if len(panel_references):
                blocks += [Heading(3, f"Published references: {heading}"), reference_table(panel_references)]
                unswept = len(_in_panel(published, keys)) - len(panel_references)
                if unswept:
                    blocks.append(Paragraph(f"{unswept} more references of this suite are for schemes and budgets "
                                            "this panel did not run (e.g. under --quick) and are not shown."))
            for x, x_label in X_AXIS_NAMES.items():
                for metric, metric_label in METRIC_LABELS.items():
                    if (panel[f"{metric}_mean"].notna() & panel[x].notna()).any():
                        suffix = "" if x == "size_bytes" else "__latency"
                        name = figure_file_name(f"{suite}__{dataset}__{model}__{device}__{metric}{suffix}")
                        plot_pareto(summary, dataset, model, device, metric, figures_dir / name, suite=suite,
                                    labels=labels, x=x, references=panel_references)
                        blocks.append(FigureLink(f"{metric_label} vs {x_label}: {heading}",
                                                 f"{figures_dir.name}/{name}"))
            panel_comparisons = _in_panel(comparisons, keys)
            if len(panel_comparisons):
                blocks += [Heading(3, f"Paired comparison with the best scheme per budget: {heading}"),
                           comparison_table(panel_comparisons)]
            ranked, left_out = _in_panel(board.ranked, keys), _in_panel(board.left_out, keys)
            if len(ranked) or len(left_out):
                blocks.append(Heading(3, f"Leaderboard: {heading}"))
                blocks += [leaderboard_table(ranked)] if len(ranked) else []
                blocks += [left_out_table(left_out)] if len(left_out) else []

    blocks += tuning_blocks(frame, trials)
    not_ok = frame[status != "ok"] if len(frame) else frame
    if len(not_ok):
        blocks += [Heading(2, "Failed and skipped cells"), failure_table(not_ok)]
    blocks += environment_blocks(frame)
    blocks += configuration_blocks(frame, suite_sources or {})
    return blocks
