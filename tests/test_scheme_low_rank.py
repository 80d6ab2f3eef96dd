"""Low-rank tables: the embeddings are A[rows] @ B of rank at most r; a row per training ID through the dictionary
at the largest rank that fits, hashed rows of rank ``min_rank`` below that; exact sizes; overrides."""

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

from embbench import Budget, ConfigError, FeatureSpec, VocabularyIndex, build_embedding, state_size_bytes
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)
LARGE = FeatureSpec.from_vocabulary("item", 200_000, 32)


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(budget: str = "1/8", feature: FeatureSpec = FEATURE, seed: int = 0, **params):
    return build_embedding(create_scheme("low-rank", **params), "low-rank", feature, budget_of(budget, feature), seed)


def plan(budget: str, feature: FeatureSpec = LARGE, **params):
    return create_scheme("low-rank", **params).plan(feature, budget_of(budget, feature))


# the defining property


@pytest.mark.parametrize(("budget", "mapping"), [("1/8", "dictionary"), ("1/64", "hash")])
def test_embeddings_of_all_known_ids_are_a_rows_times_b_of_rank_at_most_r(budget, mapping):
    module, plan = build(budget)
    assert plan.params["mapping"] == mapping
    rank = plan.params["rank"]
    assert 1 <= rank < FEATURE.dim
    with torch.no_grad():  # move A and B away from their start, so the property is not one of the initialisation
        module.factors.weight.add_(torch.randn(module.factors.weight.shape, generator=torch.Generator().manual_seed(1)))
        module.projection.mul_(3.0)
    ids = torch.arange(FEATURE.num_ids)
    with torch.no_grad():
        embeddings = module(ids)
        expected = module.factors.weight[module.rows(ids)] @ module.projection
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=0)
    singular = torch.linalg.svdvals(embeddings.double())  # fp32 products: the rest is rounding noise
    assert singular[rank - 1] > 1e-3 * singular[0] and singular[rank] < 1e-5 * singular[0]


def test_initial_embeddings_have_the_tables_std_of_0_01():
    module, plan = build("1/2")
    with torch.no_grad():
        std = module(torch.arange(FEATURE.num_ids)).std().item()
    assert plan.params["rank"] > 4 and 0.009 < std < 0.011


# the dictionary regime: a row per training ID


def test_a_row_per_training_id_and_one_for_unseen_ids_at_the_largest_rank_that_fits():
    module, plan = build("1/8")
    rank, n, d = plan.params["rank"], FEATURE.num_ids, FEATURE.dim
    dictionary = VocabularyIndex.size_bytes(FEATURE.ids)  # 0..4999: a run, 8 bytes
    assert plan.params["rows"] == module.factors.num_rows == n + 1
    assert plan.size_bytes == state_size_bytes(module) == (n + 1) * rank * 4 + rank * d * 4 + dictionary
    assert (n + 1 + d) * (rank + 1) * 4 + dictionary > budget_of("1/8")  # one rank more would not fit
    assert plan.unseen == "dedicated"
    rows = module.rows(torch.tensor([0, 4999, 5000, -1, 2**63 - 1]))
    assert rows.tolist() == [0, 4999, n, n, n]  # unseen IDs share the out-of-vocabulary row, no known ID's


@pytest.mark.parametrize(("budget", "rank"), [("1/2", 16), ("1/4", 8), ("1/8", 4), ("1/16", 2)])
def test_rank_halves_with_the_budget_and_uses_more_than_90_percent_of_it(budget, rank):
    resolved = plan(budget)
    assert resolved.params["mapping"] == "dictionary" and resolved.params["rank"] == rank
    assert 0.9 <= resolved.size_bytes / resolved.budget_bytes <= 1


def test_a_fixed_rank_keeps_the_dictionary_where_it_fits():
    resolved = plan("1/4", rank=3)
    assert resolved.params["mapping"] == "dictionary" and resolved.params["rank"] == 3


# the hashed regime


def test_below_min_rank_per_id_ids_are_hashed_into_the_rows_the_budget_holds_at_min_rank():
    module, plan = build("1/64")
    rows, rank, d = plan.params["rows"], plan.params["rank"], FEATURE.dim
    assert plan.params["mapping"] == "hash" and rank == 2 and rows < FEATURE.num_ids
    assert plan.size_bytes == state_size_bytes(module) == (rows + d) * rank * 4 + 8
    assert plan.size_bytes > plan.budget_bytes - rank * 4  # one more row would not fit
    assert plan.unseen == "collided"
    tuples = module.index_tuples(torch.arange(FEATURE.num_ids))
    assert tuples.shape == (FEATURE.num_ids, 1) and int(tuples.max()) < rows


def test_a_higher_min_rank_hashes_sooner():
    assert plan("1/16").params["mapping"] == "dictionary"  # rank 2 per ID fits at 1/16
    resolved = plan("1/16", min_rank=4)
    assert resolved.params["mapping"] == "hash" and resolved.params["rank"] == 4


def test_given_rows_are_hashed_and_the_rank_solved_for_them():
    resolved = plan("1/16", rows=1000)
    rank = resolved.params["rank"]
    assert resolved.params["mapping"] == "hash" and resolved.params["rows"] == 1000 and rank == LARGE.dim
    resolved = plan("1/256", feature=FEATURE, rows=50)
    rank = resolved.params["rank"]
    assert 1 < rank < FEATURE.dim
    assert (50 + 16) * (rank + 1) * 4 + 8 > resolved.budget_bytes >= resolved.size_bytes == (50 + 16) * rank * 4 + 8


def test_given_rows_and_rank_fix_the_size():
    sizes = {plan(budget, rows=500, rank=4).size_bytes for budget in ("1/2", "1/64")}
    assert sizes == {(500 + 32) * 4 * 4 + 8}


# errors


def test_a_budget_below_one_hashed_row_raises_budget_too_small_naming_the_minimum():
    scheme = create_scheme("low-rank")
    with pytest.raises(ConfigError, match=r"minimum of scheme 'low-rank'.*one hashed row of rank 2"):
        scheme.plan(FEATURE, (1 + 16) * 2 * 4 + 8 - 1)


def test_a_rank_above_the_dim_is_an_error():
    with pytest.raises(ConfigError, match="rank 17 exceeds the embedding dim 16"):
        create_scheme("low-rank", rank=17).plan(FEATURE, budget_of("1"))


@pytest.mark.parametrize(("params", "message"), [
    ({"rank": 0}, "rank must be in"),
    ({"rows": 0}, "rows must be in"),
    ({"min_rank": 0}, "min_rank must be in"),
])
def test_hyper_parameters_out_of_range_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        create_scheme("low-rank", **params)


# inside a collection

BATCHES = [torch.randint(-50, 6000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("budget", ["1/4", "1/64"])
def test_embeds_the_same_inside_a_collection(budget, backend, optimizer):
    module, _ = build(budget)
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_a_batch_costs_one_pool_call_per_store(backend, optimizer):
    module, _ = build("1/4")
    assert_one_pool_call_per_store(module, BATCHES[0], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("budget", ["1/4", "1/64"])
def test_sgd_step_through_a_collection_matches_a_dense_step(budget, backend):
    module, _ = build(budget)
    assert_sgd_step_matches_dense(module, BATCHES[0], torch.cat([torch.arange(-10, 5010), BATCHES[1]]), backend)
