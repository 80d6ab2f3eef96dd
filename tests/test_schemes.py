"""Every registered scheme: shapes, determinism, unseen and extreme IDs, exact size accounting, gradients."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from embbench import Budget, BudgetTooSmall, FeatureSpec, build_embedding, full_table_bytes, state_size_bytes
from embbench.registry import create_scheme, list_schemes

BUILTIN = ["full", "hashing-trick", "dhe"]
FRACTIONS = ["1/2", "1/4", "1/8", "1/16", "1/32", "1/64"]
FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)
EXTREME_IDS = torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])


def scheme_budgets(name: str) -> list[str]:
    return ["1"] if name == "full" else FRACTIONS


def build(name: str, budget: str = "1/4", seed: int = 0, feature: FeatureSpec = FEATURE, **params):
    budget = "1" if name == "full" else budget
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme(name, **params), name, feature, budget_bytes, seed)


def test_builtin_schemes_are_registered():
    assert set(BUILTIN) <= set(list_schemes())


@pytest.mark.parametrize("name", BUILTIN)
def test_forward_maps_int64_ids_to_float_rows(name):
    module, _ = build(name)
    module.eval()
    out = module(torch.tensor([3, 17, 4999]))
    assert out.shape == (3, FEATURE.dim) and out.dtype == torch.float32


@pytest.mark.parametrize("name", BUILTIN)
def test_same_seed_gives_same_embeddings_and_other_seed_differs(name):
    ids = torch.arange(0, 5000, 7)
    first, _ = build(name, seed=3)
    second, _ = build(name, seed=3)
    other, _ = build(name, seed=4)
    for m in (first, second, other):
        m.eval()
    assert torch.equal(first(ids), second(ids))
    assert not torch.equal(first(ids), other(ids))


@pytest.mark.parametrize("name", BUILTIN)
def test_unseen_and_extreme_ids_embed_to_finite_rows(name):
    module, _ = build(name)
    module.eval()
    out = module(EXTREME_IDS)
    assert out.shape == (len(EXTREME_IDS), FEATURE.dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BUILTIN)
def test_size_equals_module_state_and_fits_budget(name):
    for budget in scheme_budgets(name):
        budget_bytes = Budget.parse(budget).resolve(FEATURE.num_ids, FEATURE.dim)
        module, plan = build(name, budget)
        assert state_size_bytes(module) == plan.size_bytes
        assert plan.size_bytes <= budget_bytes


@pytest.mark.parametrize("name", ["hashing-trick", "dhe"])
def test_compressed_schemes_use_at_least_90_percent_of_budget(name):
    feature = FeatureSpec.from_vocabulary("item", 200_000, 32)
    for budget in FRACTIONS:
        budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
        _, plan = build(name, budget, feature=feature)
        assert plan.size_bytes >= 0.9 * budget_bytes, (budget, plan)


@pytest.mark.parametrize("name", BUILTIN)
def test_gradients_reach_every_parameter(name):
    module, _ = build(name)
    module.train()
    ids = torch.randint(0, 6000, (256,))
    module(ids).pow(2).sum().backward()
    for param_name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


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


def test_dhe_width_is_the_largest_that_fits():
    dhe = create_scheme("dhe")
    budget_bytes = Budget.parse("1/2").resolve(FEATURE.num_ids, FEATURE.dim)
    plan = dhe.plan(FEATURE, budget_bytes)
    width = plan.params["width"]
    assert dhe.size_bytes(width, FEATURE.dim) <= budget_bytes < dhe.size_bytes(width + 1, FEATURE.dim)


def test_dhe_size_formula_counts_bn_buffers_and_hash_seed():
    # k=4 hashes, width 3, 2 hidden layers, d=2: Linear 4->3, BN(3), Linear 3->3, BN(3), Linear 3->2.
    dhe = create_scheme("dhe", num_hashes=4, hidden_layers=2, width=3)
    linear = (4 * 3 + 3) + (3 * 3 + 3) + (3 * 2 + 2)
    batch_norm = 2 * (4 * 3 * 4 + 8)
    assert dhe.size_bytes(3, 2) == linear * 4 + batch_norm + 8


def test_dhe_encodings_of_a_million_ids_are_distinct_and_in_range():
    module, _ = build("dhe", "1/2")
    encoder = module.encoder
    keys, low, high = [], 1.0, -1.0
    for chunk in torch.arange(1_000_000, dtype=torch.int64).split(32768):
        code = encoder(chunk)
        low, high = min(low, code.min().item()), max(high, code.max().item())
        keys.append(code[:, :4].clone())
    assert -1.0 <= low and high <= 1.0
    # Rows that differ in their first four coordinates differ; four 1e6-bucket hashes all agree by chance
    # for a pair with probability 1e-24, so distinct prefixes prove distinct encodings.
    assert torch.cat(keys).unique(dim=0).shape[0] == 1_000_000


def test_dhe_gaussian_encoding_is_standard_normal_like():
    module, _ = build("dhe", "1/2", encoding="gaussian")
    code = module.encoder(torch.arange(20000))
    assert abs(code.mean().item()) < 0.02 and abs(code.std().item() - 1) < 0.02


@pytest.mark.parametrize("params, message", [
    ({"num_hashes": 0}, "num_hashes must be in"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"encoding": "gaussian", "num_hashes": 5}, "must be even"),
])
def test_dhe_rejects_bad_hyper_parameters(params, message):
    from embbench.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        create_scheme("dhe", **params)


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
