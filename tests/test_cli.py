"""The command line: JSON contracts, and bad input as one clear line with exit code 2 and no database."""

from __future__ import annotations

import json

import pytest
from cli_checks import assert_one_line_error, invoke

SMALL_DATA = 'params = { num_users = 120, num_items = 80, interactions_per_user = 6 }'


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


def test_size_answers_what_a_suite_cell_with_the_same_settings_runs():
    result = invoke("size", "hashing-trick", "--vocab", "1000", "--dim", "32", "--budget", "64MB", "--json")
    data = json.loads(result.output)
    # a byte budget above the full table is capped at the full table, as in a suite cell
    assert data["budget_bytes"] == data["full_bytes"] == (1000 + 1) * 32 * 4 + 1000 * 8
    assert data["unseen_ids"] == "collided" and data["notes"] == {}


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
    plans = json.loads(rows[0]["plan_json"])  # every feature's plan, with how it embeds unseen IDs
    assert set(plans) == {"user", "item"} and plans["user"]["unseen"] == "collided"
    assert rows[0]["table_kernel"] == "sparse" and rows[0]["embedding_optimizer"] == "adam"
    assert rows[0]["table_optimizer_bytes"] > 0
    csv = invoke("results", "--db", str(db), "--csv").output.splitlines()
    assert csv[0].startswith("suite,dataset,model,scheme") and len(csv) == 2
    report = invoke("report", "--db", str(db), "--out", str(tmp_path / "report"))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "report.md").exists()


# -- embbench check -----------------------------------------------------------------------------------------------

MISSTATED_SCHEME = '''
import torch
from embbench import FLOAT_BYTES, EmbeddingTable, Scheme, SchemePlan


class Lookup(torch.nn.Module):
    def __init__(self, rows, dim, seed):
        super().__init__()
        self.rows = rows
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def forward(self, ids):
        return self.table(torch.remainder(ids, self.rows))


class Misstated(Scheme):
    def plan(self, feature, budget_bytes):
        rows = budget_bytes // (feature.dim * FLOAT_BYTES)
        return SchemePlan(self.name, {"rows": rows}, rows * feature.dim * FLOAT_BYTES - 4, budget_bytes)

    def build(self, feature, plan, seed):
        return Lookup(plan.params["rows"], feature.dim, seed)
'''


@pytest.fixture
def misstated_plugin(tmp_path, monkeypatch):
    """A third-party scheme 'misstated', installed as pip would, whose stated size is 4 bytes short."""
    import sys

    from embbench import registry

    site = tmp_path / "site"
    info = site / "misstated-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: misstated\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[embbench.schemes]\nmisstated = misstated_mod:Misstated\n")
    (site / "misstated_mod.py").write_text(MISSTATED_SCHEME)
    monkeypatch.syspath_prepend(str(site))
    registry.discover("schemes", refresh=True)
    yield "misstated"
    sys.path.remove(str(site))
    registry.discover("schemes", refresh=True)


def check_lines(result) -> list[list[str]]:
    return [line.split(None, 3) for line in result.output.splitlines() if line.strip()]


def test_check_passes_a_good_scheme_with_one_line_per_check():
    from embbench.testing import CHECKS, check_name

    result = invoke("check", "hashing-trick")
    assert result.exit_code == 0, result.output
    lines = check_lines(result)
    assert [line[1] for line in lines] == [check_name(check) for check in CHECKS]
    assert all(line[0] == "PASS" and line[2] == "[defaults]" for line in lines)


def test_check_runs_the_defaults_and_then_the_given_parameters():
    result = invoke("check", "hashing-trick", "--param", "rows=100", "--dim", "8")
    assert result.exit_code == 0, result.output
    labels = [line[2] for line in check_lines(result)]
    half = len(labels) // 2
    assert labels == ["[defaults]"] * half + ["[rows=100]"] * half


def test_check_json_contract():
    result = invoke("check", "hashing-trick", "--param", "rows=100", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert all(set(row) == {"scheme", "params", "check", "passed", "message"} for row in rows)
    assert {json.dumps(row["params"]) for row in rows} == {"{}", '{"rows": 100}'}
    assert all(row["scheme"] == "hashing-trick" and row["passed"] for row in rows)


def test_check_fails_with_exit_1_naming_the_check_and_the_reason(misstated_plugin):
    result = invoke("check", misstated_plugin)
    assert result.exit_code == 1, result.output
    failing = [line for line in check_lines(result) if line[0] == "FAIL"]
    assert [line[1] for line in failing] == ["size_accounting"]
    assert "the plan states" in failing[0][3] and "but the module stores" in failing[0][3]
    assert len(check_lines(result)) > 1  # the other checks still ran


def test_check_unknown_scheme_is_one_line_with_a_suggestion():
    result = invoke("check", "hashing-trik")
    assert_one_line_error(result, "unknown scheme 'hashing-trik'", "did you mean 'hashing-trick'")


def test_check_malformed_param_is_one_line():
    result = invoke("check", "hashing-trick", "--param", "rows")
    assert_one_line_error(result, "--param 'rows' must look like KEY=VALUE")


def test_check_invalid_param_value_is_one_line():
    result = invoke("check", "hashing-trick", "--param", "rows=0")
    assert_one_line_error(result, "scheme 'hashing-trick'", "rows must be")
    assert_one_line_error(invoke("check", "dhe", "--param", "num_hash=3"), "did you mean 'num_hashes'")


def test_check_dim_below_one_is_one_line():
    assert_one_line_error(invoke("check", "hashing-trick", "--dim", "0"), "dim must be >= 1")


def test_a_warning_is_one_line_without_file_or_source(monkeypatch):
    import warnings

    from embbench import registry

    def warns(*args, **kwargs):
        warnings.warn("rebuilding the split cache /x: checksum of\ntrain.parquet differs", UserWarning, stacklevel=2)
        return []

    monkeypatch.setattr(registry, "list_plugins", warns)
    result = invoke("list", "schemes")  # output holds stderr too
    lines = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert lines == ["warning: rebuilding the split cache /x: checksum of train.parquet differs"], result.output
    assert ".py:" not in result.output and "UserWarning" not in result.output
