"""Mixed-dimension embeddings: frequent IDs get the larger dims; the size is the hand-counted formula."""

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

from embbench import Budget, ConfigError, FeatureSpec, build_embedding, state_size_bytes
from embbench.registry import create_scheme

NUM_IDS, DIM = 4000, 16
# Zipf-like counts over IDs spaced by 3 (not a contiguous run): the most frequent IDs are the smallest.
SKEWED = FeatureSpec("item", np.arange(NUM_IDS, dtype=np.int64) * 3, (100_000 // np.arange(1, NUM_IDS + 1)) + 1, DIM)


def build(budget: str = "1/2", feature: FeatureSpec = SKEWED, **params):
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme("mixed-dim", **params), "mixed-dim", feature, budget_bytes, 0)


def test_more_frequent_blocks_get_larger_dims():
    module, plan = build()
    dims = plan.params["block_dims"]
    assert dims == sorted(dims, reverse=True) and dims[0] > dims[-1]
    block, _ = module.locate(torch.tensor([0, 3 * (NUM_IDS - 1)]))  # the most and the least frequent ID
    assert block.tolist() == [0, 3]


def test_size_is_tables_projections_and_dictionary_by_hand():
    module, plan = build()
    rows, dims = plan.params["block_rows"], plan.params["block_dims"]
    assert rows == [1000] * 4
    oov_block = 3  # the least popular block has the smallest dim
    tables = sum((n + (i == oov_block)) * d * 4 for i, (n, d) in enumerate(zip(rows, dims, strict=True)))
    projections = sum(d * DIM * 4 for d in dims if d < DIM)
    expected = NUM_IDS * 8 + tables + projections
    assert plan.size_bytes == expected == state_size_bytes(module)


@pytest.mark.parametrize("budget", ["1/2", "1/3", "1/4"])
def test_dims_fill_at_least_90_percent_of_budgets_above_the_dictionary(budget):
    _, plan = build(budget)
    assert 0.9 * plan.budget_bytes <= plan.size_bytes <= plan.budget_bytes


def test_unseen_ids_share_the_oov_row_of_the_smallest_block_and_known_ids_are_distinct():
    module, plan = build()
    block, row = module.locate(torch.tensor([1, -(2**63), 2**63 - 1, 3 * NUM_IDS]))
    assert block.tolist() == [3] * 4 and row.tolist() == [1000] * 4
    tuples = module.index_tuples(torch.as_tensor(SKEWED.ids))
    assert torch.unique(tuples, dim=0).shape[0] == NUM_IDS


def test_alpha_zero_gives_every_block_the_same_dim():
    _, plan = build(alpha=0.0)
    dims = plan.params["block_dims"]
    assert max(dims) - min(dims) <= 1  # equal up to the rounding remainder handed out


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ConfigError, match="alpha must be in"):
        create_scheme("mixed-dim", alpha=2.0)
    with pytest.raises(ConfigError, match="num_blocks must be in"):
        create_scheme("mixed-dim", num_blocks=0)


# inside a collection (one lookup of all tables per batch)

BATCHES = [
    torch.randint(-5, 3 * NUM_IDS + 5, (256,), generator=torch.Generator().manual_seed(0)),
    torch.tensor([0, 3, 1, 3 * (NUM_IDS - 1), -(2**63), 2**63 - 1]),
    torch.arange(0, 60, 3),  # the most frequent IDs only: the other blocks' bags are all empty
]


def test_each_block_table_is_read_with_a_bag_per_id_empty_outside_the_block():
    module, _ = build()
    ids = torch.tensor([0, 3 * (NUM_IDS - 1), 1, 3])
    block_of, row_of = module.locate(ids)
    reads = module.lookups(ids)
    assert [read.table for read in reads] == list(module.tables)
    for block, read in enumerate(reads):
        assert torch.equal(read.lengths, (block_of == block).long())
        assert torch.equal(read.indices, row_of[block_of == block])


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("budget", ["1/2", "3/4"])
def test_embeds_the_same_inside_a_collection(budget, backend, optimizer):
    module, _ = build(budget)
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_a_batch_costs_one_pool_call_per_store(backend, optimizer):
    module, plan = build()
    assert any(dim % 4 for dim in plan.params["block_dims"])  # the fused kernel leaves some to a sparse store
    assert_one_pool_call_per_store(module, BATCHES[0], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("budget", ["1/2", "3/4"])
def test_sgd_step_through_a_collection_matches_a_dense_step(budget, backend):
    module, _ = build(budget)
    probe = torch.cat([torch.arange(-3, 3 * NUM_IDS + 3), BATCHES[1]])
    assert_sgd_step_matches_dense(module, BATCHES[0], probe, backend)
