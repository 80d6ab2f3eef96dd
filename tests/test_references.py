"""Published reference points: a suite file's [[references]] (parsed and checked against the suite), placed beside
our measurement of the same method, budget and metric, drawn as hollow markers and listed in the report; and the
shipped peer-cce-ml1m suite that carries the reference library's published ML-1M numbers."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.colors
import pandas as pd
import pytest
from cli_checks import assert_one_line_error, invoke
from matplotlib.collections import PathCollection

from embbench.errors import ConfigError
from embbench.report import pareto_figure, scheme_styles, summarize_results, write_report
from embbench.report.references import reference_comparisons, suite_references
from embbench.report.statistics import mean_ci
from embbench.run.suites import builtin_suites, parse_suite, parse_suite_text, suite_toml

SUITE = """
name = "refs"
budgets = ["1/4", "16KiB"]
seeds = [0, 1]

[[datasets]]
name = "synthetic"

[[models]]
name = "gmf"

[[schemes]]
name = "full"
budgets = ["1"]

[[schemes]]
name = "hashing-trick"

[[schemes]]
name = "dhe"
label = "dhe-small"
params = { num_hashes = 16 }

[quick]
budgets = ["16KiB"]
"""

REFERENCE = """
[[references]]
source = "a paper, Table 2"
method = "hashing-trick"
budget = "16384b"
metric = "test_auc"
value = 0.7
note = "their ppd 64"
url = "https://example.org/paper"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "refs.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_references_are_parsed_with_canonical_budget_and_resolved_label(tmp_path: Path) -> None:
    extra = REFERENCE.replace('method = "hashing-trick"', 'method = "dhe"').replace('"16384b"', '"16KiB"')
    suite = parse_suite(write(tmp_path, SUITE + REFERENCE + extra))
    first, second = suite.references
    assert (first.source, first.label, first.budget, first.metric, first.value) == (
        "a paper, Table 2", "hashing-trick", "16384b", "test_auc", 0.7)
    assert (first.note, first.url, first.size_bytes, first.dataset) == (
        "their ppd 64", "https://example.org/paper", None, None)
    assert (second.method, second.label, second.budget) == ("dhe", "dhe-small", "16384b")  # name -> its label


def test_references_are_not_part_of_any_cell(tmp_path: Path) -> None:
    without = parse_suite(write(tmp_path, SUITE)).cells()
    with_references = parse_suite(write(tmp_path, SUITE + REFERENCE)).cells()
    assert [cell.key for cell in without] == [cell.key for cell in with_references]


def test_a_reference_at_a_budget_outside_quick_is_still_valid_under_quick(tmp_path: Path) -> None:
    text = SUITE + REFERENCE.replace('"16384b"', '"1/4"')
    assert parse_suite(write(tmp_path, text), quick=True).references[0].budget == "1/4"


def test_suite_written_back_keeps_its_references(tmp_path: Path) -> None:
    suite = parse_suite(write(tmp_path, SUITE + REFERENCE))
    again = parse_suite_text(suite_toml(suite), tmp_path / "again.toml")
    assert again.references == suite.references


@pytest.mark.parametrize(("change", "fragments"), [
    (("value = 0.7", "valeu = 0.7"), ["unknown key 'valeu'", "did you mean 'value'"]),
    (("value = 0.7", 'value = "high"'), ["'value' must be a finite number"]),
    (('metric = "test_auc"', 'metric = "test_acu"'), ["unknown metric 'test_acu'", "did you mean 'test_auc'"]),
    (('method = "hashing-trick"', 'method = "hashing-trik"'), ["method 'hashing-trik'", "did you mean"]),
    (('budget = "16384b"', 'budget = "1/8"'), ["budget '1/8' is not one that scheme 'hashing-trick' runs",
                                              "1/4, 16384b"]),
    (('budget = "16384b"', 'budget = "lots"'), ["references[0]", "budget 'lots'"]),
    (('source = "a paper, Table 2"\n', ""), ["'source' is required"]),
    (('note = "their ppd 64"', "note = 64"), ["'note' must be a non-empty string"]),
    (('note = "their ppd 64"', 'dataset = "movielens"'), ["dataset 'movielens' is no dataset label"]),
    (('note = "their ppd 64"', "size_bytes = -3"), ["'size_bytes' must be a positive integer"]),
])
def test_bad_references_are_one_clear_error(tmp_path: Path, change: tuple[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        parse_suite(write(tmp_path, SUITE + REFERENCE.replace(*change)))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "refs.toml") in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_method_naming_two_entries_must_give_a_label(tmp_path: Path) -> None:
    text = SUITE + '\n[[schemes]]\nname = "dhe"\nlabel = "dhe-big"\n' + REFERENCE.replace(
        'method = "hashing-trick"', 'method = "dhe"')
    with pytest.raises(ConfigError, match="names 2 scheme entries; give one of their labels: dhe-small, dhe-big"):
        parse_suite(write(tmp_path, text))


def test_the_command_line_refuses_a_bad_reference_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, SUITE + REFERENCE.replace('metric = "test_auc"', 'metric = "auc"'))
    result = invoke("run", "suite", str(path), "--db", str(tmp_path / "results.sqlite"))
    assert_one_line_error(result, "unknown metric 'auc'")
    assert not (tmp_path / "results.sqlite").exists()


def cell(label: str, budget: str, seed: int, auc: float, budget_bytes: int, size: int) -> dict:
    return {"suite": "refs", "dataset": "synthetic", "model": "gmf", "device": "cpu", "scheme": label,
            "scheme_label": label, "budget": budget, "seed": seed, "status": "ok", "test_auc": auc,
            "test_hr10": 0.3, "size_bytes": size, "budget_bytes": budget_bytes, "full_bytes": 200_000}


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame([
        cell("hashing-trick", "16384b", 0, 0.74, 16_384, 16_000), cell("hashing-trick", "16384b", 1, 0.76, 16_384,
                                                                        16_000),
        cell("dhe-small", "16384b", 0, 0.80, 16_384, 15_000), cell("hashing-trick", "1/4", 0, 0.85, 50_000, 49_000),
        cell("full", "1", 0, 0.9, 200_000, 200_000),
    ])


def test_reference_beside_our_mean_interval_and_difference(tmp_path: Path, frame: pd.DataFrame) -> None:
    not_run = REFERENCE.replace('method = "hashing-trick"', 'method = "dhe-small"').replace(
        '"16384b"', '"1/4"').replace("value = 0.7", "value = 0.81\nsize_bytes = 60000")
    references, errors = suite_references({"refs": SUITE + REFERENCE + not_run})
    assert errors == {}
    rows = reference_comparisons(frame, references).set_index("scheme_label")
    ours = rows.loc["hashing-trick"]
    mean, low, high = mean_ci([0.74, 0.76])
    assert (ours["ours_mean"], ours["ours_low"], ours["ours_high"]) == pytest.approx((mean, low, high))
    assert ours["ours_seeds"] == 2
    assert ours["difference"] == pytest.approx(0.75 - 0.7)
    assert ours["x_bytes"] == 16_384  # the cells' budget_bytes at that budget
    missing = rows.loc["dhe-small"]
    assert missing["ours_seeds"] == 0 and math.isnan(missing["difference"])
    assert missing["x_bytes"] == 60_000  # the size the reference states
    assert (ours["scheme_cells"], missing["scheme_cells"]) == (2, 0)  # its own cells at that budget


def test_a_reference_whose_cells_failed_is_listed_as_not_run(tmp_path: Path, frame: pd.DataFrame) -> None:
    failed = dict(cell("dhe-small", "1/4", 0, math.nan, 50_000, 49_000), status="failed", error="boom")
    frame = pd.concat([frame, pd.DataFrame([failed])], ignore_index=True)
    reference = REFERENCE.replace('method = "hashing-trick"', 'method = "dhe-small"').replace('"16384b"', '"1/4"')
    references, _ = suite_references({"refs": SUITE + reference})
    row = reference_comparisons(frame, references).iloc[0]
    assert (row["scheme_cells"], row["ours_seeds"], row["x_bytes"]) == (1, 0, 50_000)
    text = write_report(frame, tmp_path, suite_sources={"refs": SUITE + reference}).read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("| dhe-small | 1/4 |") and "a paper" in line)
    assert "| not run | – |" in line


def test_unreadable_suite_text_is_reported_not_fatal() -> None:
    references, errors = suite_references({"broken": "name = [", "refs": SUITE + REFERENCE})
    assert set(references) == {"refs"} and "broken" in errors and "invalid TOML" in errors["broken"]


def test_references_are_hollow_markers_in_the_schemes_colour(frame: pd.DataFrame) -> None:
    references, _ = suite_references({"refs": SUITE + REFERENCE})
    rows = reference_comparisons(frame, references)
    summary = summarize_results(frame)
    figure = pareto_figure(summary, "synthetic", "gmf", "cpu", "test_auc", references=rows)
    axes = figure.axes[0]
    hollow = [c for c in axes.collections if isinstance(c, PathCollection) and len(c.get_facecolors()) == 0]
    assert len(hollow) == 1
    assert tuple(hollow[0].get_offsets()[0]) == pytest.approx((16_384, 0.7))
    colour = scheme_styles(summary["scheme_label"])["hashing-trick"][0]
    assert matplotlib.colors.same_color(hollow[0].get_edgecolors()[0][:3], colour)
    assert "published (hollow)" in [text.get_text() for text in axes.get_legend().get_texts()]
    # HR@10 has no reference: nothing hollow on its figure.
    other = pareto_figure(summary, "synthetic", "gmf", "cpu", "test_hr10", references=rows).axes[0]
    assert not [c for c in other.collections if isinstance(c, PathCollection) and len(c.get_facecolors()) == 0]


def test_report_lists_references_per_panel(tmp_path: Path, frame: pd.DataFrame) -> None:
    unswept = REFERENCE.replace('"16384b"', '"1/4"')  # the panel below has no cell at 1/4, as under --quick
    text = write_report(frame[frame["budget"] != "1/4"], tmp_path,
                        suite_sources={"refs": SUITE + REFERENCE + unswept}).read_text(encoding="utf-8")
    assert "1 more references of this suite are for schemes and budgets this panel did not run" in text
    assert not [line for line in text.splitlines() if line.startswith("| hashing-trick | 1/4 |")]
    assert "### Published references: synthetic · gmf · cpu" in text
    line = next(line for line in text.splitlines() if line.startswith("| hashing-trick | 16384b |")
                and "a paper" in line)
    assert "| 0.7 |" in line and "0.7500 ± " in line and "(2 seeds)" in line and "+0.0500" in line
    assert "a paper, Table 2 (https://example.org/paper)" in line and "their ppd 64" in line


PEER = "peer-cce-ml1m"
PPD_BUDGETS = {64: "16384b", 128: "32768b", 256: "65536b", 512: "131072b", 1024: "262144b", 2048: "524288b",
               4096: "1048576b", 8192: "2097152b"}


def test_peer_suite_budgets_are_their_ppd_in_bytes_for_two_tables() -> None:
    suite = parse_suite(builtin_suites()[PEER])
    assert suite.settings["budgets"] == [str(ppd * 32 * 4 * 2) + "b" for ppd in PPD_BUDGETS]
    assert suite.settings["budget_split"] == "equal" and suite.settings["dim"] == 32
    assert suite.settings["seeds"] == [0, 1, 2]
    quick = parse_suite(builtin_suites()[PEER], quick=True)
    assert quick.settings["budgets"] == [PPD_BUDGETS[64], PPD_BUDGETS[512], PPD_BUDGETS[4096]]
    assert quick.settings["seeds"] == [0] and quick.settings["epochs"] >= 20


def test_peer_suite_carries_every_published_number_of_each_shared_method() -> None:
    suite = parse_suite(builtin_suites()[PEER])
    by_label: dict[str, set[str]] = {}
    for reference in suite.references:
        assert reference.source == "thomasahle/cce results/ml-1m-30e" and reference.metric == "val_auc"
        assert reference.note.startswith("results.ml-1m.") and "seeds 1-3 = " in reference.note
        seeds = [float(value) for value in reference.note.split("seeds 1-3 = ")[1].split(";")[0].split(", ")]
        assert reference.value == pytest.approx(sum(seeds) / 3, abs=5e-5)  # the mean of the published three
        by_label.setdefault(reference.label, set()).add(reference.budget)
    compressed = {entry.label for entry in suite.schemes if entry.name != "full"}
    assert set(by_label) == compressed | {"full"}
    # every compressed method at every ppd; the entries configured as the authors' (CCE's rows, DHE's rank) at one
    # budget each, carrying the published number of their method at that ppd
    authors = {label for label in by_label if "-authors-" in label}
    assert all(budgets == set(PPD_BUDGETS.values())
               for label, budgets in by_label.items() if label != "full" and label not in authors)
    assert {label: len(budgets) for label, budgets in by_label.items() if label in authors} == {
        "cce-authors-rows-ppd64": 1, "cce-authors-rows-ppd512": 1,
        "dhe-authors-ppd64": 1, "dhe-authors-ppd512": 1, "dhe-authors-ppd4096": 1}
    value = {(reference.label, reference.budget): reference.value for reference in suite.references}
    for ppd in (64, 512, 4096):
        assert value[(f"dhe-authors-ppd{ppd}", PPD_BUDGETS[ppd])] == value[("dhe-relu", PPD_BUDGETS[ppd])]
