"""The plugin's own tests: registered, sized exactly, and rows follow ID mod m."""

import torch

from embbench import Budget, FeatureSpec, build_embedding, state_size_bytes
from embbench.registry import create_scheme, list_schemes


def test_registered_through_entry_point():
    assert "modulo" in list_schemes()


def test_size_is_exact_and_within_budget():
    feature = FeatureSpec.from_vocabulary("item", 1000, 8)
    budget = Budget.parse("1/4").resolve(feature.num_ids, feature.dim)
    module, plan = build_embedding(create_scheme("modulo"), "modulo", feature, budget, seed=0)
    assert state_size_bytes(module) == plan.size_bytes <= budget


def test_ids_congruent_modulo_rows_share_a_row():
    feature = FeatureSpec.from_vocabulary("item", 1000, 8)
    module, plan = build_embedding(create_scheme("modulo", max_rows=10), "modulo", feature, 10**6, seed=0)
    out = module(torch.tensor([3, 13, -7]))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
