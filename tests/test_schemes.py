"""The scheme API (budgets, minimums) and the defining properties of `full` and `hashing-trick`; the contract
every scheme keeps is in test_scheme_contract.py."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from embbench import Budget, BudgetTooSmall, FeatureSpec, build_embedding, full_table_bytes
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)


def build(name: str, budget: str = "1/4", seed: int = 0, feature: FeatureSpec = FEATURE, **params):
    budget = "1" if name == "full" else budget
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme(name, **params), name, feature, budget_bytes, seed)


def test_full_reference_size_is_the_full_scheme():
    _, plan = build("full")
    assert plan.size_bytes == full_table_bytes(FEATURE.num_ids, FEATURE.dim)


def test_full_gives_unseen_ids_the_shared_oov_row_and_known_ids_their_own():
    feature = FeatureSpec(
        "item", torch.tensor([-5, 10, 2**62]).numpy(), torch.tensor([1, 1, 1]).numpy(), 4
    )
    module, _ = build("full", feature=feature)
    rows = module.rows(torch.tensor([-5, 10, 2**62, 11, -(2**63), 2**63 - 1]))
    assert rows.tolist() == [0, 1, 2, 3, 3, 3]


def test_budget_below_minimum_names_the_minimum():
    with pytest.raises(BudgetTooSmall, match=r"minimum of scheme 'dhe': [\d,]+ bytes"):
        build("dhe", "64b")
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'full'"):
        build_embedding(create_scheme("full"), "full", FEATURE, 1000, 0)


def test_hashing_trick_rows_fill_the_budget():
    _, plan = build("hashing-trick", "1/4")
    budget_bytes = Budget.parse("1/4").resolve(FEATURE.num_ids, FEATURE.dim)
    assert plan.params["rows"] == (budget_bytes - 8) // (FEATURE.dim * 4)


def test_hashing_trick_collides_ids_and_stays_within_rows():
    module, plan = build("hashing-trick", "1/16")
    rows = module.hash(torch.arange(5000))[:, 0]
    assert rows.min() >= 0 and rows.max() < plan.params["rows"]
    assert rows.unique().numel() < 5000


def test_budget_parsing():
    assert Budget.parse("1/4").fraction == Fraction(1, 4)
    assert Budget.parse(0.5).fraction == Fraction(1, 2)
    assert Budget.parse("64MB").absolute_bytes == 64_000_000
    assert Budget.parse("1.5KiB").absolute_bytes == 1536
    assert Budget.parse("1/4").resolve(100, 8) == full_table_bytes(100, 8) // 4
    from embbench.errors import ConfigError

    for bad in ("abc", "-1/4", "0", "1/0"):
        with pytest.raises(ConfigError):
            Budget.parse(bad)

