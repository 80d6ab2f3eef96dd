"""ROBE's defining property: every embedding is d/Z blocks, each a contiguous circular slice of one array."""

from __future__ import annotations

import pytest
import torch
from collection_checks import (
    assert_one_pool_call_per_store,
    assert_same_embeddings_in_collection,
    assert_sgd_step_matches_dense,
    backend_params,
    kernel_params,
)

from embbench import Budget, ConfigError, FeatureSpec, build_embedding
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)


def build(budget: str = "1/64", **params):
    budget_bytes = Budget.parse(budget).resolve(FEATURE.num_ids, FEATURE.dim)
    return build_embedding(create_scheme("robe", **params), "robe", FEATURE, budget_bytes, 0)


@pytest.mark.parametrize("block_size", [16, 4, 5])
def test_embeddings_are_circular_slices_of_the_array_at_the_hashed_offsets(block_size):
    module, plan = build(block_size=block_size)
    array = module.array.weight[:, 0].detach()
    size = plan.params["array_size"]
    ids = torch.tensor([0, 7, 4999, -3, 2**63 - 1])
    offsets = module.index_tuples(ids)
    out = module(ids).detach()
    for block, start in enumerate(range(0, FEATURE.dim, block_size)):
        width = min(block_size, FEATURE.dim - start)
        expected = array[(offsets[:, block : block + 1] + torch.arange(width)) % size]
        torch.testing.assert_close(out[:, start : start + width], expected, rtol=0, atol=0)


def test_a_block_starting_near_the_end_wraps_around_to_the_start():
    module, plan = build()
    size = plan.params["array_size"]
    offsets = module.index_tuples(torch.arange(20000))[:, 0]
    wrapping = torch.nonzero(offsets > size - FEATURE.dim)[0]
    positions = module.positions(wrapping)
    assert positions.min() == 0 and positions.max() == size - 1


def test_array_size_fills_the_budget_and_block_size_defaults_to_the_dim():
    _, plan = build("1/8")
    budget_bytes = Budget.parse("1/8").resolve(FEATURE.num_ids, FEATURE.dim)
    assert plan.params == {"block_size": FEATURE.dim, "array_size": (budget_bytes - 8) // 4, "init": "normal"}


def test_uniform_init_starts_the_array_in_plus_minus_one_over_sqrt_dim_and_is_recorded():
    module, plan = build("1/8", init="uniform")
    values = module.array.weight.detach()
    bound = FEATURE.dim**-0.5
    assert values.abs().max() <= bound and values.abs().max() > 0.99 * bound
    assert plan.notes["init"] == f"uniform(±1/sqrt({FEATURE.dim}))"
    normal, plan = build("1/8")
    assert normal.array.weight.abs().max() < 0.1 and plan.notes["init"] == "normal(0, 0.01^2)"


def test_block_size_out_of_range_is_rejected():
    with pytest.raises(ConfigError, match="block_size must be in"):
        create_scheme("robe", block_size=0)


# inside a collection (one lookup of all tables per batch)

BATCHES = [torch.randint(-50, 6000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


def test_the_array_is_read_once_per_embedding_element():
    module, _ = build(block_size=5)
    ids = torch.tensor([0, 7, 2**63 - 1])
    reads = module.lookups(ids)
    assert module.array.lookups == FEATURE.dim == len(reads) and all(read.table is module.array for read in reads)
    assert torch.equal(torch.stack([read.indices for read in reads], dim=1), module.positions(ids))


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("block_size", [16, 5])
def test_embeds_the_same_inside_a_collection(block_size, backend, optimizer):
    module, _ = build(block_size=block_size)
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_a_batch_costs_one_pool_call_per_store(backend, optimizer):
    module, _ = build(block_size=5)
    assert_one_pool_call_per_store(module, BATCHES[0], backend, optimizer)  # width 1: never in the fused kernel


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("block_size", [16, 5])
def test_sgd_step_through_a_collection_matches_a_dense_step(block_size, backend):
    module, _ = build(block_size=block_size)
    assert_sgd_step_matches_dense(module, BATCHES[0], torch.cat([torch.arange(-10, 5010), BATCHES[1]]), backend)
