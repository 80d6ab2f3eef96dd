"""TT-Rec's defining property: the module's rows are the rows of the table the cores' contraction defines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embbench import Budget, ConfigError, FeatureSpec, build_embedding
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 500, 16)


def build(budget: str = "1/8", feature: FeatureSpec = FEATURE, **params):
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme("tt-rec", **params), "tt-rec", feature, budget_bytes, 0)


def reconstruct(module) -> torch.Tensor:
    """The full [prod v_i, d] table from the cores, by one einsum over all of them."""
    cores = [core.detach().permute(1, 0, 2, 3) for core in module.cores]  # [r_{i-1}, v_i, d_i, r_i]
    letters = "abcdefgh"
    terms = [f"{letters[i]}{'ijklmnop'[i]}{'qrstuvwx'[i]}{letters[i + 1]}" for i in range(len(cores))]
    rows, dims = "ijklmnop"[: len(cores)], "qrstuvwx"[: len(cores)]
    table = torch.einsum(f"{','.join(terms)}->{rows}{dims}", *cores)
    return table.reshape(math.prod(module.row_factors), math.prod(module.dim_factors))


@pytest.mark.parametrize("num_cores", [2, 3, 4])
@pytest.mark.parametrize("mapping", ["hash", "vocabulary"])
def test_every_index_embeds_to_its_row_of_the_reconstructed_table(num_cores, mapping):
    module, _ = build("1/2", num_cores=num_cores, mapping=mapping)
    ids = torch.arange(-5, 520)
    with torch.no_grad():
        table = reconstruct(module)
        torch.testing.assert_close(module(ids), table[module.index_tuples(ids)[:, 0]])
        torch.testing.assert_close(module.full_table(), table)


def test_vocabulary_mapping_gives_each_training_id_its_own_index_and_unseen_ids_index_n():
    feature = FeatureSpec("item", np.array([-9, 4, 2**62]), np.ones(3, dtype=np.int64), 8)
    module, plan = build("1/2", feature=feature, mapping="vocabulary")
    index = module.index_tuples(torch.tensor([-9, 4, 2**62, 5, -(2**63)]))[:, 0]
    assert index.tolist() == [0, 1, 2, 3, 3]
    assert plan.params["index_size"] == 4 and math.prod(plan.params["row_factors"]) >= 4


def test_size_is_the_cores_and_the_mapping():
    _, plan = build("1/8")
    v, d, r = plan.params["row_factors"], plan.params["dim_factors"], [1, *plan.params["ranks"], 1]
    floats = sum(r[i] * v[i] * d[i] * r[i + 1] for i in range(3))
    assert plan.size_bytes == floats * 4 + 8
    assert math.prod(d) == FEATURE.dim and math.prod(v) >= 4 * (FEATURE.num_ids + 1)


def test_initial_embeddings_have_the_target_spread():
    module, _ = build("1/2", feature=FeatureSpec.from_vocabulary("item", 20000, 16))
    with torch.no_grad():
        std = module(torch.arange(20000)).std().item()
    assert 0.005 < std < 0.02


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ConfigError, match="num_cores must be in"):
        create_scheme("tt-rec", num_cores=1)
    with pytest.raises(ConfigError, match="mapping must be one of"):
        create_scheme("tt-rec", mapping="dense")
