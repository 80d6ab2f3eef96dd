"""Published reference points from suite files' ``[[references]]``, placed beside the stored measurement of the
same method, budget and metric: our mean and interval over seeds, and the difference."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from embbench.errors import ConfigError
from embbench.report.columns import PANEL_KEYS, number_column, text_column
from embbench.report.statistics import CONFIDENCE, mean_ci
from embbench.run.suites import Reference, parse_suite_text

REFERENCE_COLUMNS = [
    *PANEL_KEYS, "source", "method", "scheme_label", "budget", "metric", "value", "x_bytes", "ours_mean",
    "ours_low", "ours_high", "ours_seeds", "difference", "scheme_cells", "note", "url",
]


def suite_references(suite_sources: Mapping[str, str]) -> tuple[dict[str, tuple[Reference, ...]], dict[str, str]]:
    """The ``[[references]]`` of each suite text (read with the suite parser), and for each text that does not
    parse, its one-line error (the report says so and goes on)."""
    references, errors = {}, {}
    for name, text in sorted(suite_sources.items()):
        try:
            suite = parse_suite_text(text, Path(f"{name}.toml"))
        except ConfigError as exc:
            errors[name] = str(exc)
            continue
        if suite.references:
            references[name] = suite.references
    return references, errors


def reference_comparisons(
    frame: pd.DataFrame, references: Mapping[str, tuple[Reference, ...]], confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """One row per reference and panel of its suite (narrowed by its ``dataset``/``model``) with ok cells.

    ``x_bytes`` is where the point is drawn: the size the reference states, else the cells' ``budget_bytes``
    at its budget in that panel (NaN where no cell ran that budget). ``ours_*`` is the mean and Student-t
    interval over seeds of the reference's metric for its scheme label at its budget (NaN and 0 seeds where
    none ran); ``difference`` is ours − reference; ``scheme_cells`` counts the stored cells of any status of its
    scheme label at its budget in the panel (0: not part of this run, as under ``--quick``; failed and skipped
    cells count). Columns: ``REFERENCE_COLUMNS``.
    """
    rows = []
    status = text_column(frame, "status") if len(frame) else pd.Series(dtype=object)
    ok = frame[status == "ok"] if len(frame) else frame
    if not len(ok) or not references:
        return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
    keys = pd.DataFrame({name: text_column(frame, name) for name in [*PANEL_KEYS, "scheme_label", "budget"]})
    keys["ok"] = status == "ok"
    with_ok_cells = keys.groupby(PANEL_KEYS, sort=True, dropna=False)["ok"].transform("any")
    for panel_keys, panel in keys[with_ok_cells].groupby(PANEL_KEYS, sort=True, dropna=False):
        suite, dataset, model, _device = panel_keys
        for reference in references.get(str(suite), ()):
            if reference.dataset not in (None, dataset) or reference.model not in (None, model):
                continue
            at_budget = panel.index[(panel["budget"] == reference.budget) & panel["ok"]]
            scheduled = panel.index[(panel["budget"] == reference.budget) & (panel["scheme_label"] == reference.label)]
            ours = at_budget[panel.loc[at_budget, "scheme_label"] == reference.label]
            if reference.size_bytes is not None:
                x_bytes = float(reference.size_bytes)
            else:
                x_bytes = float(number_column(ok.loc[at_budget], "budget_bytes").mean()) if len(at_budget) else math.nan
            per_seed = pd.DataFrame({"seed": number_column(ok.loc[ours], "seed"),
                                     "value": number_column(ok.loc[ours], reference.metric)}).dropna()
            seed_means = per_seed.groupby("seed")["value"].mean()
            mean, low, high = mean_ci(seed_means.to_numpy(), confidence)
            rows.append([
                *panel_keys, reference.source, reference.method, reference.label, reference.budget,
                reference.metric, reference.value, x_bytes, mean, low, high, len(seed_means),
                mean - reference.value, len(scheduled), reference.note, reference.url,
            ])
    return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
