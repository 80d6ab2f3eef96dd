"""The command line: JSON contracts, and bad input as one clear line with exit code 2 and no database."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from embbench.cli import main

SMALL_DATA = 'params = { num_users = 120, num_items = 80, interactions_per_user = 6 }'


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def write_suite(tmp_path, body: str):
    path = tmp_path / "suite.toml"
    path.write_text(body)
    return path


GOOD_SUITE = f"""
epochs = 1
budgets = ["1/4"]
[[datasets]]
name = "synthetic"
{SMALL_DATA}
[[models]]
name = "gmf"
[[schemes]]
name = "hashing-trick"
"""


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_list_schemes_json_contract():
    result = invoke("list", "schemes", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert all(set(row) == {"name", "status", "distribution", "error", "summary"} for row in rows)
    assert {"full", "hashing-trick", "dhe"} <= {row["name"] for row in rows if row["status"] == "ok"}


def test_list_filters_by_pattern():
    result = invoke("list", "schemes", "hash*", "--exclude", "*embedding", "--json")
    assert [row["name"] for row in json.loads(result.output)] == ["hashing-trick"]


def test_list_suites_shows_the_shipped_suites():
    result = invoke("list", "suites", "--json")
    assert {"smoke", "movielens"} <= {row["name"] for row in json.loads(result.output)}


def test_size_json_contract():
    result = invoke("size", "dhe", "--vocab", "100000", "--dim", "32", "--budget", "1/4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"scheme", "params", "size_bytes", "budget_bytes"} <= set(data)
    assert data["scheme"] == "dhe" and data["params"]["num_hashes"] == 1024
    assert 0.9 * data["budget_bytes"] <= data["size_bytes"] <= data["budget_bytes"]


def test_size_takes_hyper_parameters():
    result = invoke("size", "dhe", "--vocab", "1000", "--budget", "1", "--param", "num_hashes=64", "--json")
    assert json.loads(result.output)["params"]["num_hashes"] == 64


def test_size_unknown_scheme_is_one_line():
    assert_one_line_error(invoke("size", "dhee", "--vocab", "10"), "unknown scheme 'dhee'", "did you mean 'dhe'")


def test_size_budget_below_minimum_states_the_minimum():
    assert_one_line_error(invoke("size", "dhe", "--vocab", "10", "--budget", "1/1000"), "minimum of scheme 'dhe'")


def test_run_unknown_scheme_names_file_and_entry(tmp_path):
    suite = write_suite(tmp_path, GOOD_SUITE.replace('"hashing-trick"', '"hashing-trik"'))
    db = tmp_path / "r.sqlite"
    assert_one_line_error(invoke("run", "suite", str(suite), "--db", str(db)), "unknown scheme 'hashing-trik'",
                          "did you mean 'hashing-trick'")
    assert not db.exists()


def test_run_malformed_toml_names_the_file(tmp_path):
    suite = write_suite(tmp_path, "epochs = \n")
    db = tmp_path / "r.sqlite"
    assert_one_line_error(invoke("run", "suite", str(suite), "--db", str(db)), str(suite), "invalid TOML")
    assert not db.exists()


@pytest.mark.parametrize("typo, suggestion", [("epoch = 1\n", "epochs"), ("budget = ['1/2']\n", "budgets")])
def test_run_unknown_key_suggests_the_closest(tmp_path, typo, suggestion):
    suite = write_suite(tmp_path, typo + GOOD_SUITE)
    db = tmp_path / "r.sqlite"
    assert_one_line_error(invoke("run", "suite", str(suite), "--db", str(db)), f"did you mean '{suggestion}'")
    assert not db.exists()


def test_run_unknown_scheme_parameter_names_entry(tmp_path):
    suite = write_suite(tmp_path, GOOD_SUITE + "params = { row = 5 }\n")
    assert_one_line_error(invoke("run", "suite", str(suite), "--db", str(tmp_path / "r.sqlite")),
                          "schemes[0]", "unknown parameter 'row'", "did you mean 'rows'")


def test_run_budget_below_minimum_names_entry_and_minimum(tmp_path):
    suite = write_suite(tmp_path, GOOD_SUITE.replace('"hashing-trick"', '"dhe"').replace('["1/4"]', '["1/1000"]'))
    db = tmp_path / "r.sqlite"
    assert_one_line_error(invoke("run", "suite", str(suite), "--db", str(db)), "schemes[0] (dhe)",
                          "minimum of scheme 'dhe'")
    assert not db.exists()


def test_run_missing_data_files_say_where_to_put_them(tmp_path, monkeypatch):
    suite = write_suite(tmp_path, GOOD_SUITE.replace('name = "synthetic"', 'name = "movielens-1m"')
                        .replace(SMALL_DATA, ""))
    empty = tmp_path / "data"
    empty.mkdir()
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite), "--db", str(db), "--data-dir", str(empty), "--no-progress")
    assert_one_line_error(result, "datasets[0]", str(empty))
    assert not db.exists()


def test_run_unknown_builtin_suite_lists_the_known_ones(tmp_path):
    assert_one_line_error(invoke("run", "suite", "smok", "--db", str(tmp_path / "r.sqlite")), "did you mean 'smoke'")


def test_results_without_database_is_one_line(tmp_path):
    assert_one_line_error(invoke("results", "--db", str(tmp_path / "none.sqlite")), "no results database")


def test_run_then_results_json_contract(tmp_path):
    suite = write_suite(tmp_path, GOOD_SUITE)
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite), "--db", str(db), "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads(invoke("results", "--db", str(db), "--json").output)
    assert len(rows) == 1
    required = {"suite", "dataset", "model", "scheme", "budget", "size_bytes", "device", "seed", "status",
                "test_auc", "test_hr10", "train_seconds"}
    assert required <= set(rows[0])
    assert rows[0]["status"] == "ok" and rows[0]["scheme"] == "hashing-trick" and rows[0]["budget"] == "1/4"
    assert 0 <= rows[0]["test_auc"] <= 1
    csv = invoke("results", "--db", str(db), "--csv").output.splitlines()
    assert csv[0].startswith("suite,dataset,model,scheme") and len(csv) == 2
    report = invoke("report", "--db", str(db), "--out", str(tmp_path / "report"))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "report.md").exists()
