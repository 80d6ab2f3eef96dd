"""The report as a list of blocks (headings, paragraphs, tables, figures, code), rendered once as GitHub Markdown
and once as a self-contained HTML page with inline CSS, so the two never drift apart."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    align: str  # one character per column: l, r or c


@dataclass(frozen=True)
class FigureLink:
    alt: str
    path: str  # relative to the report's folder


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


Block = Heading | Paragraph | KeyValues | Table | FigureLink | Code


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


def render_html(blocks: Sequence[Block], out_dir: Path, title: str = "embbench report") -> str:
    """One self-contained HTML page: figures embedded as base64 PNG, inline CSS, nothing fetched."""
    out_dir = Path(out_dir)
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(block.level, 6)
            anchor = slug(block.text.lower())
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


def _escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def slug(text: str) -> str:
    """``text`` as a file name or an anchor: each run of other characters than ``A-Za-z0-9._-`` becomes a hyphen."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
