"""The hashing-family table schemes: multi-hashing, double-hashing, bloom, hash-embedding, hybrid-hashing —
each one's defining property and its size by hand-computed formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from collection_checks import (
    assert_one_pool_call_per_store,
    assert_same_embeddings_in_collection,
    assert_sgd_step_matches_dense,
    backend_params,
    kernel_params,
)

from embbench import BudgetTooSmall, EmbeddingTable, FeatureSpec, build_embedding, state_size_bytes
from embbench.registry import create_scheme, get_plugin

FEATURE = FeatureSpec.from_vocabulary("item", 1000, 8)
IDS = torch.tensor([0, 5, 999, 1000, -7, 2**63 - 1, -(2**63), 123456789012])


def scheme_class(name: str) -> type:
    return get_plugin("schemes", name)


def build(name: str, budget_bytes: int, seed: int = 0, feature: FeatureSpec = FEATURE, **params):
    return build_embedding(create_scheme(name, **params), name, feature, budget_bytes, seed)


def tables_of(module: torch.nn.Module) -> list[EmbeddingTable]:
    return [m for m in module.modules() if isinstance(m, EmbeddingTable)]


# multi-hashing and double-hashing


def test_multi_hashing_with_one_hash_equals_the_hashing_trick():
    single, single_plan = build("multi-hashing", 20_000, seed=5, num_hashes=1)
    trick, trick_plan = build("hashing-trick", 20_000, seed=5)
    assert single_plan.params["rows"] == trick_plan.params["rows"] and single_plan.size_bytes == trick_plan.size_bytes
    assert torch.equal(single.index_tuples(IDS), trick.index_tuples(IDS))
    torch.testing.assert_close(single(IDS), trick(IDS), rtol=0, atol=0)


def test_multi_hashing_sums_one_row_from_each_of_its_k_tables():
    module, plan = build("multi-hashing", 40_000, num_hashes=3)
    tables = tables_of(module)
    assert len(tables) == 3 and all(t.num_rows == plan.params["rows"] for t in tables)
    rows = module.index_tuples(IDS)
    expected = sum(table.weight[rows[:, j]] for j, table in enumerate(tables))
    torch.testing.assert_close(module(IDS), expected)


def test_multi_hashing_mean_divides_the_sum_by_k():
    summed, _ = build("multi-hashing", 40_000, num_hashes=3)
    averaged, _ = build("multi-hashing", 40_000, num_hashes=3, combiner="mean")
    torch.testing.assert_close(averaged(IDS), summed(IDS) / 3)


def test_multi_hashing_concat_splits_the_dimension_across_the_tables():
    module, plan = build("multi-hashing", 40_000, num_hashes=3, combiner="concat")
    tables = tables_of(module)
    assert [t.dim for t in tables] == [3, 3, 2]
    rows = module.index_tuples(IDS)
    expected = torch.cat([table.weight[rows[:, j]] for j, table in enumerate(tables)], dim=1)
    torch.testing.assert_close(module(IDS), expected)
    assert plan.size_bytes == plan.params["rows"] * 8 * 4 + 8


def test_multi_hashing_shared_uses_one_table_and_order_free_index_tuples():
    module, _ = build("multi-hashing", 40_000, num_hashes=3, shared=True)
    assert len(tables_of(module)) == 1
    tuples = module.index_tuples(torch.arange(5000))
    assert torch.equal(tuples, tuples.sort(dim=1).values)


def test_multi_hashing_size_by_formula():
    budget = 10_000
    module, plan = build("multi-hashing", budget)
    rows = (budget - 8) // (2 * 8 * 4)  # two tables of 8 floats a row, one 8-byte hash seed
    assert plan.params["rows"] == rows
    assert plan.size_bytes == state_size_bytes(module) == rows * 2 * 8 * 4 + 8


def test_double_hashing_is_multi_hashing_with_two_tables():
    double, double_plan = build("double-hashing", 30_000, seed=2)
    multi, multi_plan = build("multi-hashing", 30_000, seed=2, num_hashes=2)
    assert double_plan.params == multi_plan.params
    assert len(tables_of(double)) == 2
    torch.testing.assert_close(double(IDS), multi(IDS), rtol=0, atol=0)


def test_multi_hashing_rejects_bad_hyper_parameters_by_name():
    with pytest.raises(ValueError, match="num_hashes"):
        scheme_class("multi-hashing")(num_hashes=0)
    with pytest.raises(ValueError, match="combiner"):
        scheme_class("multi-hashing")(combiner="max")
    with pytest.raises(ValueError, match="combiner"):
        scheme_class("multi-hashing")(shared=True, combiner="concat")
    with pytest.raises(ValueError, match="num_hashes"):
        build("multi-hashing", 40_000, num_hashes=9, combiner="concat")  # 9 tables cannot split dim 8


def test_budget_below_the_minimum_names_it():
    with pytest.raises(BudgetTooSmall) as raised:
        build("double-hashing", 50)
    assert raised.value.minimum_bytes == 2 * 8 * 4 + 8


# bloom


def test_bloom_sums_k_rows_of_one_shared_table():
    module, plan = build("bloom", 20_000, num_hashes=3)
    (table,) = tables_of(module)
    assert table.num_rows == plan.params["rows"] == (20_000 - 8) // (8 * 4)
    rows = module.hash(IDS)
    assert rows.min() >= 0 and rows.max() < table.num_rows
    torch.testing.assert_close(module(IDS), table.weight[rows].sum(dim=1))
    assert plan.size_bytes == state_size_bytes(module) == table.num_rows * 8 * 4 + 8


def test_bloom_gradients_land_only_on_the_hashed_rows_of_its_table():
    module, _ = build("bloom", 20_000)
    ids = torch.tensor([42])
    module(ids).sum().backward()
    (table,) = tables_of(module)
    touched = torch.nonzero(table.weight.grad.abs().sum(dim=1)).flatten()
    assert set(touched.tolist()) == set(module.hash(ids)[0].tolist())


# hash-embedding


def test_hash_embedding_weights_pool_rows_by_importance():
    module, _ = build("hash-embedding", 20_000)
    weights = module.importance_weights(IDS)
    rows = module.pool_hash(IDS)
    expected = (weights.unsqueeze(2) * module.pool.weight[rows]).sum(dim=1)
    torch.testing.assert_close(module(IDS), expected)


def test_hash_embedding_importance_weights_get_gradients():
    module, _ = build("hash-embedding", 20_000)
    module(torch.arange(100)).pow(2).sum().backward()
    assert module.importance.weight.grad is not None and module.importance.weight.grad.abs().sum() > 0


def test_hash_embedding_size_counts_the_importance_table():
    budget = 20_000
    module, plan = build("hash-embedding", budget, num_hashes=3)
    pool_rows, importance_rows = plan.params["pool_rows"], plan.params["importance_rows"]
    assert pool_rows == int((budget - 16) * 0.5) // (8 * 4)
    assert importance_rows == (budget - 16 - pool_rows * 8 * 4) // (3 * 4)
    # the pool (B x d), the importance table (K x k), and two 8-byte hash seeds
    assert plan.size_bytes == state_size_bytes(module) == (pool_rows * 8 + importance_rows * 3) * 4 + 16
    assert module.importance.weight.numel() == importance_rows * 3


def test_hash_embedding_pool_share_moves_bytes_between_pool_and_importance():
    _, small_pool = build("hash-embedding", 20_000, pool_share=0.2)
    _, large_pool = build("hash-embedding", 20_000, pool_share=0.8)
    assert small_pool.params["pool_rows"] < large_pool.params["pool_rows"]
    assert small_pool.params["importance_rows"] > large_pool.params["importance_rows"]
    with pytest.raises(ValueError, match="pool_share"):
        scheme_class("hash-embedding")(pool_share=1.0)


# hybrid-hashing


SKEWED = FeatureSpec(
    "item",
    np.arange(100, 300, dtype=np.int64),
    np.array([(i * 37) % 11 for i in range(200)], dtype=np.int64),  # many ties among counts
    8,
)


def expected_frequent(feature: FeatureSpec, count: int) -> list[int]:
    ranked = sorted(zip(feature.ids.tolist(), feature.counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    return sorted(i for i, _ in ranked[:count])


def test_hybrid_picks_the_most_frequent_ids_with_ties_broken_by_id():
    module, plan = build("hybrid-hashing", 20_000, feature=SKEWED)
    assert plan.params["frequent_ids"] == 20
    assert module.frequent_ids.tolist() == expected_frequent(SKEWED, 20)


def test_hybrid_gives_each_frequent_id_its_own_row_and_hashed_ids_never_land_there():
    module, _ = build("hybrid-hashing", 20_000, feature=SKEWED)
    frequent = module.frequent_ids
    tuples = module.index_tuples(frequent)
    assert torch.equal(tuples[:, 0], -1 - torch.arange(len(frequent))) and (tuples[:, 1] == -1).all()
    torch.testing.assert_close(module(frequent), module.dedicated.weight)
    others = torch.cat([torch.arange(0, 2000), IDS])
    others = others[~torch.isin(others, frequent)]
    assert (module.index_tuples(others) >= 0).all()
    torch.testing.assert_close(module(others), module.hashed(others))


def test_hybrid_size_by_formula():
    budget = 20_000
    module, plan = build("hybrid-hashing", budget, feature=SKEWED)
    frequent = plan.params["frequent_ids"]
    rows = (budget - frequent * (8 * 4 + 8) - 8) // (2 * 8 * 4)
    assert plan.params["rows"] == rows
    # dedicated rows and their int64 dictionary, two hashed tables, one hash seed
    assert plan.size_bytes == state_size_bytes(module) == frequent * (8 * 4 + 8) + rows * 2 * 8 * 4 + 8


def test_hybrid_cuts_the_frequent_set_to_its_share_of_a_small_budget():
    budget = 1_000  # half of it holds 12 frequent IDs of 40 bytes, not the 20 asked for
    module, plan = build("hybrid-hashing", budget, feature=SKEWED)
    assert plan.notes["frequent_ids_requested"] == 20
    assert plan.params["frequent_ids"] == 500 // 40
    assert module.frequent_ids.tolist() == expected_frequent(SKEWED, 12)
    assert plan.size_bytes <= budget


def test_hybrid_without_frequent_ids_is_double_hashing():
    hybrid, _ = build("hybrid-hashing", 20_000, seed=1, frequent_fraction=0.0)
    double, _ = build("double-hashing", 20_000, seed=1)
    assert hybrid.dedicated is None
    torch.testing.assert_close(hybrid(IDS), double(IDS), rtol=0, atol=0)


def test_hybrid_rejects_bad_hyper_parameters_by_name():
    with pytest.raises(ValueError, match="frequent_fraction"):
        scheme_class("hybrid-hashing")(frequent_fraction=1.5)
    with pytest.raises(ValueError, match="max_frequent_share"):
        scheme_class("hybrid-hashing")(max_frequent_share=1.0)


# every hashing-family scheme inside a collection (one lookup of all tables per batch)


COLLECTION_CASES = {
    "multi-hashing": ("multi-hashing", 40_000, FEATURE, {"num_hashes": 3}),
    "multi-hashing-concat": ("multi-hashing", 40_000, FEATURE, {"num_hashes": 3, "combiner": "concat"}),
    "multi-hashing-shared-mean": (
        "multi-hashing", 40_000, FEATURE, {"num_hashes": 3, "shared": True, "combiner": "mean"}
    ),
    "double-hashing": ("double-hashing", 30_000, FEATURE, {}),
    "bloom": ("bloom", 20_000, FEATURE, {"num_hashes": 3}),
    "hash-embedding": ("hash-embedding", 20_000, FEATURE, {}),  # importance rows of width 2: a second store
    "hash-embedding-4": ("hash-embedding", 20_000, FEATURE, {"num_hashes": 4}),
    "hybrid-hashing": ("hybrid-hashing", 20_000, SKEWED, {}),
    "hybrid-hashing-mean": ("hybrid-hashing", 20_000, SKEWED, {"combiner": "mean", "frequent_fraction": 0.3}),
    "hybrid-hashing-concat": ("hybrid-hashing", 20_000, SKEWED, {"combiner": "concat"}),
}


def build_case(case: str):
    name, budget, feature, params = COLLECTION_CASES[case]
    module, _ = build(name, budget, feature=feature, **params)
    return module


def batches_for(case: str) -> list[torch.Tensor]:
    """Random IDs around the vocabulary (for hybrid hashing: frequent and other IDs mixed), and extreme IDs."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(-20, 1200, (256,), generator=generator), IDS, torch.arange(90, 310)]


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("case", list(COLLECTION_CASES))
def test_hashing_schemes_embed_the_same_inside_a_collection(case, backend, optimizer):
    assert_same_embeddings_in_collection(build_case(case), batches_for(case), backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("case", list(COLLECTION_CASES))
def test_hashing_schemes_cost_one_pool_call_per_store(case, backend, optimizer):
    assert_one_pool_call_per_store(build_case(case), batches_for(case)[0], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(COLLECTION_CASES))
def test_hashing_schemes_sgd_step_through_a_collection_matches_a_dense_step(case, backend):
    ids = batches_for(case)[0]
    assert_sgd_step_matches_dense(build_case(case), ids, torch.cat([torch.arange(-20, 1200), IDS]), backend)


def test_hash_embedding_reads_its_pool_once_per_hash_and_weights_the_rows_in_combine():
    module, _ = build("hash-embedding", 20_000, num_hashes=3)
    assert module.pool.lookups == 3 and not module.pool.weighted
    reads = module.lookups(IDS)
    assert [read.table for read in reads] == [module.pool] * 3 + [module.importance]
    assert all(read.weights is None and read.indices.shape == (len(IDS),) for read in reads)


def test_hybrid_reads_each_branch_only_for_the_ids_that_take_it():
    module, _ = build("hybrid-hashing", 20_000, feature=SKEWED)
    ids = torch.cat([module.frequent_ids[:5], torch.tensor([0, 1, 2**63 - 1])])
    frequent = torch.isin(ids, module.frequent_ids)
    *hashed, dedicated = module.lookups(ids)
    assert [read.table for read in hashed] == list(module.hashed.tables) and dedicated.table is module.dedicated
    for read in hashed:
        assert torch.equal(read.lengths, (~frequent).long())
    assert torch.equal(dedicated.lengths, frequent.long())
    module(ids).sum().backward()
    touched = torch.nonzero(module.dedicated.weight.grad.abs().sum(dim=1)).flatten()
    assert touched.tolist() == list(range(5))  # the frequent IDs' rows, and only theirs
