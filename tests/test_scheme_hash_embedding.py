"""Hash embeddings: both importance-weight variants (a hashed row of k weights; k weights each drawn by its own
hash from a flat array), their sizes equal to their state, and the pool's initialisation, recorded."""

from __future__ import annotations

import pytest
import torch
from collection_checks import assert_same_embeddings_in_collection, kernel_params

from embbench import ConfigError, FeatureSpec, build_embedding, state_size_bytes
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 1000, 32)
IDS = torch.cat([torch.arange(0, 4000), torch.tensor([-7, 2**63 - 1, -(2**63)])])
BUDGET = 20_000


def build(budget: int = BUDGET, **params):
    return build_embedding(create_scheme("hash-embedding", **params), "hash-embedding", FEATURE, budget, 0)


def test_row_variant_is_the_default_and_gives_ids_sharing_an_importance_row_all_k_weights_alike():
    module, plan = build(num_hashes=3)
    assert plan.params["importance"] == "row" and module.importance.weight.shape == (plan.params["importance_rows"], 3)
    rows = module.importance_hash(IDS)[:, 0]
    weights = module.importance_weights(IDS)
    torch.testing.assert_close(weights, module.importance.weight[rows])
    first, second = next((i, j) for i in range(len(IDS)) for j in range(i + 1, len(IDS)) if rows[i] == rows[j])
    assert torch.equal(weights[first], weights[second])


def test_flat_variant_draws_each_weight_by_its_own_hash_from_one_array():
    module, plan = build(num_hashes=3, importance="flat")
    assert module.importance.weight.shape == (plan.params["importance_rows"], 1)
    positions = module.importance_hash(IDS)  # [N, k]: one position in the flat array per hash
    weights = module.importance_weights(IDS)
    torch.testing.assert_close(weights, module.importance.weight[positions, 0])
    expected = (weights.unsqueeze(2) * module.pool.weight[module.pool_hash(IDS)]).sum(dim=1)
    torch.testing.assert_close(module(IDS), expected)
    # independent per hash: IDs that share their first weight mostly differ in the second
    shared = positions[:, 0].unsqueeze(1) == positions[:, 0].unsqueeze(0)
    shared.fill_diagonal_(False)
    i, j = torch.nonzero(shared).T
    assert len(i) > 100 and (positions[i, 1] != positions[j, 1]).float().mean() > 0.9


def test_flat_weights_get_gradients_and_start_uniform_in_plus_minus_one_when_asked():
    module, plan = build(importance="flat", importance_init="uniform")
    weights = module.importance.weight.detach()
    assert weights.min() >= -1 and weights.max() <= 1 and weights.abs().max() > 0.9
    assert plan.notes["importance_init"] == "uniform(±1)"
    module(torch.arange(100)).pow(2).sum().backward()
    assert module.importance.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("importance", ["row", "flat"])
def test_importance_weights_start_at_one_by_default_so_a_fresh_embedding_sums_its_rows(importance):
    module, plan = build(importance=importance)
    weights = module.importance.weight.detach()
    assert (weights - 1).abs().max() < 0.1 and weights.std() > 0  # 1 + N(0, 0.01^2)
    assert plan.notes["importance_init"] == "1 + normal(0, 0.01^2)"
    rows = module.pool.weight[module.pool_hash(IDS)].sum(dim=1)
    torch.testing.assert_close(module(IDS), rows, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("importance", ["row", "flat"])
@pytest.mark.parametrize("num_hashes", [2, 3])
def test_size_is_the_pool_the_weights_and_two_seeds(importance, num_hashes):
    module, plan = build(num_hashes=num_hashes, importance=importance)
    pool_rows, importance_rows = plan.params["pool_rows"], plan.params["importance_rows"]
    per_row = num_hashes if importance == "row" else 1
    assert pool_rows == int((BUDGET - 16) * 0.5) // (32 * 4)  # the reference's B = P / 2d at pool_share 0.5
    assert importance_rows == (BUDGET - 16 - pool_rows * 32 * 4) // (per_row * 4)
    assert plan.size_bytes == state_size_bytes(module) == (pool_rows * 32 + importance_rows * per_row) * 4 + 16
    assert plan.size_bytes >= 0.99 * BUDGET


def test_pool_starts_uniform_within_one_over_sqrt_dim_by_default_and_normal_when_asked():
    module, plan = build()
    bound = 32**-0.5
    assert module.pool.weight.abs().max() <= bound and module.pool.weight.abs().max() > 0.95 * bound
    assert plan.params["init"] == "uniform" and "uniform" in plan.notes["init"]
    normal, plan = build(init="normal", init_std=0.05)
    assert abs(normal.pool.weight.std().item() - 0.05) < 0.005 and "normal" in plan.notes["init"]


def test_importance_tables_are_auxiliary_so_a_suite_init_leaves_them_alone():
    for importance in ("row", "flat"):
        module, _ = build(importance=importance)
        assert module.importance.auxiliary and not module.pool.auxiliary


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_flat_variant_embeds_the_same_inside_a_collection(backend, optimizer):
    module, _ = build(num_hashes=3, importance="flat")
    batches = [torch.randint(-20, 1200, (256,), generator=torch.Generator().manual_seed(0)), IDS[-50:]]
    assert_same_embeddings_in_collection(module, batches, backend, optimizer)


@pytest.mark.parametrize(("params", "message"), [
    ({"importance": "column"}, "importance"), ({"init": "xavier"}, "init"), ({"init_std": -1.0}, "init_std"),
])
def test_bad_hyper_parameters_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        create_scheme("hash-embedding", **params)
