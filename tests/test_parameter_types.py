"""Plugin parameters are checked against the constructor's annotations, and sizes against this machine,
before anything runs: one `error:` line, exit 2, no database."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner

from embbench.cli import main
from embbench.registry import conforms, type_name

SMALL_DATA = "params = { num_users = 40, num_items = 30, interactions_per_user = 5 }"


def run_suite_cli(tmp_path, dataset: str = SMALL_DATA, model: str = 'name = "gmf"',
                  scheme: str = 'name = "hashing-trick"'):
    path = tmp_path / "suite.toml"
    path.write_text(f'epochs = 1\nbudgets = ["1/4"]\n[[datasets]]\nname = "synthetic"\n{dataset}\n'
                    f"[[models]]\n{model}\n[[schemes]]\n{scheme}\n")
    db = tmp_path / "r.sqlite"
    result = CliRunner().invoke(main, ["run", "suite", str(path), "--db", str(db), "--no-progress"])
    return result, db


def assert_refused(result, db, *fragments: str) -> None:
    assert_one_line_error(result, *fragments)
    assert not db.exists()


@pytest.mark.parametrize(
    ("scheme", "fragments"),
    [
        ('name = "hashing-trick"\nparams = { rows = 1.5 }', ("'rows'", "must be an integer or none", "float 1.5")),
        ('name = "dhe"\nparams = { num_hashes = 2.5 }', ("'num_hashes'", "must be an integer", "float 2.5")),
        ('name = "dhe"\nparams = { num_hashes = true }', ("'num_hashes'", "must be an integer", "bool True")),
        ('name = "dhe"\nparams = { num_hashes = "8" }', ("'num_hashes'", "str '8'")),
    ],
)
def test_a_scheme_parameter_of_the_wrong_type_is_refused_before_any_cell(tmp_path, scheme, fragments):
    result, db = run_suite_cli(tmp_path, scheme=scheme)
    assert_refused(result, db, "schemes[0]", *fragments)


def test_a_dataset_cannot_set_the_data_folder_embbench_passes(tmp_path):
    result, db = run_suite_cli(tmp_path, dataset=SMALL_DATA.replace(" }", ', data_dir = "/tmp" }'))
    assert_refused(result, db, "datasets[0]", "'data_dir' is set by embbench (--data-dir)")


def test_a_synthetic_dataset_larger_than_memory_is_refused(tmp_path):
    result, db = run_suite_cli(tmp_path, dataset=f"params = {{ num_users = {2**63 - 1}, interactions_per_user = 5 }}")
    assert_refused(result, db, "datasets[0]", "interactions; at most 200,000,000")


def test_a_layer_wider_than_the_model_takes_is_refused(tmp_path):
    result, db = run_suite_cli(tmp_path, model=f'name = "mlp"\nparams = {{ hidden = [{10**12}] }}')
    assert_refused(result, db, "models[0]", "layer widths in [1, 16,384]")


def test_a_model_whose_layers_exceed_memory_is_refused_without_allocating(tmp_path):
    # 64 layers of 16,384 x 16,384: 69 GB of weights, each layer within bounds; built on the meta device only
    widths = ", ".join(["16384"] * 64)
    result, db = run_suite_cli(tmp_path, model=f'name = "mlp"\nparams = {{ hidden = [{widths}] }}')
    assert_refused(result, db, "models[0]", "bytes of dense parameters", "use smaller layers")


def test_size_refuses_a_vocabulary_it_cannot_list():
    result = CliRunner().invoke(main, ["size", "full", "--vocab", str(10**15), "--dim", "16", "--budget", "1"])
    assert result.exit_code == 2 and result.output.startswith("error: --vocab 1,000,000,000,000,000: "), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [
        (3, int, True), (3.0, int, False), (True, int, False), (3, float, True), (math.nan, float, False),
        (math.inf, float, False), (None, int | None, True), (2.5, int | None, False), ([1, 2], list[int], True),
        ([1, 2.5], list[int], False), ((1, 2), tuple[int, ...], True), ([1, 2], tuple[int, int], True),
        ([1], tuple[int, int], False), ([1, 2], Sequence[int], True), ("sum", Literal["sum", "mult"], True),
        ("max", Literal["sum", "mult"], False), ({"a": 1}, dict[str, int], True), ({"a": "b"}, dict[str, int], False),
        ("x", str, True), (1, str, False), (False, bool, True), (0, bool, False), (object(), "unresolved", True),
    ],
)
def test_values_are_held_to_their_annotation(value, hint, ok):
    assert conforms(value, hint) is ok


def test_annotations_read_as_words():
    assert type_name(int | None) == "an integer or none"
    assert type_name(list[int]) == "a list of integers"
    assert type_name(Literal["sum", "mult"]) == "one of 'sum', 'mult'"
