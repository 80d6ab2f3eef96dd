"""The plugin's own tests: embbench's scheme contract (``embbench.testing``), and rows follow ID mod m."""

import torch

from embbench import FeatureSpec, build_embedding, create_scheme, list_schemes
from embbench.testing import parametrize_with_checks


def test_registered_through_entry_point():
    assert "modulo" in list_schemes()


# Every check of the contract (size accounting, determinism, unseen and extreme IDs, the same embeddings through
# a model's table collection as standalone...), each its own test case, with the defaults and with a parameter.
@parametrize_with_checks(["modulo", ("modulo", {"max_rows": 10})])
def test_keeps_the_scheme_contract(scheme, check):
    check()


def test_ids_congruent_modulo_rows_share_a_row():
    feature = FeatureSpec.from_vocabulary("item", 1000, 8)
    module, plan = build_embedding(create_scheme("modulo", max_rows=10), "modulo", feature, 10**6, seed=0)
    assert plan.params == {"rows": 10}
    out = module(torch.tensor([3, 13, -7, 4]))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert not torch.equal(out[0], out[3])
