"""Every shipped suite parses (with and without --quick) and, where its data is here, passes the runner's full
validation: plugin names, hyper-parameters, data files and every scheme's plan at every budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from embbench import registry
from embbench.bags import select_bags
from embbench.data import features_of, prepare_split
from embbench.errors import BudgetTooSmall
from embbench.run.suites import builtin_suites, parse_suite
from embbench.run.sweep import prepare
from embbench.schemes import Budget

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHIPPED = sorted(builtin_suites())
# Folder of each real dataset in ../shared/data; synthetic data needs none.
DATA_FOLDERS = {"movielens-100k": "movielens-100k", "movielens-1m": "movielens-1m",
                "movielens-latest": "movielens-latest-small", "criteo": "criteo-sample", "avazu": "avazu-sample",
                "amazon-reviews": "amazon-musical-instruments-5core"}
GENERATED = {"synthetic", "synthetic-ctr"}
PAPER_SUITES = ("dhe-paper-budgets", "dhe-paper-ablations", "bh-paper", "efficiency", "peer-cce-ml1m")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One split cache for this module: each dataset is split once, not once per suite."""
    return tmp_path_factory.mktemp("shipped-suites-cache")


def data_available(name: str) -> bool:
    datasets = {entry.name for entry in parse_suite(builtin_suites()[name]).datasets}
    folders = [DATA_FOLDERS.get(dataset) for dataset in datasets - GENERATED]
    return all(folder is not None and (SHARED_DATA / folder).is_dir() for folder in folders)


def test_the_paper_suites_are_shipped() -> None:
    assert set(PAPER_SUITES) <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_suite_parses_with_and_without_quick(name: str) -> None:
    path = builtin_suites()[name]
    full, quick = parse_suite(path), parse_suite(path, quick=True)
    assert full.name == quick.name == name
    assert len(quick.cells()) <= len(full.cells())
    assert quick.settings["epochs"] <= full.settings["epochs"]


@pytest.mark.parametrize("name", PAPER_SUITES)
def test_paper_suite_cites_what_it_reproduces(name: str) -> None:
    suite = parse_suite(builtin_suites()[name])
    assert suite.reference and suite.description
    assert suite.quick, "a paper suite has a [quick] profile"
    assert len(parse_suite(builtin_suites()[name], quick=True).settings["seeds"]) == 1


@pytest.mark.parametrize("name", SHIPPED)
def test_suite_passes_the_runners_validation(
    name: str, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not data_available(name):
        pytest.skip(f"the data of suite '{name}' is not in {SHARED_DATA}")
    monkeypatch.setenv("EMBBENCH_CACHE_DIR", str(shared_cache))
    for quick in (False, True):
        prepared = prepare(name, data_dir=SHARED_DATA, quick=quick)
        assert prepared.cells and all(
            set(run.plans) == set(select_bags(prepared.data[run.trained.dataset.label], run.trained["bags"]).features)
            for run in prepared.runs
        )


def test_ablation_labels_name_one_change_each() -> None:
    suite = parse_suite(builtin_suites()["dhe-paper-ablations"])
    dhe = {entry.label: entry.params for entry in suite.schemes if entry.name == "dhe"}
    assert {f"dhe-k{2 ** power}" for power in range(1, 12) if power != 10} <= set(dhe)
    assert {"dhe-enc-gaussian", "dhe-enc-identity", "dhe-enc-binary", "dhe-enc-random-fourier"} <= set(dhe)
    assert {"dhe-arch-pyramid", "dhe-arch-inverted-pyramid", "dhe-arch-residual", "dhe-arch-densenet"} <= set(dhe)
    # No configuration is trained twice under two labels.
    keys = [cell.key for cell in suite.cells()]
    assert len(keys) == len(set(keys))


def test_bh_paper_per_entry_budgets_are_needed(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """binary-code and compositional stop at 1/16 on the synthetic data: their ID dictionary exceeds 1/100."""
    monkeypatch.setenv("EMBBENCH_CACHE_DIR", str(shared_cache))
    suite = parse_suite(builtin_suites()["bh-paper"])
    assert "1/1000" in suite.settings["budgets"]
    synthetic = next(entry for entry in suite.datasets if entry.name == "synthetic")
    split = prepare_split(registry.create("datasets", "synthetic", **synthetic.params))
    features = features_of(split, suite.settings["dim"])
    for entry in suite.schemes:
        if entry.name in ("binary-code", "compositional"):
            assert "1/100" not in entry.budgets
            scheme = registry.create("schemes", entry.name, **entry.params)
            item = features["item"]
            with pytest.raises(BudgetTooSmall):
                scheme.plan(item, Budget.parse("1/100").resolve(item.num_ids, item.dim))
