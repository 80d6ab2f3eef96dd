"""The suite settings table drives parsing, validation, cell identity and writing a suite back: a suite with
every axis off its default round-trips through its TOML text and through its stored cells' configurations."""

from __future__ import annotations

import json

import pytest

from embbench.errors import ConfigError
from embbench.run.settings import AXIS, SETTINGS
from embbench.run.suites import configuration_toml, parse_suite, suite_toml

EVERY_AXIS_OFF_DEFAULT = """
name = "round-trip"
description = "every setting off its default"
reference = "none"
task = "rating-classification"
dim = 16
init = "normal"
init_std = 0.02
init_scale = 0.5
embedding_optimizers = ["sgd", "adam"]
embedding_learning_rate = 0.05
epochs = 7
batch_size = 256
learning_rate = 0.002
num_negatives = 3
patience = 4
weight_decay = 0.01
early_stopping = "logloss"
optimizer = "adam"
lr_schedule = "reduce-on-plateau"
lr_plateau_factor = 0.25
lr_plateau_patience = 2
target_val_metric = 0.45
budget_split = "equal"
split = "global-temporal"
validation_fraction = 0.15
test_fraction = 0.2
bags = ["genres"]
bag_mode = "sum"
budgets = ["1/2", "64MB"]
devices = ["cpu", "cuda"]
backends = ["torch", "torchrec"]
shardings = ["table-wise", "row-wise"]
seeds = [3, 4]
precisions = ["fp32", "int8"]
latency_batch_sizes = [1, 64]

[[datasets]]
name = "movielens-100k"
label = "ml"
params = { variant = "x" }

[[models]]
name = "mlp"
params = { hidden = [16, 8] }

[[schemes]]
name = "full"
budgets = ["1"]

[[schemes]]
name = "dhe"
label = "dhe-k8"
params = { num_hashes = 8 }

[quick]
epochs = 1
seeds = [3]
"""


def test_the_table_covers_every_top_level_key_and_each_axis_has_a_cell_name():
    assert all(s.cell_name for s in SETTINGS if s.role == AXIS)
    assert len({s.cell_name for s in SETTINGS if s.role == AXIS}) == len([s for s in SETTINGS if s.role == AXIS])


def test_a_suite_with_every_axis_off_its_default_round_trips_through_its_text(tmp_path):
    original_path = tmp_path / "a.toml"
    original_path.write_text(EVERY_AXIS_OFF_DEFAULT)
    original = parse_suite(original_path)
    at_default = [s.name for s in SETTINGS if s.role != "meta" and original.settings[s.name] == s.default]
    assert not at_default
    written = tmp_path / "b.toml"
    written.write_text(suite_toml(original))
    again = parse_suite(written)
    assert again.settings == original.settings and again.quick == original.quick
    assert [c.key for c in again.cells()] == [c.key for c in original.cells()]
    assert (again.name, again.description, again.reference) == (original.name, original.description, original.reference)
    quick = parse_suite(written, quick=True)
    assert quick.settings["epochs"] == 1 and quick.settings["seeds"] == [3]


def test_stored_configurations_write_back_a_suite_that_runs_the_same_cells(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(EVERY_AXIS_OFF_DEFAULT)
    cells = parse_suite(path).cells()
    configs = [json.loads(json.dumps(cell.config())) for cell in cells]  # as stored and read back
    rebuilt = tmp_path / "round-trip.toml"
    rebuilt.write_text(configuration_toml("round-trip", configs))
    again = parse_suite(rebuilt)
    assert sorted(c.key for c in again.cells()) == sorted(c.key for c in cells)


def test_the_embedding_learning_rate_default_follows_each_cells_optimizer(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'learning_rate = 0.003\nembedding_optimizers = ["adam", "rowwise-adagrad"]\n'
        '[[datasets]]\nname = "synthetic"\n[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n'
    )
    rates = {c["embedding_optimizer"]: c["embedding_learning_rate"] for c in parse_suite(path).cells()}
    assert rates == {"adam": 0.003, "rowwise-adagrad": 0.01}


@pytest.mark.parametrize(
    "line, message",
    [
        ('seeds = [0, 0]', "'seeds' lists 0 twice"),
        ('budgets = ["1/2", "0.5"]', "'budgets' lists '0.5' twice"),
        ('learning_rate = nan', "'learning_rate': must be a finite number"),
        ('embedding_learning_rate = inf', "'embedding_learning_rate': must be a finite number"),
        ('dim = 1.5', "'dim': must be an integer, got float 1.5"),
        ('epochs = true', "'epochs': must be an integer, got bool True"),
        ('dim = 1000000000000', "'dim': must be in [1, 65536]"),
        ('seeds = [4611686018427387904]', "'seeds'[0]: must be in [0, 2147483647]"),
        ('devices = ["tpu"]', "unknown device 'tpu'"),
        ('embedding_optimizers = ["adamw"]', "unknown embedding_optimizer 'adamw' (did you mean 'adam'?)"),
        ('budgets = []', "'budgets' must not be empty"),
        ('budgets = ["1.2.3MB"]', "budget '1.2.3MB'"),
        ('budgets = [".MB"]', "budget '.MB'"),
        ('budgets = ["1e400"]', "more than the full table"),
        ('budgets = ["' + "9" * 400 + 'MB"]', "too large"),
        ('budgets = ["2"]', "a fraction is at most 1"),
        ('embedding_optimizer = "adam"', "unknown key 'embedding_optimizer' in the top level (did you mean "
                                         "'embedding_optimizers'?)"),
    ],
)
def test_bad_values_are_one_error_naming_the_file_and_the_setting(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(line + '\n[[datasets]]\nname = "synthetic"\n[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n')
    with pytest.raises(ConfigError) as raised:
        parse_suite(path)
    text = str(raised.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_quick_accepts_the_same_keys_in_both_parses(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('[quick]\ntask = "ctr"\n[[datasets]]\nname = "synthetic"\n[[models]]\nname = "gmf"\n'
                    '[[schemes]]\nname = "full"\n')
    for quick in (False, True):
        with pytest.raises(ConfigError, match=r"unknown key 'task' in \[quick\]"):
            parse_suite(path, quick=quick)


def test_a_suite_file_that_is_not_utf8_or_nested_too_deeply_is_one_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_suite(path)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError):
        parse_suite(deep)
