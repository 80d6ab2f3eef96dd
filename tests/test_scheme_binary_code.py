"""`binary-code`: unique bit-block tuples for every ID under both block strategies, the paper's fixed block
length and the budget-solved blocks, pooling, and exact sizes."""

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
from embbench_plugins.schemes.binary_code import (
    binary_code_bits,
    budget_block_lengths,
    code_bit_layout,
    mix_word,
    multiply_modulo,
)

from embbench import Budget, BudgetTooSmall, FeatureSpec, build_embedding
from embbench.measure.collisions import collision_stats
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)
LARGE = FeatureSpec.from_vocabulary("item", 100_000, 16)
FRACTIONS = ["1/2", "1/4", "1/8", "1/16", "1/32", "1/64", "1/128", "1/1000"]


def build(budget="1/4", feature=FEATURE, seed=0, **params):
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme("binary-code", **params), "binary-code", feature, budget_bytes, seed)


@pytest.mark.parametrize("strategy", ["succession", "skip"])
def test_every_id_gets_its_own_block_tuple_at_every_budget(strategy):
    for budget in FRACTIONS:
        module, plan = build(budget, LARGE, strategy=strategy)
        stats = collision_stats(module, np.arange(LARGE.num_ids))
        assert stats.collision_fraction == 0.0 and stats.distinct_tuples == LARGE.num_ids, budget
        assert plan.size_bytes >= 0.9 * plan.budget_bytes, budget


def test_succession_and_skip_give_different_unique_tuples_from_the_same_blocks():
    succession, first = build("1/16", strategy="succession")
    skip, second = build("1/16", strategy="skip")
    assert first.params["block_lengths"] == second.params["block_lengths"]
    ids = torch.arange(FEATURE.num_ids)
    assert not torch.equal(succession.index_tuples(ids), skip.index_tuples(ids))
    for module in (succession, skip):
        assert torch.unique(module.index_tuples(ids), dim=0).shape[0] == FEATURE.num_ids


def test_succession_takes_consecutive_bits_and_skip_deals_them_in_turn():
    assert code_bit_layout([3, 2], "succession") == ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    assert code_bit_layout([3, 2], "skip") == ([0, 1, 0, 1, 0], [0, 0, 1, 1, 2])


def test_block_values_are_the_code_bits_read_as_numbers():
    module, _ = build("1/4", block_bits=4, strategy="succession")  # 13-bit codes: blocks of 4, 4, 4, 1 bits
    ids = torch.arange(FEATURE.num_ids)
    code = mix_word(module.index(ids), 0, 13)
    expected = torch.stack([code & 15, (code >> 4) & 15, (code >> 8) & 15, (code >> 12) & 1], dim=1)
    assert torch.equal(module.index_tuples(ids), expected)


@pytest.mark.parametrize("width", [1, 5, 14, 31, 32, 40, 62])
@pytest.mark.parametrize("word", [0, 1])
def test_each_code_word_is_a_bijection_of_the_dense_indices(width, word):
    dense = torch.arange(min(1 << width, 1 << 14))
    mixed = mix_word(dense, word, width)
    assert mixed.unique().numel() == len(dense) and mixed.min() >= 0 and mixed.max() < 2**width
    if width <= 14:  # the whole range: every value is hit exactly once
        assert sorted(mixed.tolist()) == list(range(1 << width))


def test_multiplication_modulo_a_power_of_two_is_exact_in_int64():
    generator = torch.Generator().manual_seed(0)
    for width in [20, 31, 45, 62]:
        values = torch.randint(0, 2**width, (200,), generator=generator, dtype=torch.int64)
        multiplier = (0x94D049BB133111EB >> (64 - width)) | 1
        expected = [int(v) * multiplier % 2**width for v in values]
        assert multiply_modulo(values, multiplier, width).tolist() == expected


def test_codes_longer_than_one_word_keep_ids_unique():
    bits = binary_code_bits(torch.arange(100_001), 100)
    assert bits.shape == (100_001, 100) and set(bits.unique().tolist()) == {0, 1}
    assert torch.unique(bits[:, 62:], dim=0).shape[0] > 99_000  # the second word varies with the index too


def test_paper_block_length_sizes_by_hand():
    _, plan = build("1/2", LARGE, block_bits=4)  # 100,001 indices: 17 bits -> blocks 4, 4, 4, 4, 1
    assert plan.params["block_lengths"] == [4, 4, 4, 4, 1] and plan.params["code_bits"] == 17
    assert plan.size_bytes == 8 + (4 * 16 + 2) * LARGE.dim * 4


def test_budget_solved_sizes_by_hand():
    feature = FeatureSpec.from_vocabulary("item", 99, 4)  # 100 indices: 7-bit codes; 16-byte rows
    scheme = create_scheme("binary-code")
    roomy = scheme.plan(feature, 8 + 100 * 16)  # 100 rows = 64 + 32 + 4
    assert roomy.params["block_lengths"] == [6, 5, 2] and roomy.size_bytes == 8 + 100 * 16
    tight = scheme.plan(feature, 8 + 14 * 16)  # 14 rows = 8 + 4 + 2 is 6 bits; splitting 8 into 4 + 4 gives 7
    assert tight.params["block_lengths"] == [2, 2, 2, 1] and tight.size_bytes == 8 + 14 * 16
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'binary-code': 232 bytes"):
        scheme.plan(feature, 8 + 13 * 16)


def test_solved_blocks_fill_the_rows_with_codes_long_enough():
    for rows, needed_bits in [(14, 7), (100, 7), (3320, 18), (10**6, 20), (2**31 - 1, 31), (2**30 + 2**29 + 7, 31)]:
        lengths = budget_block_lengths(rows, needed_bits)
        assert sum(lengths) >= needed_bits and 0.9 * rows <= sum(1 << t for t in lengths) <= rows


def test_sparse_vocabulary_stores_its_dictionary_and_unseen_ids_share_one_tuple():
    ids = np.array([-(2**63), -7, 3, 2**62, 2**63 - 1], dtype=np.int64)
    feature = FeatureSpec("item", ids, np.ones(5, dtype=np.int64), 4)
    module, plan = build_embedding(create_scheme("binary-code"), "binary-code", feature, 1000, 0)
    assert plan.notes["vocabulary_bytes"] == 8 + 5 * 8  # spread over all of int64: the first ID and 5 IDs
    unseen = torch.tensor([-(2**63) + 1, 0, 4, 2**63 - 2])
    tuples = module.index_tuples(torch.cat([torch.as_tensor(ids), unseen]))
    assert torch.unique(tuples, dim=0).shape[0] == 6 and torch.equal(tuples[5], tuples[-1])


def test_shared_table_and_one_table_per_block_have_equal_size_and_sum_the_block_rows():
    shared, first = build("1/16", shared_table=True)
    separate, second = build("1/16", shared_table=False)
    assert first.size_bytes == second.size_bytes
    ids = torch.arange(0, FEATURE.num_ids, 7)
    blocks = shared.index_tuples(ids)
    torch.testing.assert_close(shared(ids), shared.table.weight[blocks + shared.block_starts].sum(1))
    expected = sum(table.weight[blocks[:, block]] for block, table in enumerate(separate.tables))
    torch.testing.assert_close(separate(ids), expected)


def test_mean_fusion_divides_the_sum_by_the_block_count():
    summed, _ = build("1/16", fusion="sum")
    averaged, _ = build("1/16", fusion="mean")
    ids = torch.arange(100)
    torch.testing.assert_close(averaged(ids), summed(ids) / summed.index_tuples(ids).shape[1])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"strategy": "random"}, "strategy"),
        ({"block_bits": 0}, "block_bits"),
        ({"block_bits": 32}, "block_bits"),
        ({"fusion": "concat"}, "fusion"),
        ({"shared_table": "yes"}, "shared_table"),
    ],
)
def test_bad_hyper_parameters_name_the_parameter(params, named):
    with pytest.raises(Exception, match=named):
        create_scheme("binary-code", **params)


# inside a collection (one lookup of all tables per batch)

COLLECTION_CASES = {
    "shared": {},
    "separate-mean": {"shared_table": False, "fusion": "mean"},
    "skip-blocks-of-4": {"strategy": "skip", "block_bits": 4},
}
BATCHES = [torch.randint(-50, 6000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("case", list(COLLECTION_CASES))
def test_embeds_the_same_inside_a_collection(case, backend, optimizer):
    module, _ = build("1/16", **COLLECTION_CASES[case])
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("case", list(COLLECTION_CASES))
def test_a_batch_costs_one_pool_call_per_store(case, backend, optimizer):
    module, _ = build("1/16", **COLLECTION_CASES[case])
    assert_one_pool_call_per_store(module, BATCHES[0], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(COLLECTION_CASES))
def test_sgd_step_through_a_collection_matches_a_dense_step(case, backend):
    module, _ = build("1/16", **COLLECTION_CASES[case])
    assert_sgd_step_matches_dense(module, BATCHES[0], torch.cat([torch.arange(-10, 5010), BATCHES[1]]), backend)
