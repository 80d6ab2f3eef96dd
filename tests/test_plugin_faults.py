"""A third-party scheme that raises anything — an exception or sys.exit — in plan() or build() is one clean
line (plan: the suite or the command is refused) or one failed cell (build: the sweep goes on)."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from embbench import registry
from embbench.cli import main
from embbench.run.store import ResultStore

FAULTY = '''
import sys
import torch
from embbench import FLOAT_BYTES, EmbeddingTable, Scheme, SchemePlan

FAULT = {fault!r}


def fail():
    if FAULT == "exit":
        sys.exit("plugin gave up")
    raise {error}("plugin bug")


class Faulty(Scheme):
    def plan(self, feature, budget_bytes):
        if {in_plan}:
            fail()
        rows = max(1, min(feature.vocabulary, budget_bytes // (feature.dim * FLOAT_BYTES)))
        return SchemePlan(self.name, {{"rows": rows}}, rows * feature.dim * FLOAT_BYTES, budget_bytes)

    def build(self, feature, plan, seed):
        fail()
'''
SUITE = (
    'epochs = 1\nlatency_batch_sizes = []\nbudgets = ["1/4"]\n[[datasets]]\nname = "synthetic"\n'
    "params = { num_users = 60, num_items = 40, interactions_per_user = 5 }\n"
    '[[models]]\nname = "gmf"\n[[schemes]]\nname = "faulty"\n[[schemes]]\nname = "hashing-trick"\n'
)


def install(tmp_path, monkeypatch, fault: str, in_plan: bool) -> None:
    site = tmp_path / "site"
    info = site / "faulty-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faulty\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[embbench.schemes]\nfaulty = faulty_mod:Faulty\n")
    error = {"exit": "RuntimeError", "runtime": "RuntimeError", "key": "KeyError"}[fault]
    (site / "faulty_mod.py").write_text(FAULTY.format(fault=fault, error=error, in_plan=in_plan))
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("faulty_mod", None)
    registry.discover("schemes", refresh=True)


@pytest.fixture(autouse=True)
def _forget_the_plugin():
    yield
    sys.modules.pop("faulty_mod", None)
    registry.discover("schemes", refresh=True)


@pytest.mark.parametrize("fault", ["exit", "runtime", "key"])
def test_a_plan_that_raises_anything_is_one_line_in_size_and_in_run(tmp_path, monkeypatch, fault):
    install(tmp_path, monkeypatch, fault, in_plan=True)
    size = CliRunner().invoke(main, ["size", "faulty", "--vocab", "1000", "--dim", "8", "--budget", "1/4"])
    assert size.exit_code == 2 and size.output.startswith("error: "), size.output
    assert "scheme 'faulty' failed to plan" in size.output and len(size.output.strip().splitlines()) == 1
    path, db = tmp_path / "suite.toml", tmp_path / "r.sqlite"
    path.write_text(SUITE)
    run = CliRunner().invoke(main, ["run", "suite", str(path), "--db", str(db), "--no-progress"])
    lines = [line for line in run.output.splitlines() if line.strip()]
    assert run.exit_code == 2 and len(lines) == 1 and "scheme 'faulty' failed to plan" in lines[0], run.output
    assert not db.exists()


@pytest.mark.parametrize("fault", ["exit", "runtime"])
def test_a_build_that_raises_anything_fails_its_cell_and_the_sweep_goes_on(tmp_path, monkeypatch, fault):
    install(tmp_path, monkeypatch, fault, in_plan=False)
    path, db = tmp_path / "suite.toml", tmp_path / "r.sqlite"
    path.write_text(SUITE)
    run = CliRunner().invoke(main, ["run", "suite", str(path), "--db", str(db), "--no-progress"])
    assert run.exit_code == 1, run.output  # some cells failed
    frame = ResultStore(db).frame().set_index("scheme")
    assert frame.loc["faulty", "status"] == "failed"
    assert ("plugin gave up" if fault == "exit" else "RuntimeError: plugin bug") in frame.loc["faulty", "error"]
    assert frame.loc["hashing-trick", "status"] == "ok"
