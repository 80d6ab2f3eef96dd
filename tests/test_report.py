"""The report: summary statistics, front flags, figures, the cells that did not run, provenance, configuration;
Markdown and self-contained HTML."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
from matplotlib.figure import Figure

from embbench.report import (
    pareto_figure,
    plot_pareto,
    scheme_styles,
    shipped_suite_sources,
    suite_configurations,
    summarize_results,
    write_report,
)
from embbench.report.statistics import mean_ci
from embbench.run.suites import Suite, parse_suite

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FULL_BYTES = 1_000_000


def cell(scheme_label: str, budget: str, size_bytes: int, seed: int, auc: float, hr: float, **extra) -> dict:
    row = {
        "suite": "smoke", "dataset": "synthetic", "model": "gmf", "scheme": scheme_label.split("(")[0],
        "scheme_label": scheme_label, "budget": budget, "size_bytes": size_bytes, "full_bytes": FULL_BYTES,
        "device": "cpu", "seed": seed, "status": "ok", "test_auc": auc, "test_hr10": hr,
        "test_ndcg10": hr / 2, "val_auc": auc, "val_hr10": hr, "train_seconds": 10.0 + seed, "epochs_run": 3,
        "error": None,
    }
    row.update(extra)
    return row


@pytest.fixture
def results() -> pd.DataFrame:
    """2 schemes x 3 budgets x 2 seeds; one hashing cell failed."""
    rows = []
    budgets = [("1/16", 62_500), ("1/4", 250_000), ("1/1", 1_000_000)]
    for step, (budget, size) in enumerate(budgets):
        for seed in (0, 1):
            rows.append(cell("dhe(k=64)", budget, size + 4_000, seed, 0.80 + 0.02 * step + 0.01 * seed,
                             0.40 + 0.05 * step))
            rows.append(cell("hashing-trick", budget, size, seed, 0.78 + 0.03 * step + 0.002 * seed,
                             0.38 + 0.04 * step))
    error = "Traceback (most recent call last):\n  File 'x.py'\nRuntimeError: out of memory | tried 2 GiB\n"
    failed = cell("hashing-trick", "1/4", 250_000, 1, np.nan, np.nan, status="failed", error=error)
    rows = [row for row in rows if not (row["scheme_label"] == "hashing-trick" and row["budget"] == "1/4"
                                        and row["seed"] == 1)]
    rows.append(failed)
    return pd.DataFrame(rows)


def test_summary_means_and_counts(results: pd.DataFrame) -> None:
    summary = summarize_results(results)
    assert len(summary) == 6
    dhe = summary[(summary["scheme_label"] == "dhe(k=64)") & (summary["budget"] == "1/4")].iloc[0]
    assert dhe["seeds"] == 2
    assert dhe["size_bytes"] == 254_000
    assert dhe["train_seconds"] == pytest.approx(10.5)
    mean, low, high = mean_ci([0.82, 0.83])
    auc = (dhe["test_auc_mean"], dhe["test_auc_low"], dhe["test_auc_high"])
    assert auc == pytest.approx((mean, low, high))
    hashing = summary[(summary["scheme_label"] == "hashing-trick") & (summary["budget"] == "1/4")].iloc[0]
    assert hashing["seeds"] == 1  # the failed seed is left out
    assert hashing["test_auc_low"] == hashing["test_auc_mean"] == hashing["test_auc_high"]
    assert hashing["test_auc_mean"] == pytest.approx(0.81)


def test_summary_of_no_ok_cells_is_empty() -> None:
    frame = pd.DataFrame([cell("dhe", "1/4", 10, 0, np.nan, np.nan, status="failed", error="boom")])
    assert summarize_results(frame).empty
    assert summarize_results(pd.DataFrame()).empty


def test_front_flags_on_a_hand_made_case() -> None:
    rows = [
        cell("a", "1", 100, 0, 0.70, 0.30), cell("a", "1", 100, 1, 0.70, 0.30),
        cell("a", "2", 400, 0, 0.80, 0.40), cell("a", "2", 400, 1, 0.80, 0.40),
        cell("b", "1", 200, 0, 0.60, 0.50), cell("b", "1", 200, 1, 0.80, 0.50),  # wide AUC interval
        cell("b", "2", 300, 0, 0.78, 0.20), cell("b", "2", 300, 1, 0.78, 0.20),
        # another device is its own panel, with its own front
        cell("b", "1", 200, 0, 0.50, 0.10, device="cuda"),
    ]
    summary = summarize_results(pd.DataFrame(rows)).set_index(["device", "scheme_label", "budget"])
    auc_front = summary["test_auc_on_front"]
    assert auc_front.to_dict() == {
        ("cpu", "a", "1"): True, ("cpu", "a", "2"): True, ("cpu", "b", "1"): False, ("cpu", "b", "2"): True,
        ("cuda", "b", "1"): True,
    }
    # b@1: mean 0.70 ties a@1 at a larger size, so it is off the front, but its interval reaches 0.70.
    assert summary["test_auc_overlaps_front"].to_dict()[("cpu", "b", "1")]
    assert not summary["test_auc_overlaps_front"].to_dict()[("cpu", "b", "2")]
    hr_front = summary["test_hr10_on_front"].to_dict()
    assert hr_front == {
        ("cpu", "a", "1"): True, ("cpu", "a", "2"): False, ("cpu", "b", "1"): True, ("cpu", "b", "2"): False,
        ("cuda", "b", "1"): True,
    }


def test_write_report(results: pd.DataFrame, tmp_path: Path) -> None:
    versions = {"torch": "2.13", "torchrec": None}
    context = {"database": "results/x.sqlite", "git commit": "abc123", "versions": versions}
    path = write_report(results, tmp_path / "out", context=context)
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    assert text.startswith("# embbench report")
    assert "- **database**: results/x.sqlite" in text
    assert "- **versions**: torch=2.13" in text
    assert "- **generated**:" in text
    for label in ("dhe(k=64)", "hashing-trick"):
        assert label in text
    assert "★" in text
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert len(links) == 2  # one panel x two metrics
    for link in links:
        figure = path.parent / link
        assert figure.stat().st_size > 0
        assert figure.read_bytes()[:8] == PNG_SIGNATURE
    failed_section = text.split("## Failed and skipped cells", 1)[1]
    assert "RuntimeError: out of memory \\| tried 2 GiB" in failed_section
    assert "Traceback" not in failed_section
    assert "hashing-trick" in failed_section


def test_report_of_only_failures_says_so(tmp_path: Path) -> None:
    failed = cell("dhe", "1/4", 10, 0, np.nan, np.nan, status="failed", error="ValueError: bad")
    frame = pd.DataFrame([failed])
    text = write_report(frame, tmp_path).read_text()
    assert "No successful cells" in text
    assert "ValueError: bad" in text
    assert not list((tmp_path / "figures").glob("*.png"))


def test_report_of_empty_frame_says_so(tmp_path: Path) -> None:
    text = write_report(pd.DataFrame(), tmp_path).read_text()
    assert "No successful cells" in text


def test_plot_pareto_writes_png(results: pd.DataFrame, tmp_path: Path) -> None:
    summary = summarize_results(results)
    path = plot_pareto(summary, "synthetic", "gmf", "cpu", "test_hr10", tmp_path / "nested" / "plot.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_figure_axes_title_and_full_reference() -> None:
    rows = [cell("full", "1/1", FULL_BYTES, 0, 0.9, 0.5), cell("dhe", "1/4", 250_000, 0, 0.85, 0.45)]
    figure = pareto_figure(summarize_results(pd.DataFrame(rows)), "synthetic", "gmf", "cpu", "test_auc")
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    assert axes.get_xlabel() == "embedding size (bytes, log scale)"
    assert axes.get_ylabel() == "test AUC"
    assert axes.get_title() == "synthetic · gmf · cpu"
    legend_labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend_labels == ["dhe", "full", "Pareto front", "best full (0.9000)"]


def legend_colours(figure: Figure) -> dict[str, tuple]:
    legend = figure.axes[0].get_legend()
    return {text.get_text(): tuple(handle.get_color()) for text, handle in
            zip(legend.get_texts(), legend.legend_handles, strict=True)}


def test_palette_is_consistent_across_subsets() -> None:
    rows = [
        cell("alpha", "1/4", 100, 0, 0.7, 0.3, dataset="one"),
        cell("zeta", "1/4", 200, 0, 0.8, 0.3, dataset="one"),
        cell("zeta", "1/4", 200, 0, 0.8, 0.3, dataset="two"),
        cell("mid", "1/4", 300, 0, 0.9, 0.3, dataset="two"),
    ]
    summary = summarize_results(pd.DataFrame(rows))
    one = legend_colours(pareto_figure(summary, "one", "gmf", "cpu", "test_auc"))
    two = legend_colours(pareto_figure(summary, "two", "gmf", "cpu", "test_auc"))
    assert one["zeta"] == two["zeta"]
    # A caller plotting a sub-summary passes the report's labels and gets the same colours.
    only_two = summary[summary["dataset"] == "two"]
    alone_figure = pareto_figure(only_two, "two", "gmf", "cpu", "test_auc", labels=summary["scheme_label"])
    alone = legend_colours(alone_figure)
    assert alone["zeta"] == two["zeta"] and alone["mid"] == two["mid"]
    styles = scheme_styles(["zeta", "alpha", "mid"])
    assert len({colour for colour, _ in styles.values()}) == 3
    assert scheme_styles(["mid", "zeta", "alpha", "zeta"]) == styles


def with_provenance(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the store fills in for where and with what a cell ran."""
    environment = json.dumps({"versions": {"torch": "2.13.0", "numpy": "2.1.0"}})
    return frame.assign(git_commit="abc123", host="bench-host", device_name="Test CPU 9000", threads=2,
                        table_backend="torch", environment_json=environment)


def test_html_report_is_self_contained_and_matches_markdown(results: pd.DataFrame, tmp_path: Path) -> None:
    markdown = write_report(results, tmp_path, context={"git commit": "abc123"}).read_text()
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", markdown)
    assert links
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(links)
    for link in links:
        assert base64.b64encode((tmp_path / link).read_bytes()).decode("ascii") in embedded
    # The tables: one per panel plus the failures and the environment, with their cells.
    assert page.count("<table>") == markdown.count("\n| :--") + markdown.count("\n| --:")
    assert "<td>dhe(k=64)</td>" in page and "<td>hashing-trick</td>" in page
    assert "RuntimeError: out of memory | tried 2 GiB" in page
    assert "<h2" in page and "Failed and skipped cells" in page


def test_html_escapes_text(tmp_path: Path) -> None:
    rows = [cell("<script>x</script>", "1/4", 100, 0, 0.7, 0.3)]
    write_report(pd.DataFrame(rows), tmp_path, title="a & b")
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<title>a &amp; b</title>" in page


def test_write_report_writes_the_page_next_to_the_markdown(results: pd.DataFrame, tmp_path: Path) -> None:
    path = write_report(results, tmp_path).with_name("report.html")
    assert path == tmp_path / "report.html" and (tmp_path / "report.md").exists()
    assert path.read_text().startswith("<!DOCTYPE html>")


def test_report_shows_commit_machine_and_versions(results: pd.DataFrame, tmp_path: Path) -> None:
    markdown = write_report(with_provenance(results), tmp_path).read_text()
    page = (tmp_path / "report.html").read_text()
    environment = markdown.split("## Environment of the stored cells", 1)[1]
    for text in ("abc123", "bench-host", "Test CPU 9000", "| 2 |", "torch", "torch=2.13.0, numpy=2.1.0"):
        assert text in environment
    assert "<td>Test CPU 9000</td>" in page and "torch=2.13.0, numpy=2.1.0" in page


def frame_of_suite(suite: Suite) -> pd.DataFrame:
    """A results frame as the store would hold it after running ``suite`` (made-up metrics)."""
    rows = []
    for index, suite_cell in enumerate(suite.cells()):
        rows.append({
            **cell(suite_cell.scheme.label, suite_cell.budget, 1000 + index, suite_cell.seed, 0.8, 0.4),
            "suite": suite.name, "dataset": suite_cell.dataset.label, "model": suite_cell.model.label,
            "scheme": suite_cell.scheme.name, "device": suite_cell.device,
            "config_json": json.dumps(suite_cell.config()),
        })
    return pd.DataFrame(rows)


SUITE_TEXT = """
name = "tiny"
epochs = 2
seeds = [0, 1]
budgets = ["1/2", "1/4"]
dim = 16
early_stopping = "hr@10"
[[datasets]]
name = "synthetic"
params = { num_users = 50, num_items = 40 }
[[models]]
name = "gmf"
[[schemes]]
name = "full"
budgets = ["1"]
[[schemes]]
name = "dhe"
label = "dhe-k8"
params = { num_hashes = 8, batch_norm = false, architecture = "pyramid" }
[[schemes]]
name = "hashing-trick"
budgets = ["64KB", "1/8"]
[quick]
epochs = 1
"""


def test_resolved_configuration_reproduces_the_suites_cells(tmp_path: Path) -> None:
    original = tmp_path / "tiny.toml"
    original.write_text(SUITE_TEXT)
    suite = parse_suite(original)
    configuration = suite_configurations(frame_of_suite(suite))["tiny"]
    tomllib.loads(configuration)  # valid TOML
    rebuilt = tmp_path / "rebuilt.toml"
    rebuilt.write_text(configuration)
    # Written back as a suite file, it expands into exactly the cells that ran (same keys, so same results).
    assert sorted(c.key for c in parse_suite(rebuilt).cells()) == sorted(c.key for c in suite.cells())


def test_report_includes_configuration_and_suite_file(tmp_path: Path) -> None:
    original = tmp_path / "tiny.toml"
    original.write_text(SUITE_TEXT)
    frame = frame_of_suite(parse_suite(original))
    markdown = write_report(frame, tmp_path / "out", suite_sources={"tiny": SUITE_TEXT, "other": "x = 1"}).read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    configuration = markdown.split("## Suite configuration", 1)[1]
    assert 'label = "dhe-k8"' in configuration
    assert 'params = { num_hashes = 8, batch_norm = false, architecture = "pyramid" }' in configuration
    assert 'budgets = ["1/2", "1/4"]' in configuration
    assert 'budgets = ["1/8", "64000b"]' in configuration  # largest fraction first, bytes last
    assert '[quick]\nepochs = 1' in configuration  # the suite file itself, verbatim
    assert "x = 1" not in markdown  # a suite without stored cells is left out
    assert "label = &quot;dhe-k8&quot;" in page and "[quick]" in page


def test_configuration_notes_settings_that_changed_between_runs(tmp_path: Path) -> None:
    original = tmp_path / "tiny.toml"
    original.write_text(SUITE_TEXT)
    first = frame_of_suite(parse_suite(original))
    original.write_text(SUITE_TEXT.replace("epochs = 2", "epochs = 5"))
    second = frame_of_suite(parse_suite(original))
    configuration = suite_configurations(pd.concat([first, second], ignore_index=True))["tiny"]
    assert "# epochs: several values among the stored cells: 2, 5" in configuration


def test_shipped_suite_sources_reads_shipped_files_only() -> None:
    sources = shipped_suite_sources(["smoke", "not-a-shipped-suite"])
    assert set(sources) == {"smoke"}
    assert 'name = "smoke"' in sources["smoke"]
