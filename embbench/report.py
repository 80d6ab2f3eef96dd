"""The Markdown report: per dataset × model × device, a table of every scheme and budget (mean and confidence
interval over seeds) and Pareto plots of test quality against embedding size; then the cells that did not run.

It reads only a results DataFrame (as the store returns it). Figures are drawn on a pyplot-free Agg canvas, so
making a report neither needs a display nor changes the backend of the caller's own plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from embbench.pareto import front_with_uncertainty, pareto_front, t_quantile

METRIC_LABELS = {"test_auc": "test AUC", "test_hr10": "test HR@10"}
GROUP_KEYS = ["suite", "dataset", "model", "device", "scheme_label", "budget"]
PANEL_KEYS = ["suite", "dataset", "model", "device"]
CONFIDENCE = 0.95
SIZE_AXIS_LABEL = "embedding size (bytes, log scale)"
X_AXES = {
    "size_bytes": SIZE_AXIS_LABEL,
    "embedding_latency_ms": "embedding inference latency, user + item, largest batch (ms, log scale)",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
FRONT_MARK, OVERLAP_MARK = "★", "☆"
NUMERIC_MEANS = ("size_bytes", "full_bytes", "train_seconds", "embedding_latency_ms", "train_examples_per_second")


def summarize_results(frame: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per (suite, dataset, model, device, scheme_label, budget) over the ok cells.

    Columns: the group keys, ``scheme``, ``size_bytes`` and ``full_bytes`` (means), ``seeds`` (ok cells),
    ``<metric>_mean/_low/_high`` (Student-t interval over seeds, as ``mean_ci``), ``train_seconds`` (mean),
    and ``<metric>_on_front/_overlaps_front/_front_best`` from ``front_with_uncertainty`` within each
    (suite, dataset, model, device), for each metric of ``METRIC_LABELS``.
    """
    columns = _summary_columns()
    ok = frame[_text(frame, "status") == "ok"] if len(frame) else frame
    if ok.empty:
        return pd.DataFrame(columns=columns)
    ok = ok.assign(
        **{name: _number(ok, name) for name in (*NUMERIC_MEANS, *METRIC_LABELS)},
        **{name: _text(ok, name) for name in [*GROUP_KEYS, "scheme"]},
    )
    grouped = ok.groupby(GROUP_KEYS, sort=True, dropna=False)
    summary = grouped.agg(
        scheme=("scheme", "first"),
        size_bytes=("size_bytes", "mean"),
        full_bytes=("full_bytes", "mean"),
        seeds=("seed", "size"),
        train_seconds=("train_seconds", "mean"),
        embedding_latency_ms=("embedding_latency_ms", "mean"),
        train_examples_per_second=("train_examples_per_second", "mean"),
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


def scheme_styles(labels: Sequence[str]) -> dict[str, tuple[tuple[float, float, float], str]]:
    """A colour and marker per scheme label, assigned over the sorted distinct labels.

    Pass every label of a report so the same scheme looks the same in all of its figures.
    """
    distinct = sorted(set(labels))
    colours = sns.color_palette("tab10" if len(distinct) <= 10 else "husl", len(distinct))
    return {label: (tuple(colours[i]), MARKERS[i % len(MARKERS)]) for i, label in enumerate(distinct)}


def pareto_figure(
    summary: pd.DataFrame,
    dataset: str,
    model: str,
    device: str,
    metric: str,
    *,
    suite: str | None = None,
    labels: Sequence[str] | None = None,
    x: str = "size_bytes",
) -> Figure:
    """The Pareto plot of one panel as a matplotlib Figure (not registered with pyplot; nothing to close).

    ``x`` is the cost axis: ``size_bytes`` (default) or ``embedding_latency_ms``; less is better on both.
    ``labels`` fixes the palette (default: every scheme label in ``summary``, not just this panel's).
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"metric must be one of {sorted(METRIC_LABELS)}, got '{metric}'")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {sorted(X_AXES)}, got '{x}'")
    selected = (summary["dataset"] == dataset) & (summary["model"] == model) & (summary["device"] == device)
    if suite is not None:
        selected &= summary["suite"] == suite
    panel = summary[selected & summary[f"{metric}_mean"].notna() & summary[x].notna()].sort_values(x)
    if panel.empty:
        raise ValueError(f"no summary rows with {metric} for {dataset} · {model} · {device}")
    styles = scheme_styles(summary["scheme_label"] if labels is None else labels)
    present = sorted(panel["scheme_label"].unique())
    missing = [label for label in present if label not in styles]
    if missing:
        raise ValueError(f"labels has no style for scheme labels {missing}")
    mean, low, high = (panel[f"{metric}_{part}"].to_numpy(dtype=float) for part in ("mean", "low", "high"))
    size = panel[x].to_numpy(dtype=float)

    with sns.axes_style("whitegrid"):
        figure = Figure(figsize=(8.0, 4.8))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
    # Each scheme's points joined in size order, so its own trade-off curve reads at a glance.
    sns.lineplot(
        data=panel, x=x, y=f"{metric}_mean", hue="scheme_label", style="scheme_label",
        hue_order=present, style_order=present, palette={label: styles[label][0] for label in present},
        markers={label: styles[label][1] for label in present}, dashes=False, estimator=None, sort=True,
        markersize=7, linewidth=1.0, legend=False, ax=axes, zorder=3,
    )
    axes.vlines(size, low, high, colors=[styles[label][0] for label in panel["scheme_label"]], linewidth=1.5,
                zorder=2)
    on_front = pareto_front(size, mean)
    front_size, front_score = size[on_front], mean[on_front]
    step_x = np.append(front_size, size.max())
    step_y = np.append(front_score, front_score[-1])
    axes.step(step_x, step_y, where="post", color="black", linewidth=1.2, alpha=0.6, zorder=1)

    handles = [
        Line2D([], [], color=styles[label][0], marker=styles[label][1], linestyle="-", label=label)
        for label in present
    ]
    handles.append(Line2D([], [], color="black", alpha=0.6, linewidth=1.2, label="Pareto front"))
    scheme = panel["scheme"] if "scheme" in panel else panel["scheme_label"]
    full_scores = panel.loc[scheme == "full", f"{metric}_mean"]
    if not full_scores.empty:
        reference = float(full_scores.max())
        axes.axhline(reference, color="grey", linestyle="--", linewidth=1.0, zorder=0)
        handles.append(Line2D([], [], color="grey", linestyle="--", label=f"best full ({reference:.4f})"))

    axes.set_xscale("log")
    axes.set_xlabel(X_AXES[x])
    axes.set_ylabel(METRIC_LABELS[metric])
    axes.set_title(f"{dataset} · {model} · {device}")
    axes.legend(handles=handles, title="scheme", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0.0, frameon=False)
    figure.tight_layout()
    return figure


def plot_pareto(
    summary: pd.DataFrame,
    dataset: str,
    model: str,
    device: str,
    metric: str,
    path: Path,
    *,
    suite: str | None = None,
    labels: Sequence[str] | None = None,
    x: str = "size_bytes",
) -> Path:
    """Save the panel's Pareto plot (metric against size or latency, CI bars, front as a step) as a PNG."""
    figure = pareto_figure(summary, dataset, model, device, metric, suite=suite, labels=labels, x=x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def write_report(
    frame: pd.DataFrame, out_dir: Path, title: str = "embbench report", context: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/report.md`` with figures under ``out_dir/figures/``; returns the report's path."""
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_results(frame)
    status = _text(frame, "status") if len(frame) else pd.Series(dtype=object)
    counts = {name: int((status == name).sum()) for name in ("ok", "failed", "skipped")}

    details = dict(context or {})
    details.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    details["cells"] = (
        f"{len(frame)} ({counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped)"
    )
    lines = [f"# {title}", ""]
    lines += [f"- **{_escape(key)}**: {_escape(_context_value(value))}" for key, value in details.items()]
    lines.append("")

    if summary.empty:
        lines += ["No successful cells: there is nothing to summarise or plot.", ""]
    else:
        lines += [
            f"Values are means over seeds ± the half-width of a {CONFIDENCE:.0%} Student-t confidence "
            f"interval. {FRONT_MARK} marks a point on the Pareto front of mean quality against size (smaller "
            f"and better wins); {OVERLAP_MARK} a point off the front whose interval reaches the front's best "
            "score at its size.",
            "",
        ]
        labels = sorted(summary["scheme_label"].unique())
        several_suites = summary["suite"].nunique() > 1
        for (suite, dataset, model, device), panel in summary.groupby(PANEL_KEYS, sort=True, dropna=False):
            heading = f"{dataset} · {model} · {device}"
            lines += [f"## {f'{suite} · ' if several_suites else ''}{heading}", "", _panel_table(panel), ""]
            for x, x_label in (("size_bytes", "size"), ("embedding_latency_ms", "latency")):
                for metric, metric_label in METRIC_LABELS.items():
                    if (panel[f"{metric}_mean"].notna() & panel[x].notna()).any():
                        suffix = "" if x == "size_bytes" else "__latency"
                        name = _slug(f"{suite}__{dataset}__{model}__{device}__{metric}{suffix}") + ".png"
                        plot_pareto(summary, dataset, model, device, metric, figures_dir / name, suite=suite,
                                    labels=labels, x=x)
                        lines += [f"![{metric_label} vs {x_label}: {_escape(heading)}](figures/{name})", ""]

    not_ok = frame[status != "ok"] if len(frame) else frame
    if len(not_ok):
        lines += ["## Failed and skipped cells", "", _failure_table(not_ok), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``align`` is one character per column: l, r or c."""
    align = align or "l" * len(header)
    rule = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [
        "| " + " | ".join(_escape(cell) for cell in header) + " |",
        "| " + " | ".join(rule[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_bytes(size: float) -> str:
    if math.isnan(size):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _panel_table(panel: pd.DataFrame) -> str:
    rows = []
    for row in panel.itertuples(index=False):
        size = format_bytes(row.size_bytes)
        if row.full_bytes > 0:  # False for NaN too
            size += f" ({100 * row.size_bytes / row.full_bytes:.3g}% of full)"
        rows.append([
            row.scheme_label, str(row.budget), size,
            _metric_cell(row, "test_auc"), _metric_cell(row, "test_hr10"),
            str(row.seeds), _number_text(row.train_seconds, ".1f"),
            _number_text(row.train_examples_per_second, ",.0f"), _number_text(row.embedding_latency_ms, ".3g"),
        ])
    header = ["scheme", "budget", "size", "test AUC", "test HR@10", "seeds", "train s", "train ex/s", "latency ms"]
    return markdown_table(header, rows, align="lllrrrrrr")


def _number_text(value: float, spec: str) -> str:
    return "–" if value is None or math.isnan(value) else format(value, spec)


def _metric_cell(row: Any, metric: str) -> str:
    mean, high = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_high")
    if math.isnan(mean):
        return "–"
    text = f"{mean:.4f}" if high == mean else f"{mean:.4f} ± {high - mean:.4f}"
    if getattr(row, f"{metric}_on_front"):
        text += f" {FRONT_MARK}"
    elif getattr(row, f"{metric}_overlaps_front"):
        text += f" {OVERLAP_MARK}"
    return text


def _failure_table(cells: pd.DataFrame) -> str:
    columns = ["suite", "dataset", "model", "device", "scheme_label", "budget", "seed", "status"]
    shown = pd.DataFrame({name: _text(cells, name).fillna("–") for name in columns})
    shown["reason"] = _text(cells, "error").map(_last_line)
    shown = shown.sort_values(columns[:-1], ignore_index=True)
    header = ["suite", "dataset", "model", "device", "scheme", "budget", "seed", "status", "reason"]
    return markdown_table(header, shown.to_numpy().tolist())


def _last_line(error: Any, limit: int = 200) -> str:
    if not isinstance(error, str):
        return "–"
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "–"
    return lines[-1] if len(lines[-1]) <= limit else lines[-1][: limit - 1] + "…"


def _context_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items() if item is not None) or "–"
    return "–" if value is None else str(value)


def _escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _text(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as strings (missing values stay missing); an all-missing column where the frame lacks it."""
    if name not in frame:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    column = frame[name]
    return column.where(column.isna(), column.astype(str))


def _number(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame:
        return pd.Series(math.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[name], errors="coerce").astype(float)


def _summary_columns() -> list[str]:
    columns = [*GROUP_KEYS, "scheme", "size_bytes", "full_bytes", "seeds"]
    columns += [f"{metric}_{part}" for metric in METRIC_LABELS for part in ("mean", "low", "high")]
    columns += ["train_seconds", "embedding_latency_ms", "train_examples_per_second"]
    columns += [f"{metric}_{flag}" for metric in METRIC_LABELS
                for flag in ("on_front", "overlaps_front", "front_best")]
    return columns
