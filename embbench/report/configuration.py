"""The report's "Suite configuration" section: per suite, the configuration its stored cells ran with, written
back as a suite file (TOML), next to the text of the suite file where it is known."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import pandas as pd

from embbench.report.columns import text_column
from embbench.report.document import Block, Code, Heading, Paragraph
from embbench.run.suites import configuration_toml


def configuration_blocks(frame: pd.DataFrame, suite_sources: Mapping[str, str]) -> list[Block]:
    """The section, for each suite with stored configurations or with stored cells and a known suite file."""
    configurations = suite_configurations(frame)
    names = sorted(set(configurations) | (set(suite_sources) & set(text_column(frame, "suite").dropna())))
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


def shipped_suite_sources(suite_names: Iterable[str]) -> dict[str, str]:
    """The text of each shipped suite file among ``suite_names`` (suites given by path are not known here).

    The file may have changed since its cells ran; the report shows it next to the configuration the stored
    cells actually ran with.
    """
    from embbench.run.suites import builtin_suites

    shipped = builtin_suites()
    return {name: shipped[name].read_text(encoding="utf-8") for name in sorted(set(suite_names)) if name in shipped}


def suite_configurations(frame: pd.DataFrame) -> dict[str, str]:
    """Per suite, its stored cells' configuration written back as a suite file (TOML) that runs those cells
    (:func:`embbench.run.suites.configuration_toml`)."""
    if not len(frame) or "config_json" not in frame:
        return {}
    configurations = {}
    for suite, cells in frame.groupby(text_column(frame, "suite"), sort=True):
        configs = [json.loads(c) if isinstance(c, str) else c for c in cells["config_json"]]
        configs = [c for c in configs if isinstance(c, dict) and {"dataset", "model", "scheme", "budget"} <= set(c)]
        if configs:
            configurations[str(suite)] = configuration_toml(str(suite), configs)
    return configurations
