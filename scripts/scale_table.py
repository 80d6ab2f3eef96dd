"""Markdown tables of a `scale` run: per scheme and vocabulary, size, peak RSS, training throughput, test AUC.

    python scripts/scale_table.py --db results/embbench.sqlite [--suite scale]

Rows come from the results store; refused cells show their reason. Used for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import re

import pandas as pd

from embbench.report import format_bytes
from embbench.run.store import ResultStore


def vocabulary_of(config: dict | str) -> int:
    config = json.loads(config) if isinstance(config, str) else config
    return int(config["dataset"]["params"].get("vocabulary_size", 0))


def scale_table(frame: pd.DataFrame) -> str:
    frame = frame.assign(vocabulary=frame["config_json"].map(vocabulary_of))
    vocabularies = sorted(frame["vocabulary"].unique())
    header = "| scheme | measure | " + " | ".join(f"10^{len(str(v)) - 1}" for v in vocabularies) + " |"
    lines = [header, "|---|---|" + "--:|" * len(vocabularies)]
    measures = (
        ("size", lambda r: format_bytes(r["size_bytes"])),
        ("peak RSS", lambda r: format_bytes(r["peak_rss_bytes"])),
        ("train examples/s", lambda r: f"{r['train_examples_per_second']:,.0f}"),
        ("test AUC", lambda r: f"{r['test_auc']:.4f}"),
    )
    for scheme, rows in frame.groupby("scheme_label", sort=False):
        by_vocabulary = {row["vocabulary"]: row for _, row in rows.iterrows()}
        for name, show in measures:
            cells = []
            for vocabulary in vocabularies:
                row = by_vocabulary.get(vocabulary)
                if row is None:
                    cells.append("")
                elif row["status"] == "ok":
                    cells.append(show(row))
                else:
                    reason = re.sub(r"\s+", " ", str(row["error"]))
                    cells.append("refused" if reason.startswith("refused") else row["status"])
            lines.append(f"| {scheme if name == 'size' else ''} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="results/embbench.sqlite")
    parser.add_argument("--suite", default="scale")
    args = parser.parse_args()
    frame = ResultStore(args.db).frame(args.suite)
    print(scale_table(frame[frame["precision"].fillna("fp32") == "fp32"]))


if __name__ == "__main__":
    main()
