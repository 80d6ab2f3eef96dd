"""`compositional`: unique mixed-radix row tuples for every ID (quotient-remainder for k = 2), the combining
operations as dlrm's QREmbeddingBag defines them, and exact sizes solved from the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from embbench_plugins.schemes.compositional import balanced_sizes

from embbench import Budget, BudgetTooSmall, FeatureSpec, build_embedding, state_size_bytes
from embbench.measure.collisions import collision_stats
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)
LARGE = FeatureSpec.from_vocabulary("item", 100_000, 16)
FRACTIONS = ["1/2", "1/4", "1/8", "1/16", "1/32", "1/64", "1/128", "1/1000"]


def build(budget="1/4", feature=FEATURE, seed=0, **params):
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme("compositional", **params), "compositional", feature, budget_bytes, seed)


def weights(module, position):
    return module.tables[position].weight.detach()


@pytest.mark.parametrize("num_partitions", [2, 3, None])
def test_every_id_gets_its_own_row_tuple_at_every_feasible_budget(num_partitions):
    built = 0
    for budget in FRACTIONS:
        try:
            module, _ = build(budget, LARGE, num_partitions=num_partitions)
        except BudgetTooSmall:
            continue
        built += 1
        stats = collision_stats(module, np.arange(LARGE.num_ids + 50))  # 50 unseen IDs share the OOV tuple
        assert stats.colliding_ids == 50 and stats.distinct_tuples == LARGE.num_ids + 1, budget
        assert collision_stats(module, np.arange(LARGE.num_ids)).collision_fraction == 0.0
    assert built >= 6


def test_one_partition_with_mult_is_a_plain_table():
    module, plan = build("1", num_partitions=1, operation="mult")
    full, _ = build_embedding(create_scheme("full"), "full", FEATURE, plan.budget_bytes, 0)
    assert plan.params["partition_sizes"] == [FEATURE.num_ids + 1]
    ids = torch.tensor([0, 7, 4999, 5000, -3, 2**63 - 1])
    torch.testing.assert_close(module(ids), full(ids), rtol=0, atol=0)


def test_quotient_remainder_mult_is_dlrm_qr_formula():
    module, plan = build("1/16", num_partitions=2, operation="mult")
    remainder_rows, quotient_rows = plan.params["partition_sizes"]
    ids = torch.arange(FEATURE.num_ids)
    expected = weights(module, 1)[ids // remainder_rows] * weights(module, 0)[ids % remainder_rows]
    torch.testing.assert_close(module(ids), expected)
    assert quotient_rows == -(-(FEATURE.num_ids + 1) // remainder_rows)


def test_add_sums_the_partition_rows():
    module, plan = build("1/16", num_partitions=3, operation="add")
    first, second, _ = plan.params["partition_sizes"]
    ids = torch.arange(FEATURE.num_ids)
    expected = (
        weights(module, 0)[ids % first]
        + weights(module, 1)[(ids // first) % second]
        + weights(module, 2)[ids // (first * second)]
    )
    out = module(ids)
    assert out.shape == (FEATURE.num_ids, FEATURE.dim)
    torch.testing.assert_close(out, expected)


def test_concat_joins_partition_rows_of_the_given_dims():
    module, plan = build("1/16", num_partitions=2, operation="concat", dims=[4, 12])
    remainder_rows = plan.params["partition_sizes"][0]
    assert [table.dim for table in module.tables] == [4, 12]
    ids = torch.arange(0, FEATURE.num_ids, 3)
    out = module(ids)
    assert out.shape == (len(ids), FEATURE.dim)
    torch.testing.assert_close(out[:, :4], weights(module, 0)[ids % remainder_rows])
    torch.testing.assert_close(out[:, 4:], weights(module, 1)[ids // remainder_rows])


def test_concat_splits_the_dim_equally_by_default():
    _, plan = build("1/16", num_partitions=3, operation="concat")
    assert plan.params["partition_dims"] == [6, 5, 5]


def test_sizes_by_hand_for_a_contiguous_vocabulary():
    feature = FeatureSpec.from_vocabulary("item", 99, 4)  # 100 indices, 16-byte rows, 8-byte vocabulary start
    scheme = create_scheme("compositional", num_partitions=2)
    smallest = scheme.plan(feature, 8 + 20 * 16)
    assert smallest.params["partition_sizes"] == [10, 10] and smallest.size_bytes == 328
    grown = scheme.plan(feature, 1000)  # the remainder table takes the spare rows: 60 + ceil(100 / 60)
    assert grown.params["partition_sizes"] == [60, 2] and grown.size_bytes == 8 + 62 * 16
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'compositional': 328 bytes"):
        scheme.plan(feature, 327)


def test_sizes_by_hand_count_the_id_dictionary_of_a_sparse_vocabulary():
    ids = np.arange(0, 99 * 5, 5, dtype=np.int64)
    feature = FeatureSpec("item", ids, np.ones(99, dtype=np.int64), 4)
    module, plan = build_embedding(create_scheme("compositional", num_partitions=2), "compositional", feature, 2000, 0)
    first, second = plan.params["partition_sizes"]
    dictionary = 8 + -(-491 // 8)  # a bitmap over IDs 0..490 and the first ID: cheaper than 99 offsets
    assert plan.size_bytes == dictionary + (first + second) * 16 == state_size_bytes(module)
    assert (first, second) == (100, 1)  # the budget holds a remainder table of every index: a full table


def test_unseen_ids_share_the_one_extra_index():
    ids = np.array([-(2**63), -7, 3, 2**62, 2**63 - 1], dtype=np.int64)
    feature = FeatureSpec("item", ids, np.ones(5, dtype=np.int64), 4)
    module, _ = build_embedding(create_scheme("compositional", num_partitions=2), "compositional", feature, 10**4, 0)
    assert module.index(torch.as_tensor(ids)).tolist() == [0, 1, 2, 3, 4]
    unseen = torch.tensor([-(2**63) + 1, 0, 4, 2**63 - 2])
    assert module.index(unseen).tolist() == [5, 5, 5, 5]
    tuples = module.index_tuples(torch.cat([torch.as_tensor(ids), unseen]))
    assert torch.unique(tuples, dim=0).shape[0] == 6


def test_contiguous_vocabulary_maps_extreme_ids_without_overflow():
    feature = FeatureSpec("item", np.arange(2**63 - 10, 2**63 - 1, dtype=np.int64), np.ones(9, dtype=np.int64), 4)
    module, plan = build_embedding(create_scheme("compositional"), "compositional", feature, 10**4, 0)
    assert plan.notes["vocabulary_bytes"] == 8
    ids = torch.tensor([2**63 - 10, 2**63 - 2, 2**63 - 1, -(2**63), 0])
    assert module.index(ids).tolist() == [0, 8, 9, 9, 9]


def test_unset_num_partitions_takes_more_partitions_only_when_two_do_not_fit():
    _, roomy = build("1/16")
    _, tight = build("1/64")
    assert roomy.params["num_partitions"] == 2
    assert tight.params["num_partitions"] == 3 and tight.size_bytes >= 0.9 * tight.budget_bytes


def test_balanced_sizes_are_near_equal_and_cover_the_indices():
    for num_indices in [1, 2, 99, 100, 5001, 200_001]:
        for count in [1, 2, 3, 5]:
            sizes = balanced_sizes(num_indices, count)
            assert np.prod(sizes) >= num_indices and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 17}, "num_partitions"),
        ({"operation": "max"}, "operation"),
        ({"operation": "add", "dims": [8, 8]}, "dims"),
        ({"operation": "concat", "num_partitions": 3, "dims": [8, 8]}, "dims"),
    ],
)
def test_bad_hyper_parameters_name_the_parameter(params, named):
    with pytest.raises(Exception, match=named):
        create_scheme("compositional", **params)


def test_concat_dims_must_sum_to_the_embedding_dim():
    with pytest.raises(ValueError, match="dims must sum to the embedding dim 16"):
        create_scheme("compositional", operation="concat", dims=[4, 4]).plan(FEATURE, 10**6)
