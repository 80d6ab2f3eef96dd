"""Table initialisation: the suite's `init` setting starts every embedding table from N(0, std^2) or
U(±scale/sqrt(width)), seeded per table; auxiliary tables keep theirs; the default keeps finished cells' keys."""

from __future__ import annotations

import pytest
import torch

from embbench import EmbeddingTable, TableInit, initialise_tables
from embbench.run.execute import build_model
from embbench.run.sweep import load_suite, prepare
from embbench.tables import initial_weights

DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 120, num_items = 80, interactions_per_user = 5 }\n'
BODY = 'epochs = 1\nbudgets = ["1/4"]\n' + DATA + '[[models]]\nname = "gmf"\n'


def test_normal_init_is_bit_identical_to_the_schemes_default():
    table = EmbeddingTable(50, 8, seed=7, init_std=0.03)
    assert torch.equal(table.weight.detach(), initial_weights(50, 8, 7, 0.03))
    assert torch.equal(TableInit("normal", 0.03).weights(50, 8, 7), initial_weights(50, 8, 7, 0.03))


def test_uniform_init_fills_its_bound_and_is_seeded():
    rows = TableInit("uniform", scale=2.0).weights(4000, 16, seed=3)
    bound = 2.0 / 16**0.5
    assert rows.abs().max() <= bound
    assert rows.abs().max() > 0.99 * bound  # reaches the bound: not a narrower law
    assert abs(rows.std().item() - bound / 3**0.5) < 0.01  # the std of U(-b, b)
    assert torch.equal(rows, TableInit("uniform", scale=2.0).weights(4000, 16, seed=3))
    assert TableInit("uniform", fan=64).weights(100, 8, seed=3).abs().max() <= 1 / 8  # the fan's bound, not 8's
    assert not torch.equal(rows, TableInit("uniform", scale=2.0).weights(4000, 16, seed=4))


def test_initialise_tables_leaves_auxiliary_tables_alone():
    module = torch.nn.ModuleDict({
        "rows": EmbeddingTable(30, 4, seed=1),
        "importance": EmbeddingTable(30, 2, seed=2, init_std=0.5, auxiliary=True),
    })
    before = module["importance"].weight.detach().clone()
    assert initialise_tables(module, TableInit("uniform")) == 1
    assert module["rows"].weight.abs().max() > 0.1  # N(0, 0.01^2) never reaches 0.1 in 120 draws
    assert torch.equal(module["importance"].weight.detach(), before)


@pytest.mark.parametrize("scheme", ["hashing-trick", "compositional"])
def test_suite_init_reaches_every_table_of_the_model(tmp_path, scheme):
    path = tmp_path / "s.toml"
    path.write_text('init = "uniform"\n' + BODY + f'[[schemes]]\nname = "{scheme}"\n')
    prepared = prepare(load_suite(path, False), None)
    run = prepared.runs[0]
    model = build_model(run, prepared.task, prepared.data[run.trained.dataset.label])
    tables = [m for m in model.modules() if isinstance(m, EmbeddingTable)]
    assert tables
    for table in tables:
        bound = 1.0 / 32**0.5  # the embedding dimension's, whatever the table's width
        assert table.weight.abs().max() <= bound
        assert table.weight.abs().max() > 0.9 * bound


def test_default_init_keeps_cell_keys_and_a_chosen_one_changes_them(tmp_path):
    keys = {}
    for name, head in (("default", ""), ("scheme", 'init = "scheme"\n'), ("normal", 'init = "normal"\n')):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "suite.toml"  # one suite name: the file name
        path.write_text(head + BODY + '[[schemes]]\nname = "hashing-trick"\n')
        cell = prepare(load_suite(path, False), None).cells[0]
        keys[name] = cell.key
        assert ("init" in cell.identity()) == (name == "normal")
    assert keys["default"] == keys["scheme"] != keys["normal"]
