"""`dhe-hybrid`: the most frequent IDs get their own rows, every other ID (seen or not) a DHE network's output; one
budget sized for both (Kang et al., KDD 2021, §6 future work)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embbench import Budget, BudgetTooSmall, FeatureSpec, VocabularyIndex, build_embedding, state_size_bytes
from embbench.registry import create_scheme

DIM = 8
# Counts that put the frequent IDs all over the vocabulary, with ties: 1,000 IDs from 10,000 up in steps of 7.
IDS = 10_000 + 7 * np.arange(1000, dtype=np.int64)
COUNTS = (np.arange(1000) * 7919 % 97 + 1).astype(np.int64)
FEATURE = FeatureSpec("item", IDS, COUNTS, DIM)
SMALL_DHE = {"num_hashes": 16, "hidden_layers": 2}


def budget_bytes(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(budget: str = "1/4", seed: int = 0, feature: FeatureSpec = FEATURE, **params):
    scheme = create_scheme("dhe-hybrid", **{**SMALL_DHE, **params})
    return build_embedding(scheme, "dhe-hybrid", feature, budget_bytes(budget, feature), seed)


def head_ids(module) -> torch.Tensor:
    """The head's IDs, in row order, read back from the module's dictionary."""
    rows, head = module.head_rows(torch.as_tensor(IDS))
    found = torch.as_tensor(IDS)[head]
    return found[torch.argsort(rows[head])]


def test_the_head_is_the_most_frequent_ids_with_ties_to_the_smaller_id():
    module, plan = build(head_ids=100)
    order = sorted(range(len(IDS)), key=lambda i: (-COUNTS[i], IDS[i]))
    expected = sorted(int(IDS[i]) for i in order[:100])
    assert plan.params["head_rows"] == 100
    assert head_ids(module).tolist() == expected


def test_a_head_id_embeds_as_its_own_row_whatever_the_dhe_weights():
    module, _ = build()
    module.eval()
    heads = head_ids(module)
    with torch.no_grad():
        before = module(heads)
        torch.testing.assert_close(before, module.head.weight)  # head ID i of the dictionary reads row i
        for parameter in module.tail.parameters():
            parameter.add_(torch.randn_like(parameter))
        assert torch.equal(module(heads), before)


def test_a_tail_id_embeds_as_the_dhe_networks_output_seen_or_unseen():
    module, _ = build()
    module.eval()
    tail_seen = torch.as_tensor(np.setdiff1d(IDS, head_ids(module).numpy()))[:50]
    unseen = torch.tensor([-5, 0, 10_001, 2**40, 2**63 - 1])
    with torch.no_grad():
        for ids in (tail_seen, unseen):
            torch.testing.assert_close(module(ids), module.tail(ids), rtol=0, atol=0)
        before = module(tail_seen)
        for parameter in module.tail.parameters():
            parameter.add_(torch.randn_like(parameter))
        assert not torch.allclose(module(tail_seen), before)


def test_a_mixed_batch_takes_each_id_from_its_own_branch_in_training_too():
    module, _ = build()
    heads = head_ids(module)
    tail = torch.as_tensor(np.setdiff1d(IDS, heads.numpy()))
    ids = torch.cat([heads[:5], tail[:7], heads[5:9]])
    module.train()
    out = module(ids)
    torch.testing.assert_close(out[:5], module.head.weight[:5])
    torch.testing.assert_close(out[12:], module.head.weight[5:9])
    out.pow(2).sum().backward()
    assert module.head.weight.grad[9:].abs().sum() == 0  # rows no ID of the batch reads get no gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.tail.parameters())


def test_a_single_tail_id_in_a_training_batch_still_trains():
    module, _ = build()
    heads = head_ids(module)
    lone = torch.as_tensor(np.setdiff1d(IDS, heads.numpy()))[:1]
    module.train()
    out = module(torch.cat([heads[:3], lone]))
    out.pow(2).sum().backward()
    assert out.shape == (4, DIM) and torch.isfinite(out).all()
    assert module.tail.decoder.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("budget", ["1", "1/2", "1/4", "1/8"])
def test_size_is_head_rows_plus_dictionary_plus_dhe_and_equals_the_state(budget):
    module, plan = build(budget)
    count = plan.params["head_rows"]
    dhe = create_scheme("dhe", **SMALL_DHE)
    expected = (
        count * DIM * 4 + VocabularyIndex.size_bytes(head_ids(module).sort().values.numpy())
        + dhe.size_bytes(plan.params["dhe"]["width"], DIM)
    )
    assert plan.size_bytes == expected == state_size_bytes(module)
    assert plan.size_bytes <= budget_bytes(budget)


@pytest.mark.parametrize("count, encoding", [(100, "sorted"), (800, "bitmap")])
def test_the_dictionary_takes_the_narrowest_exact_encoding(count, encoding):
    # Head IDs spread over about 7,000 possible IDs: 100 of them cost 8 + 2 * 100 bytes as sorted 16-bit offsets,
    # 800 of them less as a bitmap of the span (8 + 7000 / 8 bytes).
    module, plan = build("1", head_ids=count)
    assert module.head_index.encoding == plan.notes["dictionary"] == encoding


@pytest.mark.parametrize("budget", ["1/2", "1/4", "1/8", "1/16"])
def test_the_budget_is_used_and_the_head_takes_at_least_its_share(budget):
    scheme = create_scheme("dhe-hybrid", num_hashes=64, hidden_layers=3, head_share=0.3)
    feature = FeatureSpec.from_vocabulary("item", 50_000, 32)
    allowed = budget_bytes(budget, feature)
    plan = scheme.plan(feature, allowed)
    assert 0.99 * allowed <= plan.size_bytes <= allowed
    row = 32 * 4
    assert plan.notes["head_bytes"] >= 0.3 * allowed - row  # leftover of the width step goes to the head
    assert plan.notes["head_bytes"] + plan.params["dhe_size_bytes"] == plan.size_bytes


def test_head_share_moves_budget_between_the_head_and_the_network():
    small, large = (build("1/4", head_share=share)[1] for share in (0.2, 0.8))
    assert small.params["head_rows"] < large.params["head_rows"]
    assert small.params["dhe"]["width"] > large.params["dhe"]["width"]


def test_head_ids_gives_exactly_that_many_rows_capped_at_the_vocabulary():
    assert build("1/2", head_ids=37)[1].params["head_rows"] == 37
    assert build("1", head_ids=10**9)[1].params["head_rows"] == len(IDS)


@pytest.mark.parametrize("params", [{"head_share": 0.0}, {"head_ids": 0}])
def test_no_head_is_plain_dhe_for_every_id(params):
    module, plan = build("1/4", **params)
    assert plan.params["head_rows"] == 0 and module.head is None
    assert plan.size_bytes == plan.params["dhe_size_bytes"]
    module.eval()
    ids = torch.as_tensor(IDS[:20])
    with torch.no_grad():
        assert torch.equal(module(ids), module.tail(ids))


def test_a_budget_below_head_rows_and_the_smallest_network_names_the_scheme():
    with pytest.raises(BudgetTooSmall, match="scheme 'dhe-hybrid'"):
        build("1/1000")
    with pytest.raises(BudgetTooSmall, match="500 head rows"):
        build("1/4", head_ids=500)


def test_when_the_network_needs_more_than_its_share_the_head_shrinks():
    scheme = create_scheme("dhe-hybrid", **SMALL_DHE, head_share=0.99)
    allowed = budget_bytes("1/8")
    plan = scheme.plan(FEATURE, allowed)
    dhe_minimum = create_scheme("dhe", **SMALL_DHE).size_bytes(1, DIM)
    assert plan.params["dhe_size_bytes"] >= dhe_minimum and plan.size_bytes <= allowed


def test_dhe_parameters_pass_through_and_unset_ones_keep_dhes_defaults():
    plan = build("1/4", encoding="gaussian", architecture="residual", activation="relu")[1]
    assert plan.params["dhe"]["encoding"] == "gaussian" and plan.params["dhe"]["architecture"] == "residual"
    assert plan.params["dhe"]["num_buckets"] == create_scheme("dhe").get_params()["num_buckets"]
    assert create_scheme("dhe-hybrid").plan(FEATURE, budget_bytes("1")).params["dhe"]["num_hashes"] == 1024


def test_the_same_seed_builds_the_same_module_and_unseen_ids_are_generated():
    first, second = (build(seed=5)[0].eval() for _ in range(2))
    ids = torch.tensor([10_000, 10_007, 3, 2**50])
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
    assert create_scheme("dhe-hybrid").unseen_for() == "generated"


@pytest.mark.parametrize("params, message", [
    ({"head_share": 1.0}, "head_share must be in"),
    ({"head_share": -0.1}, "head_share must be in"),
    ({"head_ids": -1}, "head_ids must be >= 0"),
    ({"head_share": 0.5, "head_ids": 10}, "not both"),
    ({"num_hashes": 0}, "num_hashes must be in"),
    ({"activation": "swish"}, "activation must be one of"),
])
def test_invalid_hyper_parameters_are_value_errors_naming_the_parameter(params, message):
    from embbench_plugins.schemes.dhe_hybrid import DHEHybrid

    with pytest.raises(ValueError, match=message):
        DHEHybrid(**params)
