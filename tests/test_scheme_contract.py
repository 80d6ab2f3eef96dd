"""The contract every registered scheme keeps, built-in or third-party: shapes, determinism, unseen and
extreme IDs, exact size accounting at budgets 1/2 ... 1/1000, budget use, gradients, index tuples."""

from __future__ import annotations

import pytest
import torch

from embbench import Budget, BudgetTooSmall, FeatureSpec, build_embedding, state_size_bytes
from embbench.registry import create_scheme, list_plugins, list_schemes

SCHEMES = list_schemes()
FRACTIONS = ["1/2", "1/4", "1/8", "1/16", "1/32", "1/64", "1/128", "1/1000"]
FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)
EXTREME_IDS = torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])


def budget_bytes(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def default_budget(name: str) -> str:
    return "1" if name == "full" else "1/4"


def build(name: str, budget: str | None = None, seed: int = 0, feature: FeatureSpec = FEATURE):
    budget = budget or default_budget(name)
    return build_embedding(create_scheme(name), name, feature, budget_bytes(budget, feature), seed)


def test_every_registered_scheme_loads():
    broken = {info.name: info.error for info in list_plugins("schemes") if info.status != "ok"}
    assert not broken


@pytest.mark.parametrize("name", SCHEMES)
def test_forward_maps_int64_ids_to_float_rows(name):
    module, _ = build(name)
    module.eval()
    out = module(torch.tensor([3, 17, 4999]))
    assert out.shape == (3, FEATURE.dim) and out.dtype == torch.float32


@pytest.mark.parametrize("name", SCHEMES)
def test_same_seed_gives_same_embeddings_and_other_seed_differs(name):
    ids = torch.arange(0, 5000, 7)
    first, _ = build(name, seed=3)
    second, _ = build(name, seed=3)
    other, _ = build(name, seed=4)
    for module in (first, second, other):
        module.eval()
    assert torch.equal(first(ids), second(ids))
    assert not torch.equal(first(ids), other(ids))


@pytest.mark.parametrize("name", SCHEMES)
def test_unseen_and_extreme_ids_embed_to_finite_rows(name):
    module, _ = build(name)
    module.eval()
    out = module(EXTREME_IDS)
    assert out.shape == (len(EXTREME_IDS), FEATURE.dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_size_equals_module_state_and_fits_budget_or_names_the_minimum(name):
    built = 0
    for budget in ["1"] if name == "full" else FRACTIONS:
        try:
            module, plan = build(name, budget)
        except BudgetTooSmall as exc:
            assert f"minimum of scheme '{name}'" in str(exc) and exc.minimum_bytes > budget_bytes(budget)
            continue
        built += 1
        assert state_size_bytes(module) == plan.size_bytes
        assert plan.size_bytes <= budget_bytes(budget) == plan.budget_bytes
    assert built >= 1


@pytest.mark.parametrize("name", [n for n in SCHEMES if create_scheme(n).fills_budget])
def test_compressed_schemes_use_at_least_90_percent_of_budget(name):
    feature = FeatureSpec.from_vocabulary("item", 200_000, 32)
    for budget in ["1/2", "1/4", "1/8", "1/16", "1/64"]:
        _, plan = build(name, budget, feature=feature)
        assert plan.size_bytes >= 0.9 * budget_bytes(budget, feature), (budget, plan)


@pytest.mark.parametrize("name", SCHEMES)
def test_gradients_reach_every_parameter(name):
    module, _ = build(name)
    module.train()
    ids = torch.randint(0, 6000, (512,))
    module(ids).pow(2).sum().backward()
    for param_name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", SCHEMES)
def test_ids_with_equal_index_tuples_get_equal_embeddings(name):
    module = None
    for budget in ["1"] if name == "full" else ["1/64", "1/16", "1/4", "1/2"]:  # collisions show at small budgets
        try:
            module, _ = build(name, budget)
            break
        except BudgetTooSmall:
            continue
    assert module is not None
    if not callable(getattr(module, "index_tuples", None)):
        pytest.skip(f"{name} exposes no index_tuples")
    module.eval()
    ids = torch.arange(0, 20000)
    tuples = module.index_tuples(ids)
    assert tuples.dtype == torch.int64 and tuples.shape[0] == len(ids)
    _, inverse = torch.unique(tuples.reshape(len(ids), -1), dim=0, return_inverse=True)
    first_of = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64)
    first_of[inverse.flip(0)] = ids.flip(0)  # the first ID of each tuple group
    with torch.no_grad():
        torch.testing.assert_close(module(ids), module(first_of[inverse]))
