"""CAFE: the size of the tables and the HotSketch (held to the module's state), the plan's split of the budget,
the sketch's Space-Saving buckets, hot IDs found from gradient norms or counts and given rows initialised from
their hashed rows, evictions, the exact top-H hot set kept batch by batch, determinism and state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from embbench_plugins.schemes.cafe import CAFE, CAFELookup, cafe_size_bytes, row_index_bytes

from embbench import Budget, BudgetTooSmall, FeatureSpec, build_embedding, state_size_bytes
from embbench.collection import FeatureEmbeddings, TableTraining
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 2000, 8)


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(budget: str = "1/4", feature: FeatureSpec = FEATURE, seed: int = 0, **params):
    return build_embedding(create_scheme("cafe", **params), "cafe", feature, budget_of(budget, feature), seed)


def lookup(hot_rows: int = 2, hashed_rows: int = 16, buckets: int = 8, bucket_slots: int = 4,
           importance: str = "count", decay: float = 0.8, migrate_every: int = 1, seed: int = 0) -> CAFELookup:
    """A module with no warm start: every ID starts cold."""
    return CAFELookup(hot_rows, hashed_rows, 4, buckets, bucket_slots, importance, decay, migrate_every, seed)


def train_batch(module: CAFELookup, ids: torch.Tensor, loss_of=lambda ids, out: out.pow(2).sum()) -> None:
    module.train()
    out = module(ids)
    loss_of(ids, out).backward()


def hot_ids(module: CAFELookup) -> set[int]:
    rows = module.sketch.slot_rows.view(-1)
    return set(module.sketch.slot_ids.view(-1)[rows != module.hot_rows].tolist())


def assert_consistent(module: CAFELookup) -> None:
    """Hot rows are distinct, at most H, each owned by one slot, and the reverse map agrees."""
    sketch = module.sketch
    rows = sketch.slot_rows.view(-1).to(torch.int64)
    owned = rows[rows != module.hot_rows]
    assert len(owned) <= module.hot_rows and len(torch.unique(owned)) == len(owned)
    expected = copy.deepcopy(sketch)
    expected.rebuild_slot_of_row()
    assert torch.equal(expected.slot_of_row, sketch.slot_of_row)
    occupied = sketch.slot_scores > 0
    for bucket in range(sketch.num_buckets):  # an ID is held at most once per bucket
        ids = sketch.slot_ids[bucket][occupied[bucket]]
        assert len(torch.unique(ids)) == len(ids)


# size and plan


def test_size_counts_both_tables_the_sketch_slots_and_two_seeds_and_equals_the_state():
    module, plan = build()
    p = plan.params
    slots = p["buckets"] * p["bucket_slots"]
    assert slots >= 4 * p["hot_rows"]  # slots_per_hot_row = 4
    expected = (p["hot_rows"] + p["hashed_rows"]) * 8 * 4 + slots * (8 + 4 + row_index_bytes(p["hot_rows"])) + 16
    assert plan.size_bytes == cafe_size_bytes(p["hot_rows"], p["hashed_rows"], slots, 8) == expected
    assert state_size_bytes(module) == plan.size_bytes
    assert plan.budget_bytes - 4 * 8 < plan.size_bytes <= plan.budget_bytes  # the hashed rows take the rest


@pytest.mark.parametrize(("hot_rows", "dtype"), [(255, torch.uint8), (256, torch.int16), (32767, torch.int16),
                                                 (32768, torch.int32)])
def test_the_hot_row_index_takes_the_narrowest_type_that_holds_the_rows_and_none(hot_rows, dtype):
    module, plan = build_embedding(create_scheme("cafe", hot_rows=hot_rows, warm_start=False), "cafe", FEATURE,
                                   10**7, 0)
    assert module.sketch.slot_rows.dtype == dtype
    assert state_size_bytes(module) == plan.size_bytes


def test_hot_share_of_the_budget_goes_to_hot_rows_and_their_sketch():
    feature = FeatureSpec.from_vocabulary("item", 1_000_000, 32)
    scheme = create_scheme("cafe", hot_share=0.3)
    for budget in ("1/2", "1/16", "1/1000"):
        allowed = budget_of(budget, feature)
        plan = scheme.plan(feature, allowed)
        hot = scheme.hot_bytes(plan.params["hot_rows"], 32)
        assert 0.3 * allowed - scheme.hot_bytes(1, 32) < hot <= 0.3 * allowed, budget
        assert plan.size_bytes >= 0.99 * allowed, budget


def test_hot_rows_stop_at_the_training_ids_and_the_hashed_rows_take_the_rest():
    feature = FeatureSpec.from_vocabulary("item", 100, 8)
    plan = create_scheme("cafe").plan(feature, 10**6)  # half of it would hold 5,000 hot rows
    assert plan.params["hot_rows"] == 100
    assert plan.size_bytes >= 0.99 * plan.budget_bytes


def test_a_budget_below_one_hot_row_its_sketch_and_one_hashed_row_is_refused():
    scheme = create_scheme("cafe")
    minimum = scheme.size_bytes(1, 1, 8)
    assert minimum == cafe_size_bytes(1, 1, 4, 8)
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'cafe'"):
        scheme.plan(FEATURE, minimum - 1)
    assert scheme.plan(FEATURE, minimum).size_bytes == minimum


@pytest.mark.parametrize(("params", "message"), [
    ({"hot_share": 0.0}, "hot_share must be in \\(0, 1\\)"),
    ({"hot_share": 1.0}, "hot_share must be in \\(0, 1\\)"),
    ({"hot_rows": 0}, "hot_rows must be in \\[1, "),
    ({"slots_per_hot_row": 0}, "slots_per_hot_row must be in \\[1, 64\\]"),
    ({"bucket_slots": 65}, "bucket_slots must be in \\[1, 64\\]"),
    ({"importance": "frequency"}, "importance must be one of gradient, count"),
    ({"decay": 0.0}, "decay must be in \\(0, 1\\]"),
    ({"migrate_every": 0}, "migrate_every must be in \\[1, "),
    ({"warm_start": "yes"}, "warm_start must be true or false"),
])
def test_hyper_parameters_are_validated_naming_the_parameter_and_range(params, message):
    with pytest.raises(ValueError, match=message):
        CAFE(**params)


# the sketch


def test_a_new_id_in_a_full_bucket_replaces_the_smallest_score_and_continues_from_it():
    module = lookup(buckets=1, bucket_slots=3, hot_rows=1)
    sketch = module.sketch
    sketch.insert(torch.tensor([10, 11, 12]), torch.tensor([5.0, 2.0, 7.0]))
    sketch.insert(torch.tensor([13]), torch.tensor([1.0]))
    held = dict(zip(sketch.slot_ids[0].tolist(), sketch.slot_scores[0].tolist(), strict=True))
    assert held == {10: 5.0, 13: 3.0, 12: 7.0}  # 11 (score 2) replaced; 13 continues from 2
    sketch.insert(torch.tensor([10, 14, 15]), torch.tensor([1.0, 4.0, 9.0]))  # one replacement per bucket per call
    held = dict(zip(sketch.slot_ids[0].tolist(), sketch.slot_scores[0].tolist(), strict=True))
    assert held == {10: 6.0, 15: 12.0, 12: 7.0}  # 15, the stronger newcomer, replaced 13; 10 added; 14 dropped


def test_the_sketch_never_holds_more_ids_than_slots_nor_more_hot_ids_than_hot_rows():
    module = lookup(hot_rows=5, buckets=6, bucket_slots=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = torch.randint(0, 500, (64,), generator=generator)
        train_batch(module, ids)
        occupied = int((module.sketch.slot_scores > 0).sum())
        assert occupied <= module.sketch.num_slots == 18
        assert len(hot_ids(module)) <= 5
        assert_consistent(module)


# hot IDs


def test_a_frequent_id_becomes_hot_and_gets_a_dedicated_row_initialised_from_its_hashed_row():
    module = lookup(hot_rows=1)
    frequent = torch.tensor([7] * 20 + [1, 2, 3])
    train_batch(module, frequent)
    assert hot_ids(module) == set()  # the migration waits for the next training batch
    module.eval()
    with torch.no_grad():
        before = module(torch.tensor([7]))
    module.train()
    module(torch.tensor([100]))  # the next batch migrates first
    assert hot_ids(module) == {7}
    module.eval()
    with torch.no_grad():
        assert module.index_tuples(torch.tensor([7])).item() < 0  # its own row, no hashed row
        torch.testing.assert_close(module(torch.tensor([7])), before)  # a copy of its hashed row


def test_with_gradient_importance_the_id_with_the_larger_gradient_becomes_hot_at_equal_frequency():
    module = lookup(hot_rows=1, importance="gradient")
    ids = torch.tensor([3, 4] * 10)
    for _ in range(2):  # the loss sees only ID 4: ID 3's gradient is zero
        train_batch(module, ids, lambda ids, out: out[ids == 4].pow(2).sum() + out[ids == 4].sum())
    assert hot_ids(module) == {4}


def test_an_id_overtaken_by_hotter_ones_is_evicted_and_reads_its_hashed_row_again():
    module = lookup(hot_rows=1)
    train_batch(module, torch.tensor([5] * 10))
    train_batch(module, torch.tensor([6] * 30))
    assert hot_ids(module) == {5}
    module.train()
    module(torch.tensor([100]))  # migrates: 6 (30) overtook 5 (10)
    assert hot_ids(module) == {6}
    module.eval()
    with torch.no_grad():
        assert module.index_tuples(torch.tensor([5])).item() == module.hash(torch.tensor([5]))[0, 0].item()
        hashed_row = module.hash(torch.tensor([5]))[:, 0]
        torch.testing.assert_close(module(torch.tensor([5])), module.hashed.weight[hashed_row])


def test_unseen_ids_read_their_hashed_rows():
    module, _ = build()
    unseen = torch.tensor([FEATURE.num_ids, 10**12, -5, 2**63 - 1, -(2**63)])
    module.eval()
    with torch.no_grad():
        rows = module.hash(unseen)[:, 0]
        assert torch.equal(module.index_tuples(unseen)[:, 0], rows)
        torch.testing.assert_close(module(unseen), module.hashed.weight[rows])


def test_warm_start_makes_the_most_frequent_training_ids_hot():
    counts = torch.ones(300, dtype=torch.int64)
    counts[[17, 250, 3]] = torch.tensor([50, 40, 30])
    feature = FeatureSpec("item", torch.arange(300).numpy(), counts.numpy(), 8)
    module, _ = build_embedding(create_scheme("cafe", hot_rows=3), "cafe", feature, 10**6, 0)
    assert hot_ids(module) == {17, 250, 3}
    cold, _ = build_embedding(create_scheme("cafe", hot_rows=3, warm_start=False), "cafe", feature, 10**6, 0)
    assert hot_ids(cold) == set()


@pytest.mark.parametrize("importance", ["count", "gradient"])
def test_the_hot_set_is_always_exactly_the_sketch_top_h(importance):
    """Batch by batch, the incremental migrations keep what a recomputation from scratch would give."""
    module = lookup(hot_rows=6, buckets=8, bucket_slots=4, importance=importance)
    generator = torch.Generator().manual_seed(1)
    weights = torch.arange(1, 201, dtype=torch.float64).pow(-1.0)
    for _ in range(40):
        ids = torch.multinomial(weights, 128, replacement=True, generator=generator)
        train_batch(module, ids)
        module.train()
        module(torch.empty(0, dtype=torch.int64))  # migrate now
        rows = module.sketch.slot_rows.view(-1)
        hot = rows != module.hot_rows
        scores = module.sketch.slot_scores.view(-1)
        top = torch.topk(scores, module.hot_rows).values
        assert torch.equal(torch.sort(scores[hot]).values, torch.sort(top[top > 0]).values)
        assert_consistent(module)


def test_migrate_every_batches_defers_promotions():
    module = lookup(hot_rows=1, migrate_every=3)
    train_batch(module, torch.tensor([9] * 5))
    for _ in range(2):
        train_batch(module, torch.tensor([100]))
        assert hot_ids(module) == set()
    train_batch(module, torch.tensor([100]))  # the third batch since the last migration
    assert hot_ids(module) == {9}


def test_epoch_end_decays_scores_keeps_the_hot_set_and_the_size():
    module, plan = build(importance="count")
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        train_batch(module, torch.randint(0, 3000, (256,), generator=generator))
    module.on_epoch_end(1)  # applies every pending migration
    scores, hot = module.sketch.slot_scores.clone(), hot_ids(module)
    module.on_epoch_end(2)
    torch.testing.assert_close(module.sketch.slot_scores, scores * 0.8)
    assert hot_ids(module) == hot
    assert state_size_bytes(module) == plan.size_bytes


# determinism, state, collections


def train_some(module, seed: int = 3, batches: int = 6) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(batches):
        optimizer.zero_grad()
        train_batch(module, torch.randint(0, 2500, (200,), generator=generator))
        optimizer.step()
    module.on_epoch_end(1)


def test_the_same_seed_and_batches_give_the_same_module():
    first, _ = build(seed=5)
    second, _ = build(seed=5)
    train_some(first)
    train_some(second)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_round_trip_restores_embeddings_hot_set_and_training():
    trained, plan = build(seed=1)
    train_some(trained)
    restored, _ = build(seed=1)
    restored.load_state_dict(trained.state_dict())
    assert state_size_bytes(restored) == plan.size_bytes
    assert torch.equal(restored.sketch.slot_of_row, trained.sketch.slot_of_row)  # rebuilt from the state
    ids = torch.arange(-10, 3000)
    for module in (trained, restored):
        module.eval()
    with torch.no_grad():
        assert torch.equal(restored(ids), trained(ids))
    train_some(trained, seed=4, batches=3)
    train_some(restored, seed=4, batches=3)
    assert hot_ids(restored) == hot_ids(trained)


def test_promotions_write_through_a_model_collection():
    module = lookup(hot_rows=2, hashed_rows=16)
    embeddings = FeatureEmbeddings({"f": module}, TableTraining("torch", "adam"))
    inside = embeddings["f"]
    embeddings.train()
    embeddings.embed("f", torch.tensor([8] * 6)).sum().backward()
    hashed_row = inside.hash(torch.tensor([8]))[:, 0]
    expected = inside.hashed.weight[hashed_row].detach().clone()
    embeddings.embed("f", torch.tensor([100]))  # migrates: 8 is hot
    assert hot_ids(inside) == {8}
    embeddings.eval()
    with torch.no_grad():
        torch.testing.assert_close(embeddings.embed("f", torch.tensor([8])), expected)
