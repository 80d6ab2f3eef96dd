"""The report, in Markdown and as one self-contained HTML page: per dataset × model × device, a table of every
scheme and budget (mean and confidence interval over seeds) and Pareto plots of test quality against embedding
size and latency; then the cells that did not run, the machines and versions, and the suite configuration.

It reads only a results DataFrame (as the store returns it). Figures are drawn on a pyplot-free Agg canvas, so
making a report neither needs a display nor changes the backend of the caller's own plots.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from embbench.pareto import front_with_uncertainty, pareto_front, t_quantile

METRIC_LABELS = {"test_auc": "test AUC", "test_hr10": "test HR@10"}
GROUP_KEYS = ["suite", "dataset", "model", "device", "scheme_label", "budget"]
PANEL_KEYS = ["suite", "dataset", "model", "device"]
CONFIDENCE = 0.95
SIZE_AXIS_LABEL = "embedding size (bytes, log scale)"
X_AXES = {
    "size_bytes": SIZE_AXIS_LABEL,
    "embedding_latency_ms": "embedding inference latency, all features, largest batch (ms, log scale)",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
FRONT_MARK, OVERLAP_MARK = "★", "☆"
NUMERIC_MEANS = (
    "size_bytes", "full_bytes", "train_seconds", "embedding_latency_ms", "train_examples_per_second", "test_logloss",
)


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
        test_logloss=("test_logloss", "mean"),
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
    _readable_log_ticks(axes, size, in_bytes=x == "size_bytes")
    axes.set_xlabel(X_AXES[x])
    axes.set_ylabel(METRIC_LABELS[metric])
    axes.set_title(f"{dataset} · {model} · {device}")
    axes.legend(handles=handles, title="scheme", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0.0, frameon=False)
    figure.tight_layout()
    return figure


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
    """
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(frame, figures_dir, title, context, suite_sources)
    path = out_dir / "report.md"
    path.write_text(render_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(blocks, out_dir, title), encoding="utf-8")
    return path


def write_html_report(
    frame: pd.DataFrame,
    out_dir: Path,
    title: str = "embbench report",
    context: dict[str, Any] | None = None,
    suite_sources: Mapping[str, str] | None = None,
) -> Path:
    """``write_report``, returning the path of the self-contained HTML file instead of the Markdown one."""
    return write_report(frame, out_dir, title, context, suite_sources).with_name("report.html")


# The report is built once as a list of blocks and rendered twice, so Markdown and HTML never drift apart.
@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class KeyValues:
    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str


@dataclass(frozen=True)
class FigureLink:
    alt: str
    path: str  # relative to the report's folder


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


Block = Heading | Paragraph | KeyValues | Table | FigureLink | Code


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
    status = _text(frame, "status") if len(frame) else pd.Series(dtype=object)
    counts = {name: int((status == name).sum()) for name in ("ok", "failed", "skipped")}

    details = dict(context or {})
    details.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    details["cells"] = (
        f"{len(frame)} ({counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped)"
    )
    blocks: list[Block] = [Heading(1, title)]
    blocks.append(KeyValues(tuple((str(key), _context_value(value)) for key, value in details.items())))

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
            blocks += [Heading(2, f"{f'{suite} · ' if several_suites else ''}{heading}"), _panel_table(panel)]
            for x, x_label in (("size_bytes", "size"), ("embedding_latency_ms", "latency")):
                for metric, metric_label in METRIC_LABELS.items():
                    if (panel[f"{metric}_mean"].notna() & panel[x].notna()).any():
                        suffix = "" if x == "size_bytes" else "__latency"
                        name = _slug(f"{suite}__{dataset}__{model}__{device}__{metric}{suffix}") + ".png"
                        plot_pareto(summary, dataset, model, device, metric, figures_dir / name, suite=suite,
                                    labels=labels, x=x)
                        blocks.append(FigureLink(f"{metric_label} vs {x_label}: {heading}",
                                                 f"{figures_dir.name}/{name}"))

    not_ok = frame[status != "ok"] if len(frame) else frame
    if len(not_ok):
        blocks += [Heading(2, "Failed and skipped cells"), _failure_table(not_ok)]
    blocks += _environment_blocks(frame)
    blocks += _configuration_blocks(frame, suite_sources or {})
    return blocks


def render_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; figures are links to the PNG files."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines.append(f"{'#' * block.level} {_escape(block.text)}")
        elif isinstance(block, Paragraph):
            lines.append(block.text)
        elif isinstance(block, KeyValues):
            lines += [f"- **{_escape(key)}**: {_escape(value)}" for key, value in block.items]
        elif isinstance(block, Table):
            lines.append(markdown_table(block.header, block.rows, block.align))
        elif isinstance(block, FigureLink):
            lines.append(f"![{_escape(block.alt)}]({block.path})")
        elif isinstance(block, Code):
            longest_run = max((len(run) for run in re.findall(r"`+", block.text)), default=0)
            fence = "`" * max(3, longest_run + 1)
            lines += [f"{fence}{block.language}", block.text.rstrip("\n"), fence]
        lines.append("")
    return "\n".join(lines)


def render_html(blocks: Sequence[Block], out_dir: Path, title: str = "embbench report") -> str:
    """One self-contained HTML page: figures embedded as base64 PNG, inline CSS, nothing fetched."""
    out_dir = Path(out_dir)
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(block.level, 6)
            anchor = _slug(block.text.lower())
            body.append(f'<h{level} id="{anchor}">{html.escape(block.text)}</h{level}>')
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, KeyValues):
            items = "".join(
                f"<li><strong>{html.escape(key)}</strong>: {html.escape(value)}</li>" for key, value in block.items
            )
            body.append(f'<ul class="context">{items}</ul>')
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, FigureLink):
            encoded = base64.b64encode((out_dir / block.path).read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{html.escape(block.alt)}</figcaption></figure>"
            )
        elif isinstance(block, Code):
            body.append(f'<pre><code class="{html.escape(block.language)}">{html.escape(block.text)}</code></pre>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 78em;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; } td.c, th.c { text-align: center; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: .85em; color: #555; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
ul.context { padding-left: 1.2em; }
"""


def _html_table(table: Table) -> str:
    classes = {"l": "", "r": ' class="r"', "c": ' class="c"'}
    head = "".join(f"<th{classes[a]}>{html.escape(cell)}</th>" for cell, a in zip(table.header, table.align,
                                                                                   strict=True))
    rows = "".join(
        "<tr>" + "".join(f"<td{classes[a]}>{html.escape(cell)}</td>" for cell, a in zip(row, table.align,
                                                                                       strict=True)) + "</tr>"
        for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def shipped_suite_sources(suite_names: Iterable[str]) -> dict[str, str]:
    """The text of each shipped suite file among ``suite_names`` (suites given by path are not known here).

    The file may have changed since its cells ran; the report shows it next to the configuration the stored
    cells actually ran with.
    """
    from embbench.suites import builtin_suites

    shipped = builtin_suites()
    return {name: shipped[name].read_text(encoding="utf-8") for name in sorted(set(suite_names)) if name in shipped}


def suite_configurations(frame: pd.DataFrame) -> dict[str, str]:
    """Per suite, its stored cells' resolved configuration written back as a suite file (TOML).

    Each [[schemes]] entry lists the budgets that ran; a setting that differs between stored cells (a suite
    edited between runs) lists every value with a comment.
    """
    if not len(frame) or "config_json" not in frame:
        return {}
    configurations = {}
    for suite, cells in frame.groupby(_text(frame, "suite"), sort=True):
        rows = []
        for row in cells.itertuples(index=False):
            config = row.config_json
            if isinstance(config, str):
                config = json.loads(config)
            if isinstance(config, dict):
                rows.append((row, config))
        if rows:
            configurations[str(suite)] = _configuration_toml(str(suite), rows)
    return configurations


def _configuration_toml(suite: str, rows: list[tuple[Any, dict[str, Any]]]) -> str:
    def distinct(values: Iterable[Any]) -> list[Any]:
        seen: dict[str, Any] = {}
        for value in values:
            seen.setdefault(json.dumps(value, sort_keys=True, default=str), value)
        return list(seen.values())

    lines = [f"name = {_toml_value(suite)}"]
    lines.append(f"seeds = {_toml_value(sorted(distinct(config.get('seed') for _, config in rows), key=str))}")
    lines.append(f"devices = {_toml_value(sorted(distinct(config.get('device') for _, config in rows), key=str))}")
    for key in ("dim",):
        lines.append(_setting_line(key, distinct(config.get(key) for _, config in rows)))
    training_keys = distinct(key for _, config in rows for key in (config.get("training") or {}))
    for key in training_keys:
        lines.append(_setting_line(key, distinct((config.get("training") or {}).get(key) for _, config in rows)))
    for section, label_column in (("datasets", "dataset"), ("models", "model"), ("schemes", "scheme_label")):
        config_key = section[:-1]
        entries: dict[str, dict[str, Any]] = {}
        for row, config in rows:
            part = config.get(config_key) or {}
            label = str(getattr(row, label_column, None) or part.get("name"))
            identity = json.dumps([label, part.get("name"), part.get("params")], sort_keys=True, default=str)
            entry = entries.setdefault(identity, {"label": label, "name": part.get("name"),
                                                  "params": part.get("params") or {}, "budgets": []})
            if section == "schemes" and config.get("budget") not in entry["budgets"]:
                entry["budgets"].append(config.get("budget"))
        for entry in entries.values():
            lines += ["", f"[[{section}]]", f"name = {_toml_value(entry['name'])}"]
            if entry["label"] != entry["name"]:
                lines.append(f"label = {_toml_value(entry['label'])}")
            if entry["params"]:
                lines.append(f"params = {_toml_value(entry['params'])}")
            if section == "schemes":
                lines.append(f"budgets = {_toml_value(sorted(entry['budgets'], key=_budget_order))}")
    return "\n".join(lines) + "\n"


def _setting_line(key: str, values: list[Any]) -> str:
    values = [value for value in values if value is not None]
    if len(values) == 1:
        return f"{_toml_key(key)} = {_toml_value(values[0])}"
    return f"# {key}: several values among the stored cells: {', '.join(_toml_value(v) for v in values)}"


def _budget_order(budget: Any) -> tuple[int, float, str]:
    """Largest fraction first, then byte budgets by text."""
    try:
        return (0, -float(Fraction(str(budget))), str(budget))
    except (ValueError, ZeroDivisionError):
        return (1, 0.0, str(budget))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps("" if value is None else str(value), ensure_ascii=False)


def _environment_blocks(frame: pd.DataFrame) -> list[Block]:
    """Where and with what the stored cells ran: commit, host, device, threads, table backend, versions."""
    if not len(frame):
        return []
    columns = ["git_commit", "host", "device", "device_name", "threads", "table_backend"]
    shown = pd.DataFrame({name: _text(frame, name).fillna("–") for name in columns})
    machines = shown.groupby(columns, sort=True).size().reset_index(name="cells")
    blocks: list[Block] = [
        Heading(2, "Environment of the stored cells"),
        Table(("git commit", "host", "device", "device name", "threads", "table backend", "cells"),
              tuple(tuple(str(value) for value in row) for row in machines.to_numpy().tolist()), "llllrlr"),
    ]
    versions: dict[str, int] = {}
    for environment in _text(frame, "environment_json").dropna():
        try:
            recorded = json.loads(environment).get("versions") or {}
        except (ValueError, AttributeError):
            continue
        text = _context_value(recorded)
        versions[text] = versions.get(text, 0) + 1
    if versions:
        blocks.append(Table(("library versions", "cells"),
                            tuple((text, str(count)) for text, count in sorted(versions.items())), "lr"))
    return blocks


def _configuration_blocks(frame: pd.DataFrame, suite_sources: Mapping[str, str]) -> list[Block]:
    configurations = suite_configurations(frame)
    names = sorted(set(configurations) | (set(suite_sources) & set(_text(frame, "suite").dropna())))
    if not names:
        return []
    blocks: list[Block] = [
        Heading(2, "Suite configuration"),
        Paragraph("What the stored cells ran with, written back as a suite file (the budgets that ran, every "
                  "resolved setting); then the suite file as it is now, where it is known."),
    ]
    for name in names:
        blocks.append(Heading(3, name))
        if name in configurations:
            blocks += [Paragraph("Resolved configuration of the stored cells:"),
                       Code(configurations[name], "toml")]
        if name in suite_sources:
            blocks += [Paragraph("Suite file:"), Code(suite_sources[name], "toml")]
    return blocks


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


def _panel_table(panel: pd.DataFrame) -> Table:
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
            _metric_cell(row, "test_hr10") if ranking else _number_text(row.test_logloss, ".4f"),
            str(row.seeds), _number_text(row.train_seconds, ".1f"),
            _number_text(row.train_examples_per_second, ",.0f"), _number_text(row.embedding_latency_ms, ".3g"),
        ])
    second = "test HR@10" if ranking else "test log-loss"
    header = ("scheme", "budget", "size", "test AUC", second, "seeds", "train s", "train ex/s", "latency ms")
    return Table(header, tuple(tuple(row) for row in rows), "lllrrrrrr")


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


def _failure_table(cells: pd.DataFrame) -> Table:
    columns = ["suite", "dataset", "model", "device", "scheme_label", "budget", "seed", "status"]
    shown = pd.DataFrame({name: _text(cells, name).fillna("–") for name in columns})
    shown["reason"] = _text(cells, "error").map(_last_line)
    shown = shown.sort_values(columns[:-1], ignore_index=True)
    header = ("suite", "dataset", "model", "device", "scheme", "budget", "seed", "status", "reason")
    return Table(header, tuple(tuple(str(cell) for cell in row) for row in shown.to_numpy().tolist()), "l" * 9)


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
    columns += ["train_seconds", "embedding_latency_ms", "train_examples_per_second", "test_logloss"]
    columns += [f"{metric}_{flag}" for metric in METRIC_LABELS
                for flag in ("on_front", "overlaps_front", "front_best")]
    return columns
