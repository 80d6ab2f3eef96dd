"""Pareto plots with seaborn: quality against size or latency per panel, with intervals and the front. Drawn on a
pyplot-free Agg canvas, so they need no display and leave the caller's pyplot backend alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from embbench.report.columns import METRIC_LABELS, X_AXES
from embbench.report.formatting import format_bytes
from embbench.report.pareto import pareto_front

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")


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
    references: pd.DataFrame | None = None,
) -> Figure:
    """The Pareto plot of one panel as a matplotlib Figure (not registered with pyplot; nothing to close).

    ``x`` is the cost axis: ``size_bytes`` (default) or ``embedding_latency_ms``; less is better on both.
    ``labels`` fixes the palette (default: every scheme label in ``summary``, not just this panel's).
    ``references`` (rows of ``reference_comparisons``: ``scheme_label``, ``x_bytes``, ``metric``, ``value``) are
    drawn as hollow markers in their scheme's colour and marker, on the size axis, for this ``metric``.
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

    drawn = _draw_references(axes, references, metric, styles) if x == "size_bytes" else np.array([])
    if len(drawn):
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="none",
                              label="published (hollow)"))
    axes.set_xscale("log")
    _readable_log_ticks(axes, np.concatenate([size, drawn]), in_bytes=x == "size_bytes")
    axes.set_xlabel(X_AXES[x])
    axes.set_ylabel(METRIC_LABELS[metric])
    axes.set_title(f"{dataset} · {model} · {device}")
    axes.legend(handles=handles, title="scheme", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0.0, frameon=False)
    figure.tight_layout()
    return figure


def _draw_references(
    axes: Any, references: pd.DataFrame | None, metric: str, styles: dict[str, tuple[Any, str]]
) -> np.ndarray:
    """Hollow markers for the references of ``metric`` that have a place on the size axis; their x values."""
    if references is None or not len(references):
        return np.array([])
    shown = references[(references["metric"] == metric) & references["x_bytes"].notna()
                       & references["value"].notna()]
    for row in shown.itertuples(index=False):
        colour, marker = styles.get(row.scheme_label, ((0.4, 0.4, 0.4), "o"))
        axes.scatter([row.x_bytes], [row.value], marker=marker, s=70, facecolors="none", edgecolors=[colour],
                     linewidths=1.6, zorder=4)
    return shown["x_bytes"].to_numpy(dtype=float)


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
    references: pd.DataFrame | None = None,
) -> Path:
    """Save the panel's Pareto plot (metric against size or latency, CI bars, front as a step, published
    references as hollow markers) as a PNG."""
    figure = pareto_figure(summary, dataset, model, device, metric, suite=suite, labels=labels, x=x,
                           references=references)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _readable_log_ticks(axes: Any, values: np.ndarray, in_bytes: bool) -> None:
    """Plain tick labels (``64 KiB``, ``1.5``) on a log axis, as many as its span allows (at most about 8).

    Matplotlib labels only powers of ten by default, which leaves a narrow axis (latencies within a factor of
    two) with ``1.5×10^0``-style labels, and byte counts unreadable. Bytes get powers of two, other values
    1-2-5 steps; an axis spanning less than one step gets five ticks rounded to two significant digits.
    """
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if not low > 0:
        return
    if in_bytes:
        powers = range(math.floor(math.log2(low)), math.ceil(math.log2(high)) + 1)
        stride = max(1, math.ceil(len(powers) / 8))
        ticks = [2.0 ** power for power in powers if power % stride == 0]
    else:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        steps = (1.0, 2.0, 5.0) if len(decades) <= 4 else (1.0,)
        ticks = [step * 10.0 ** power for power in decades for step in steps]
    if sum(low <= tick <= high for tick in ticks) < 2:
        unit = 1024.0 ** math.floor(math.log(high, 1024)) if in_bytes else 1.0
        spread = np.geomspace(low, high, 5) if high > low else np.array([low])
        ticks = sorted({float(f"{tick / unit:.2g}") * unit for tick in spread})
    label = (lambda value: format_bytes(value).replace(".0 ", " ")) if in_bytes else (lambda value: f"{value:.3g}")
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: label(value)))
    axes.xaxis.set_minor_formatter(NullFormatter())
    margin = (high / low) ** 0.05 if high > low else 1.2
    axes.set_xlim(low / margin, high * margin)
