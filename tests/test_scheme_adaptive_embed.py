"""AdaEmbed: the size of the rows, the per-ID row index (narrowest type) and importance, held to the module's state;
importance from access frequency times gradient norm; reallocation giving the rows to the most important IDs
(admitted rows starting from the default embedding, evicted IDs back to it), its schedule and threshold,
determinism and state round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from embbench_plugins.schemes.adaptive_embed import AdaptiveEmbed, AdaptiveEmbedLookup, adaptive_embed_size_bytes

from embbench import Budget, BudgetTooSmall, FeatureSpec, VocabularyIndex, build_embedding, state_size_bytes
from embbench.collection import FeatureEmbeddings, TableTraining
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 2000, 8)


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(budget: str = "1/4", feature: FeatureSpec = FEATURE, seed: int = 0, **params):
    return build_embedding(create_scheme("adaptive-embed", **params), "adaptive-embed", feature,
                           budget_of(budget, feature), seed)


def lookup(rows: int = 2, num_ids: int = 20, default: str = "zero", importance: str = "count",
           reallocate_every: int | None = None, min_change: float = 0.0, admit_init: str = "default",
           seed: int = 0) -> AdaptiveEmbedLookup:
    """A module over training IDs 0..num_ids-1 with no warm start: no ID holds a row yet."""
    return AdaptiveEmbedLookup(np.arange(num_ids), rows, 4, default, importance, 0.5, reallocate_every, min_change,
                               admit_init, seed)


def train_batch(module, ids: torch.Tensor, loss_of=lambda ids, out: out.pow(2).sum() + out.sum()) -> None:
    module.train()
    loss_of(ids, module(ids)).backward()


def holders(module: AdaptiveEmbedLookup) -> set[int]:
    return set(torch.nonzero(module.row_of_id != module.rows).flatten().tolist())


def assert_rows_distinct(module: AdaptiveEmbedLookup) -> None:
    rows = module.row_of_id[module.row_of_id != module.rows].to(torch.int64)
    assert len(rows) <= module.rows and len(torch.unique(rows)) == len(rows)


# size and plan


def test_size_counts_the_rows_a_row_index_and_an_importance_per_training_id_the_dictionary_and_a_counter():
    module, plan = build("1/2")
    rows = plan.params["rows"]
    assert 255 < rows <= 32767 and module.row_of_id.dtype == torch.int16
    dictionary = VocabularyIndex.size_bytes(FEATURE.ids)
    assert plan.size_bytes == rows * 8 * 4 + 2000 * (2 + 4) + dictionary + 8 == state_size_bytes(module)
    assert plan.size_bytes == adaptive_embed_size_bytes(2000, rows, 8, dictionary, shared_row=False)
    assert plan.budget_bytes - 8 * 4 < plan.size_bytes <= plan.budget_bytes


def test_the_shared_default_is_one_more_row():
    module, plan = build(default="shared")
    assert module.table.num_rows == plan.params["rows"] + 1
    assert state_size_bytes(module) == plan.size_bytes


@pytest.mark.parametrize(("rows", "dtype"), [(255, torch.uint8), (256, torch.int16), (32767, torch.int16),
                                             (32768, torch.int32)])
def test_the_row_index_takes_the_narrowest_type_that_holds_the_rows_and_none(rows, dtype):
    feature = FeatureSpec.from_vocabulary("item", 40_000, 4)
    module, plan = build_embedding(create_scheme("adaptive-embed", rows=rows), "adaptive-embed", feature, 10**7, 0)
    assert module.row_of_id.dtype == dtype and module.importance_scores.dtype == torch.float32
    assert state_size_bytes(module) == plan.size_bytes


def test_rows_are_solved_from_the_budget_and_fill_it_down_to_the_per_id_minimum():
    feature = FeatureSpec.from_vocabulary("item", 1_000_000, 32)
    scheme = create_scheme("adaptive-embed")
    for budget in ("1/2", "1/4", "1/8", "1/16"):
        plan = scheme.plan(feature, budget_of(budget, feature))
        assert plan.size_bytes >= 0.99 * plan.budget_bytes, budget
    minimum = scheme.size_bytes(feature, 1)
    # one row; a uint8 index and an fp32 importance per ID; the dictionary (a run: 8 bytes) and the counter
    assert minimum == 32 * 4 + 1_000_000 * 5 + 8 + 8
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'adaptive-embed': 5,000,144 bytes"):
        scheme.plan(feature, budget_of("1/64", feature))


def test_rows_stop_at_the_training_ids():
    feature = FeatureSpec.from_vocabulary("item", 100, 8)
    assert create_scheme("adaptive-embed").plan(feature, 10**6).params["rows"] == 100


@pytest.mark.parametrize(("params", "message"), [
    ({"rows": 0}, "rows must be in \\[1, "),
    ({"default": "mean"}, "default must be one of zero, shared"),
    ({"importance": "frequency"}, "importance must be one of gradient, count"),
    ({"decay": 1.5}, "decay must be in \\(0, 1\\]"),
    ({"reallocate_every": 0}, "reallocate_every must be in \\[1, "),
    ({"min_change": 1.0}, "min_change must be in \\[0, 1\\)"),
    ({"admit_init": "zero"}, "admit_init must be one of random, default"),
    ({"warm_start": 1}, "warm_start must be true or false"),
])
def test_hyper_parameters_are_validated_naming_the_parameter_and_range(params, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveEmbed(**params)


# rows, importance and reallocation


def test_warm_start_gives_the_rows_to_the_most_frequent_training_ids():
    counts = np.ones(300, dtype=np.int64)
    counts[[17, 250, 3]] = [50, 40, 30]
    feature = FeatureSpec("item", np.arange(300) * 7, counts, 8)  # IDs 0, 7, 14, ...: ranks differ from IDs
    module, _ = build_embedding(create_scheme("adaptive-embed", rows=3), "adaptive-embed", feature, 10**6, 0)
    assert holders(module) == {17, 250, 3}
    assert torch.equal(module.importance_scores, torch.as_tensor(counts, dtype=torch.float32))
    cold, _ = build_embedding(create_scheme("adaptive-embed", rows=3, warm_start=False), "adaptive-embed", feature,
                              10**6, 0)
    assert holders(cold) == set()


def test_ids_without_a_row_and_unseen_ids_embed_to_zero():
    module = lookup(rows=2)
    module.reallocate()  # no importance yet: nothing to admit
    module.eval()
    with torch.no_grad():
        out = module(torch.tensor([0, 5, 19, 20, -1, 2**63 - 1]))
    assert torch.equal(out, torch.zeros(6, 4))


def test_an_important_id_gets_a_row_at_reallocation_starting_from_its_zero_default_embedding():
    module = lookup(rows=1)
    train_batch(module, torch.tensor([6] * 10 + [2, 3]))
    assert holders(module) == set()  # rows move only at a reallocation
    module.on_epoch_end(1)
    assert holders(module) == {6}
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(torch.tensor([6])), torch.zeros(1, 4))  # the row starts as the zero default
        assert module.index_tuples(torch.tensor([6])).item() == module.row_of_id[6].item() < module.rows


def test_by_default_an_admitted_row_starts_afresh_drawn_as_the_table_was_and_seeded():
    first, second, other = (lookup(rows=1, admit_init="random", seed=seed) for seed in (2, 2, 3))
    for module in (first, second, other):
        train_batch(module, torch.tensor([6] * 4))
        module.reallocate()
        assert holders(module) == {6} and int(module.reallocations) == 1
    row = first.table.weight[int(first.row_of_id[6])]
    assert row.abs().sum() > 0 and row.std() < 0.05  # N(0, 0.01^2), the table's init
    assert torch.equal(row, second.table.weight[int(second.row_of_id[6])])
    assert not torch.equal(row, other.table.weight[int(other.row_of_id[6])])


def test_importance_is_frequency_times_gradient_norm():
    module = lookup(rows=1, importance="gradient", default="shared")
    ids = torch.tensor([3] * 4 + [4] * 4)
    train_batch(module, ids, lambda ids, out: out[ids == 4].sum())  # ID 3's gradient is zero
    assert module.importance_scores[3] == 0 and module.importance_scores[4] > 0
    module.on_epoch_end(1)
    assert holders(module) == {4}
    more = lookup(rows=1, importance="gradient", default="shared")
    train_batch(more, torch.tensor([3] * 6 + [4] * 2))  # equal gradient per access: the frequent ID gains more
    torch.testing.assert_close(more.importance_scores[3], 3 * more.importance_scores[4])


def test_a_less_important_id_is_evicted_and_embeds_to_the_default_again():
    module = lookup(rows=1, default="shared")
    train_batch(module, torch.tensor([5] * 4))
    module.reallocate()
    assert holders(module) == {5}
    train_batch(module, torch.tensor([9] * 10))
    module.reallocate()
    assert holders(module) == {9}
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(torch.tensor([5])), module.table.weight[module.rows].unsqueeze(0))
        assert module.index_tuples(torch.tensor([5])).item() == module.rows


def test_an_admitted_row_starts_from_the_shared_default_so_the_embedding_does_not_jump():
    module = lookup(rows=1, default="shared")
    train_batch(module, torch.tensor([8] * 3))
    module.eval()
    with torch.no_grad():
        before = module(torch.tensor([8]))
    module.reallocate()
    assert holders(module) == {8}
    with torch.no_grad():
        torch.testing.assert_close(module(torch.tensor([8])), before)


def test_no_more_ids_ever_hold_rows_than_there_are_rows():
    module = lookup(rows=7, num_ids=300, importance="gradient", reallocate_every=2)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(3):
        for _ in range(8):
            train_batch(module, torch.randint(-20, 320, (64,), generator=generator))
            assert len(holders(module)) <= 7
            assert_rows_distinct(module)
        module.on_epoch_end(epoch)
        assert len(holders(module)) == 7


def test_reallocation_gives_the_rows_to_exactly_the_r_most_important_ids():
    module = lookup(rows=5, num_ids=100)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        train_batch(module, torch.randint(0, 100, (200,), generator=generator))
        module.reallocate()
        top = torch.topk(module.importance_scores, 5).values
        held = module.importance_scores[sorted(holders(module))]
        assert torch.equal(torch.sort(held).values, torch.sort(top).values)


def test_reallocate_every_n_training_batches_and_not_before():
    module = lookup(rows=1, reallocate_every=3)
    train_batch(module, torch.tensor([4] * 5))
    train_batch(module, torch.tensor([11]))
    train_batch(module, torch.tensor([11]))
    assert holders(module) == set()
    train_batch(module, torch.tensor([11]))  # the fourth batch starts with the reallocation after three
    assert holders(module) == {4}


def test_a_change_below_min_change_of_the_rows_waits():
    module = lookup(rows=10, num_ids=100, min_change=0.25)
    train_batch(module, torch.arange(10).repeat(5))
    module.reallocate()
    assert holders(module) == set(range(10))
    train_batch(module, torch.tensor([50] * 100 + [51] * 100))  # 2 of 10 rows would change: 20% <= 25%
    assert module.reallocate() == 0 and holders(module) == set(range(10))
    train_batch(module, torch.tensor([52] * 100))  # 3 of 10: 30%
    assert module.reallocate() == 3 and {50, 51, 52} <= holders(module)


def test_epoch_end_reallocates_then_decays_and_keeps_the_size():
    module, plan = build(importance="count", min_change=0.0)
    generator = torch.Generator().manual_seed(2)
    train_batch(module, torch.randint(0, 2500, (512,), generator=generator))
    scores = module.importance_scores.clone()
    module.on_epoch_end(1)
    torch.testing.assert_close(module.importance_scores, scores * 0.8)
    assert state_size_bytes(module) == plan.size_bytes


# determinism, state, collections


def train_some(module, seed: int = 3, batches: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(batches):
        optimizer.zero_grad()
        train_batch(module, torch.randint(0, 2500, (200,), generator=generator))
        optimizer.step()
    module.on_epoch_end(1)


def test_the_same_seed_and_batches_give_the_same_module():
    first, _ = build(seed=5, min_change=0.0)
    second, _ = build(seed=5, min_change=0.0)
    train_some(first)
    train_some(second)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_round_trip_restores_rows_holders_and_embeddings():
    trained, plan = build(seed=1, min_change=0.0)
    train_some(trained)
    restored, _ = build(seed=1, min_change=0.0)
    restored.load_state_dict(trained.state_dict())
    assert state_size_bytes(restored) == plan.size_bytes
    assert holders(restored) == holders(trained)
    ids = torch.arange(-10, 3000)
    for module in (trained, restored):
        module.eval()
    with torch.no_grad():
        assert torch.equal(restored(ids), trained(ids))


def test_reallocation_writes_through_a_model_collection():
    module = lookup(rows=1, default="shared")
    embeddings = FeatureEmbeddings({"f": module}, TableTraining("torch", "adam"))
    inside = embeddings["f"]
    embeddings.train()
    embeddings.embed("f", torch.tensor([8] * 3)).sum().backward()
    shared = inside.table.weight[inside.rows].detach().clone()
    inside.on_epoch_end(1)
    assert holders(inside) == {8}
    assert torch.equal(inside.table.weight[int(inside.row_of_id[8])], shared)
    embeddings.eval()
    with torch.no_grad():
        torch.testing.assert_close(embeddings.embed("f", torch.tensor([8])), shared.unsqueeze(0))
