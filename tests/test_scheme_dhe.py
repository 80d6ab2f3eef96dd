"""`dhe`: width solved from the budget, size formula, encodings of the paper (Kang et al., KDD 2021)."""

from __future__ import annotations

import pytest
import torch

from embbench import Budget, FeatureSpec, build_embedding
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)


def build(name: str, budget: str = "1/4", seed: int = 0, feature: FeatureSpec = FEATURE, **params):
    budget = "1" if name == "full" else budget
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme(name, **params), name, feature, budget_bytes, seed)


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
