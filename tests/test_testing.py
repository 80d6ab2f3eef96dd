"""embbench.testing: the scheme contract as checks that pass on a good scheme, fail by name on a broken one (and
only that check), never stop at the first failure, and plug into pytest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from embbench import registry
from embbench.errors import ConfigError, PluginError
from embbench.schemes import FLOAT_BYTES, FeatureSpec, Scheme, SchemePlan
from embbench.tables import EmbeddingTable, Lookup, TableBackedEmbedding
from embbench.testing import CHECKS, CheckResult, check_name, check_scheme, parametrize_with_checks, scheme_checks

CHECK_NAMES = [check_name(check) for check in CHECKS]


class ModuloLookup(TableBackedEmbedding):
    def __init__(self, rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids, self.rows).unsqueeze(1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        return [self.table.lookup(torch.remainder(ids, self.rows))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0]


class Modulo(Scheme):
    """A toy scheme that keeps the contract: row = ID mod m, m as large as the budget allows."""

    def __init__(self, max_rows: int | None = None) -> None:
        self.max_rows = max_rows

    def stated_size(self, rows: int, dim: int) -> int:
        return rows * dim * FLOAT_BYTES

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        rows = budget_bytes // (feature.dim * FLOAT_BYTES)
        rows = min(rows, self.max_rows) if self.max_rows is not None else rows
        if rows < 1:
            from embbench.errors import BudgetTooSmall

            raise BudgetTooSmall(self.name, budget_bytes, feature.dim * FLOAT_BYTES)
        return SchemePlan(self.name, {"rows": rows}, self.stated_size(rows, feature.dim), budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> torch.nn.Module:
        return ModuloLookup(plan.params["rows"], feature.dim, seed)


class MisstatedSize(Modulo):
    """States 4 bytes fewer than its module stores."""

    def stated_size(self, rows: int, dim: int) -> int:
        return rows * dim * FLOAT_BYTES - 4


class IgnoresSeed(Modulo):
    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> torch.nn.Module:
        return ModuloLookup(plan.params["rows"], feature.dim, 0)


class DoublingLookup(ModuloLookup):
    """Standalone, forward doubles what combine gives, so a collection (which calls combine) disagrees."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(ids)


class Doubling(Modulo):
    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> torch.nn.Module:
        return DoublingLookup(plan.params["rows"], feature.dim, seed)


class PlainLookup(torch.nn.Module):
    def __init__(self, rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(torch.remainder(ids, self.rows))


class PlainModulo(Modulo):
    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> torch.nn.Module:
        return PlainLookup(plan.params["rows"], feature.dim, seed)


def outcomes(results: list[CheckResult]) -> dict[str, CheckResult]:
    assert [result.name for result in results] == CHECK_NAMES  # every check ran, in order
    return {result.name: result for result in results}


def failed(results: list[CheckResult]) -> set[str]:
    return {result.name for result in results if not result.passed}


def test_a_good_toy_scheme_passes_every_check():
    results = outcomes(check_scheme(Modulo()))
    assert not failed(list(results.values())), results
    assert results["collection_matches_standalone"].message.startswith("checked torch/adam, torch/dense-adam")
    assert results["epoch_end_keeps_size"].message.startswith("skipped:")


def test_a_registered_scheme_passes_every_check():
    assert not failed(check_scheme("hashing-trick"))


def test_a_misstated_size_fails_the_size_check_alone_and_says_by_how_much():
    results = outcomes(check_scheme(MisstatedSize()))
    assert failed(list(results.values())) == {"size_accounting"}
    message = results["size_accounting"].message
    assert "budget 1: the plan states" in message and "but the module stores" in message


def test_a_scheme_ignoring_its_seed_fails_the_determinism_check_alone():
    results = check_scheme(IgnoresSeed())
    assert failed(results) == {"determinism"}
    assert "seeds 3 and 4 embed the IDs alike" in outcomes(results)["determinism"].message


def test_a_module_that_embeds_otherwise_standalone_fails_the_collection_check_alone():
    results = check_scheme(Doubling())
    assert failed(results) == {"collection_matches_standalone"}
    assert "torch, adam" in outcomes(results)["collection_matches_standalone"].message


def test_the_collection_check_is_skipped_for_modules_that_are_not_table_backed():
    result = outcomes(check_scheme(PlainModulo()))["collection_matches_standalone"]
    assert result.passed and result.message == "skipped: PlainLookup is not a TableBackedEmbedding"


def test_parameters_that_fix_the_size_skip_the_budget_use_check():
    results = outcomes(check_scheme("hashing-trick", {"rows": 100}))
    assert results["budget_use"].passed and "does not depend on the budget" in results["budget_use"].message


def test_bad_input_raises_before_any_check_runs():
    with pytest.raises(PluginError, match="did you mean 'hashing-trick'"):
        check_scheme("hashing-trik")
    with pytest.raises(ConfigError, match="unknown parameter 'row'"):
        check_scheme("hashing-trick", {"row": 3})
    with pytest.raises(ConfigError, match="rows must be in"):
        check_scheme("hashing-trick", {"rows": 0})
    with pytest.raises(ConfigError, match="dim must be >= 1"):
        check_scheme("hashing-trick", dim=0)
    with pytest.raises(ConfigError, match="configured instance"):
        check_scheme(Modulo(), {"max_rows": 3})


def test_a_broken_plugin_fails_every_check_naming_its_error(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "broken_toy-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-toy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[embbench.schemes]\nbroken-toy = broken_toy_mod:Toy\n")
    (site / "broken_toy_mod.py").write_text("raise ImportError('needs libtoy')\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        registry.discover("schemes", refresh=True)
        results = check_scheme("broken-toy")
    finally:
        sys.path.remove(str(site))
        registry.discover("schemes", refresh=True)
    assert failed(results) == set(CHECK_NAMES)
    assert all("needs libtoy" in result.message for result in results)


def test_scheme_checks_load_nothing_until_a_check_runs():
    checks = list(scheme_checks("no-such-scheme"))
    assert [name for name, _ in checks] == CHECK_NAMES
    with pytest.raises(PluginError, match="unknown scheme 'no-such-scheme'"):
        checks[0][1]()


def test_a_check_returns_a_note_and_raises_assertion_error_on_failure():
    checks = dict(scheme_checks(MisstatedSize()))
    assert checks["forward_shapes"]() == ""
    with pytest.raises(AssertionError, match="but the module stores"):
        checks["size_accounting"]()


def test_parametrize_with_checks_gives_a_case_per_scheme_and_check():
    mark = parametrize_with_checks(["hashing-trick", ("hashing-trick", {"rows": 7}), Modulo()]).mark
    argnames, cases = mark.args
    assert argnames == ("scheme", "check")
    ids = [case.id for case in cases]
    assert ids[: len(CHECK_NAMES)] == [f"hashing-trick-{name}" for name in CHECK_NAMES]
    assert "hashing-trick(rows=7)-loads" in ids and "modulo-gradients" in ids
    assert len(cases) == 3 * len(CHECK_NAMES)


@parametrize_with_checks([Modulo(max_rows=500)])
def test_parametrize_with_checks_runs_in_pytest(scheme, check):
    check()


def test_embbench_testing_imports_without_pytest():
    code = "import sys; sys.modules['pytest'] = None; import embbench, embbench.testing, embbench.registry"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
