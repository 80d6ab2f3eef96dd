"""Pruning schemes (magnitude-pruning, pep): the stored size is the sparse format's bytes, the rows and layout
solved from the budget, exactly K values after pruning that stay pruned, evaluation that reads only the K stored
values (before any pruning too), exact state_dict round trips, PEP's learned thresholds, and the schedules."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from collection_checks import (
    assert_one_pool_call_per_store,
    assert_same_embeddings_in_collection,
    assert_sgd_step_matches_dense,
    kernel_params,
)
from embbench_plugins.schemes.pruning import (
    FORMATS,
    PEP,
    MagnitudePrunedEmbedding,
    MagnitudePruning,
    SparseLayout,
    cubic_schedule,
    from_unsigned,
    keep_largest,
    to_unsigned,
    unsigned_width,
)

from embbench import (
    Budget,
    BudgetTooSmall,
    FeatureEmbeddings,
    FeatureSpec,
    TableTraining,
    VocabularyIndex,
    build_embedding,
    state_size_bytes,
)
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 2000, 16)
IDS = torch.arange(FEATURE.num_ids)


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(name: str, budget: str = "1/4", feature: FeatureSpec = FEATURE, seed: int = 0, **params):
    return build_embedding(create_scheme(name, **params), name, feature, budget_of(budget, feature), seed)


def train_steps(module, steps: int = 5, lr: float = 0.05, seed: int = 0) -> None:
    """Pull the training IDs' embeddings towards random targets with Adam (whose momentum keeps moving values whose
    gradient has become zero). ``module`` is a scheme module, or a FeatureEmbeddings of one as feature "f" whose
    tables a dense kernel holds."""
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    targets = torch.randn(len(IDS), FEATURE.dim, generator=torch.Generator().manual_seed(seed))
    embed = (lambda ids: module.embed("f", ids)) if isinstance(module, FeatureEmbeddings) else module
    for _ in range(steps):
        optimizer.zero_grad()
        (embed(IDS) - targets).pow(2).mean().backward()
        optimizer.step()


def evaluated(module, ids: torch.Tensor = IDS) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(ids)


def stored_nonzeros(module) -> int:
    """Non-zero values among the distinct rows that evaluation reads (every row of the table)."""
    module.eval()
    with torch.no_grad():
        return int((module.kept_values().embed(torch.arange(module.num_rows), module.dim) != 0).sum())


def magnitude_module(layout: SparseLayout, steps=((1, None),)):
    steps = [(epoch, layout.kept if count is None else count) for epoch, count in steps]
    return MagnitudePrunedEmbedding(layout, FEATURE.ids, seed=0, steps=steps)


# -- the sparse layout and its size -------------------------------------------------------------------------


@pytest.mark.parametrize(("largest", "width"), [(0, 1), (255, 1), (256, 2), (65535, 2), (65536, 4),
                                                (2**32 - 1, 4), (2**32, 8)])
def test_indices_take_the_narrowest_unsigned_width_and_round_trip(largest, width):
    assert unsigned_width(largest) == width
    values = torch.tensor([0, largest // 2, largest], dtype=torch.int64)
    stored = to_unsigned(values, width)
    assert stored.element_size() == width
    assert torch.equal(from_unsigned(stored), values)


@pytest.mark.parametrize(("format", "expected"), [
    # 2001 rows (2000 IDs and the OOV row) x 16, 3000 values: bitmap ceil(2001*16/8) bytes; csr a uint8 count per
    # row and a uint8 column per value; coo an int16-held row (< 65536) and a uint8 column per value
    ("bitmap", 3000 * 4 + 4002),
    ("csr", 3000 * 4 + 2001 + 3000),
    ("coo", 3000 * 4 + 3000 * (2 + 1)),
])
def test_the_stored_size_is_the_formats_bytes_and_the_modules_state(format, expected):
    layout = SparseLayout(format, FEATURE.num_ids + 1, FEATURE.dim, 3000)
    module = magnitude_module(layout)
    dictionary = VocabularyIndex.size_bytes(FEATURE.ids)  # 0..1999: a run, 8 bytes
    assert layout.size_bytes == expected
    assert state_size_bytes(module) == dictionary + expected
    state = module.state_dict()
    assert sorted(key for key in state if key.startswith("kept_")) == sorted(layout.keys)
    assert state["kept_values"].shape == (3000,) and state["kept_values"].dtype == torch.float32
    for key, (shape, dtype) in layout.expected().items():
        assert tuple(state[key].shape) == shape and state[key].dtype == dtype
    train_steps(module)
    module.on_epoch_end(1)  # prunes: the same bytes
    assert state_size_bytes(module) == dictionary + expected


def test_the_shadow_mask_and_thresholds_are_not_in_the_state():
    module, plan = build("pep", threshold="element")
    assert not any("weight" in key or "threshold" in key or "mask" in key for key in module.state_dict())
    assert plan.size_bytes == state_size_bytes(module)
    assert "shadow" in plan.notes["training_memory"] and "threshold table" in plan.notes["training_memory"]


@pytest.mark.parametrize(("budget", "format"), [("1/4", "bitmap"), ("1/16", "csr"), ("1/64", "coo")])
def test_the_plan_takes_the_layout_that_keeps_most_values(budget, format):
    module, plan = build("magnitude-pruning", budget, rows="per-id")
    rows, dim, allowed = FEATURE.num_ids + 1, FEATURE.dim, budget_of(budget) - 8  # beside the 8-byte dictionary
    assert plan.params["format"] == format and plan.params["num_rows"] == rows
    for other in FORMATS:
        fits = [k for k in (plan.params["kept"], plan.params["kept"] + 1)
                if SparseLayout.bytes_of(other, rows, dim, k) <= allowed]
        assert max(fits, default=0) <= plan.params["kept"]  # no format keeps one value more
    assert plan.size_bytes == state_size_bytes(module) and plan.size_bytes > budget_of(budget) - 8 - 4 - 2


@pytest.mark.parametrize("budget", ["1/2", "1/4", "1/8", "1/16", "1/64", "1/256", "1/1000"])
def test_a_million_ids_use_at_least_99_percent_of_every_budget_with_hashed_rows_below_the_density(budget):
    feature = FeatureSpec.from_vocabulary("item", 10**6, 32)
    allowed = budget_of(budget, feature)
    plan = create_scheme("magnitude-pruning").plan(feature, allowed)
    assert 0.99 * allowed <= plan.size_bytes <= allowed
    per_id = create_scheme("magnitude-pruning", rows="per-id").plan(feature, allowed)
    density = per_id.params["kept"] / (per_id.params["num_rows"] * 32)
    if plan.params["rows"] == "per-id":
        assert density >= 32**-0.5 and plan.unseen == "dedicated" and budget in ("1/2", "1/4")
    else:  # a row per ID would keep under 1/sqrt(32) of its values
        assert density < 32**-0.5 and plan.unseen == "collided"
        assert plan.params["num_rows"] == math.ceil(plan.params["kept"] / (0.5 * 32))  # hashed_density 0.5
    # 1/1000 of a 10^6 x 32 table is 136,000 bytes: hashed rows, a seed and the kept values in it
    if budget == "1/1000":
        assert plan.params["rows"] == "hashed" and plan.size_bytes <= 136_000


def test_unseen_ids_read_the_oov_row_with_per_id_rows_and_a_hashed_row_otherwise():
    per_id, plan = build("magnitude-pruning", "1/4", rows="per-id")
    assert plan.unseen == "dedicated"
    unseen = torch.tensor([FEATURE.num_ids, -5, 2**62])
    assert per_id.index_tuples(unseen).flatten().tolist() == [FEATURE.num_ids] * 3  # the last (OOV) row
    hashed, plan = build("magnitude-pruning", "1/4", rows="hashed")
    assert plan.unseen == "collided" and plan.params["rows"] == "hashed"
    assert hashed.index_tuples(IDS).max() < plan.params["num_rows"]


# -- magnitude pruning ---------------------------------------------------------------------------------------


def test_keep_largest_keeps_exactly_count_with_ties_to_the_lowest_position():
    scores = torch.tensor([[0.5, 0.1, 0.5], [0.9, 0.5, 0.0]])
    assert keep_largest(scores, 3).tolist() == [[True, False, True], [True, False, False]]
    assert int(keep_largest(scores, 4).sum()) == 4 and int(keep_largest(scores, 99).sum()) == 6


def test_one_shot_prunes_to_exactly_k_values_after_the_warmup_epochs_and_not_before():
    module, plan = build("magnitude-pruning", warmup_epochs=2)
    kept = plan.params["kept"]
    train_steps(module)
    module.on_epoch_end(1)
    assert module.mask is None  # still dense
    shadow = module.values.weight.detach().clone()
    module.on_epoch_end(2)
    assert int(module.mask.sum()) == kept
    assert int((module.values.weight != 0).sum()) <= kept
    # the K of largest magnitude
    cut = shadow.abs().flatten().sort(descending=True).values[kept - 1]
    assert bool((shadow.abs()[module.mask] >= cut).all()) and bool((shadow.abs()[~module.mask] <= cut).all())


def test_pruned_values_stay_zero_through_further_training():
    module, plan = build("magnitude-pruning", warmup_epochs=1)
    train_steps(module)
    module.on_epoch_end(1)
    mask = module.mask.clone()
    train_steps(module, steps=10, seed=1)  # Adam's momentum moves the pruned values of the shadow meanwhile
    module.train()
    out = module(IDS)
    rows = module.rows(IDS)
    assert bool((out[~mask[rows]] == 0).all())  # training embeddings: zero where pruned
    assert bool((evaluated(module)[~mask[rows]] == 0).all())
    module.on_epoch_end(2)
    assert torch.equal(module.mask, mask)  # one-shot: no further pruning
    assert bool((module.values.weight.detach()[~mask] == 0).all())
    assert stored_nonzeros(module) <= plan.params["kept"]


def test_iterative_schedule_is_cubic_non_increasing_and_ends_at_k():
    counts = cubic_schedule(total=1000, kept=100, steps=4)
    assert counts == [100 + math.ceil(900 * (1 - j / 4) ** 3) for j in range(1, 5)]
    assert counts[-1] == 100 and all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[0] - counts[1] > counts[2] - counts[3]  # prunes fastest first (Zhu & Gupta)


def test_iterative_pruning_follows_the_schedule_with_nested_masks():
    module, plan = build("magnitude-pruning", schedule="iterative", warmup_epochs=1, prune_epochs=3)
    total, kept = plan.params["num_rows"] * FEATURE.dim, plan.params["kept"]
    expected = cubic_schedule(total, kept, 3)
    previous = torch.ones(plan.params["num_rows"], FEATURE.dim, dtype=torch.bool)
    for epoch, count in zip((1, 2, 3), expected, strict=True):
        train_steps(module, steps=2, seed=epoch)
        module.on_epoch_end(epoch)
        assert int(module.mask.sum()) == count
        assert not bool((module.mask & ~previous).any())  # a pruned value never comes back
        previous = module.mask.clone()
    module.on_epoch_end(4)
    assert int(module.mask.sum()) == kept


def test_no_warmup_prunes_the_initial_values_before_the_first_training_step():
    module, plan = build("magnitude-pruning", warmup_epochs=0)
    module.train()
    module(IDS[:4])
    assert int(module.mask.sum()) == plan.params["kept"]


def test_evaluation_reads_only_the_k_largest_values_even_before_pruning():
    module, plan = build("magnitude-pruning", warmup_epochs=5)
    kept = plan.params["kept"]
    train_steps(module)
    assert module.mask is None
    shadow = module.values.weight.detach()
    assert int((shadow != 0).sum()) > kept  # the dense shadow holds more than the budget
    assert stored_nonzeros(module) == kept
    out = evaluated(module)
    rows = module.rows(IDS)
    top = keep_largest(shadow.abs(), kept)
    torch.testing.assert_close(out, torch.where(top[rows], shadow[rows], 0.0), rtol=0, atol=0)
    module.train()
    assert int((module(IDS) != 0).sum()) > int((out != 0).sum())  # training reads the dense shadow


# -- the state dict ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("format", FORMATS)
def test_state_dict_round_trip_is_exact_for_each_format(format):
    layout = SparseLayout(format, FEATURE.num_ids + 1, FEATURE.dim, 2500)
    module = magnitude_module(layout)
    train_steps(module)
    module.on_epoch_end(1)
    train_steps(module, seed=1)
    saved = module.state_dict()
    other = MagnitudePrunedEmbedding(layout, FEATURE.ids, seed=9, steps=[(1, 2500)])
    other.load_state_dict(saved)
    ids = torch.cat([IDS, torch.tensor([-1, 10**9])])
    assert torch.equal(evaluated(other, ids), evaluated(module, ids))
    again = other.state_dict()
    assert all(torch.equal(again[key], saved[key]) for key in saved)
    assert int(other.mask.sum()) == 2500 and other.steps_done == 1


def test_loading_a_pep_search_state_gives_the_thresholded_values_it_evaluated():
    module, _ = build("pep", threshold="dimension", threshold_init=-4.5)
    train_steps(module)
    want = evaluated(module)
    other, _ = build("pep", threshold="dimension", seed=5)
    other.load_state_dict(module.state_dict())
    assert torch.equal(evaluated(other), want) and not other.searching


@pytest.mark.parametrize("scheme", ["magnitude-pruning", "pep"])
def test_restoring_a_model_state_embeds_as_saved_although_the_collection_also_restores_the_shadow(scheme):
    """A model's state holds the collection's dense shadow too, loaded after the scheme module's kept values: the
    restored model still evaluates exactly the stored values (as the trainer's restore of the best epoch needs)."""
    module, _ = build(scheme, warmup_epochs=3) if scheme == "magnitude-pruning" else build(scheme, threshold_init=-4.5)
    model = FeatureEmbeddings({"f": module}, TableTraining("torch", "dense-adam"))
    train_steps(model)
    model.eval()
    with torch.no_grad():
        want = model.embed("f", IDS)
    saved = copy.deepcopy(model.state_dict())
    assert any(key.startswith("tables.") for key in saved)  # the collection's shadow rows
    train_steps(model, seed=3)
    model["f"].on_epoch_end(3)
    model.load_state_dict(saved)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.embed("f", IDS), want)


def test_loading_a_state_of_another_layout_or_without_its_values_fails_naming_them():
    module = magnitude_module(SparseLayout("csr", FEATURE.num_ids + 1, FEATURE.dim, 2500))
    state = module.state_dict()
    wrong = dict(state, kept_columns=state["kept_columns"].to(torch.int64))
    with pytest.raises(RuntimeError, match="'kept_columns' of a csr layout .* must be torch.uint8"):
        module.load_state_dict(wrong)
    with pytest.raises(RuntimeError, match="Missing key.*kept_values"):
        module.load_state_dict({k: v for k, v in state.items() if k != "kept_values"})
    counts = state["kept_row_counts"].clone()
    counts[0] += 1
    with pytest.raises(RuntimeError, match="row counts add up to 2501, not 2500"):
        module.load_state_dict(dict(state, kept_row_counts=counts))


# -- PEP ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "shape"), [("feature", (1,)), ("dimension", (16,)), ("row", (2001, 1)),
                                                  ("element", (2001, 16))])
def test_pep_thresholds_get_gradients_and_prune_values(threshold, shape):
    module, _ = build("pep", "1/4", threshold=threshold, threshold_init=-4.6, rows="per-id")
    s = module.threshold_weight if threshold in ("feature", "dimension") else module.thresholds.weight
    assert tuple(s.shape) == shape and torch.allclose(torch.sigmoid(s), torch.tensor(0.01), atol=1e-4)
    module.train()
    out = module(IDS)
    out.pow(2).sum().backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    # sigmoid(-4.6) ~ 0.01 = the init std: about a third of the values survive N(0, 0.01^2) at all
    assert 0.2 < float((out != 0).float().mean()) < 0.45
    survivors = int((module.effective_table() != 0).sum())
    # shrinking the embeddings raises the thresholds and prunes more
    optimizer = torch.optim.Adam([s], lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        module(IDS).pow(2).sum().backward()
        optimizer.step()
    assert int((module.effective_table() != 0).sum()) < survivors


def test_pep_ends_its_search_with_at_most_k_of_the_largest_survivors_rewound_to_their_initial_values():
    module, plan = build("pep", "1/16", threshold="dimension", search_epochs=2, rows="per-id")
    kept = plan.params["kept"]
    initial = module.values.weight.detach().clone()
    train_steps(module)
    module.on_epoch_end(1)
    assert module.searching  # nearly every value survives sigmoid(-15): more than K
    shadow = module.values.weight.detach().clone()
    survivors = int((shadow.abs() > torch.sigmoid(module.threshold_weight.detach())).sum())
    module.on_epoch_end(2)
    assert not module.searching and module.search_result == (survivors, 2) and survivors > kept
    assert int(module.mask.sum()) == kept
    assert torch.equal(module.mask, keep_largest(shadow.abs(), kept))  # the largest surviving |v|
    assert torch.equal(module.values.weight.detach(), torch.where(module.mask, initial, 0.0))  # the lottery ticket
    train_steps(module, seed=2)
    module.train()
    rows = module.rows(IDS)
    assert bool((module(IDS)[~module.mask[rows]] == 0).all())  # retrained with the mask, no thresholds
    assert stored_nonzeros(module) <= kept


def test_pep_ends_its_search_early_once_no_more_than_k_values_survive():
    module, plan = build("pep", "1/4", threshold="feature", threshold_init=-2.0, search_epochs=50, rewind=False)
    train_steps(module, steps=1)
    survivors = int((module.effective_table() != 0).sum())
    assert survivors <= plan.params["kept"]  # sigmoid(-2) = 0.12: hardly any value survives
    before = module.values.weight.detach().clone()
    module.on_epoch_end(1)
    assert not module.searching and module.search_result == (survivors, 1)
    assert int(module.mask.sum()) == survivors
    assert torch.equal(module.values.weight.detach(), torch.where(module.mask, before, 0.0))  # rewind=False


def test_pep_evaluation_keeps_only_k_of_the_thresholded_values_while_searching():
    module, plan = build("pep", "1/16", threshold="dimension", rows="per-id")
    train_steps(module)
    assert module.searching and stored_nonzeros(module) == plan.params["kept"]
    effective = module.effective_table()
    rows = module.rows(IDS)
    top = keep_largest(effective.abs(), plan.params["kept"])
    torch.testing.assert_close(evaluated(module), torch.where(top[rows], effective[rows], 0.0), rtol=0, atol=0)


# -- in a model's table collection ---------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "params"), [
    ("magnitude-pruning", {"warmup_epochs": 0}),
    ("pep", {"threshold": "element", "threshold_init": -4.6}),
    ("pep", {"threshold": "row", "threshold_init": -4.6}),
    ("pep", {"threshold": "dimension", "threshold_init": -4.6}),
])
@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_embeds_the_same_through_a_table_collection(scheme, params, backend, optimizer):
    module, _ = build(scheme, "1/16", **params)
    batches = [torch.randint(0, FEATURE.num_ids + 50, (300,), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    assert_same_embeddings_in_collection(module, batches, backend, optimizer)
    assert_one_pool_call_per_store(module, batches[0], backend, optimizer)


@pytest.mark.parametrize("scheme", ["magnitude-pruning", "pep"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("torchrec", marks=kernel_params()[0].marks)])
def test_an_sgd_step_and_the_epoch_hook_match_the_dense_module(scheme, backend):
    params = {"warmup_epochs": 1} if scheme == "magnitude-pruning" else {"threshold": "row", "search_epochs": 1}
    module, _ = build(scheme, "1/16", **params)
    ids = torch.randint(0, FEATURE.num_ids, (256,), generator=torch.Generator().manual_seed(0))
    assert_sgd_step_matches_dense(module, ids, IDS, backend, after_step=lambda m: m.on_epoch_end(1))


# -- hyper-parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "params", "message"), [
    ("magnitude-pruning", {"schedule": "gradual"}, "schedule must be one of one-shot, iterative"),
    ("magnitude-pruning", {"warmup_epochs": -1}, r"warmup_epochs must be in \[0, 1000\]"),
    ("magnitude-pruning", {"prune_epochs": 0}, r"prune_epochs must be in \[1, 1000\]"),
    ("magnitude-pruning", {"rows": "dictionary"}, "rows must be one of auto, per-id, hashed"),
    ("magnitude-pruning", {"min_density": 1.5}, r"min_density must be in \[0, 1\] or unset"),
    ("magnitude-pruning", {"hashed_density": 0.0}, r"hashed_density must be in \(0, 1\]"),
    ("pep", {"threshold": "global"}, "threshold must be one of feature, dimension, row, element"),
    ("pep", {"threshold_init": -40.0}, r"threshold_init must be in \[-30, 30\]"),
    ("pep", {"search_epochs": 0}, r"search_epochs must be in \[1, 1000\]"),
    ("pep", {"rewind": "yes"}, "rewind must be true"),
])
def test_hyper_parameters_out_of_range_are_errors_naming_them(scheme, params, message):
    with pytest.raises(ValueError, match=message):
        (MagnitudePruning if scheme == "magnitude-pruning" else PEP)(**params)


def test_a_budget_too_small_for_per_id_rows_says_so_and_auto_falls_back_to_hashed_rows():
    feature = FeatureSpec("item", np.arange(0, 4000, 2, dtype=np.int64), np.ones(2000, dtype=np.int64), 16)
    allowed = budget_of("1/1000", feature)  # 360 bytes; the dictionary (a bitmap of 4,000 bits) alone is 508
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'pep'"):
        create_scheme("pep", rows="per-id").plan(feature, allowed)
    plan = create_scheme("pep").plan(feature, allowed)
    assert plan.params["rows"] == "hashed" and plan.size_bytes <= allowed
    with pytest.raises(BudgetTooSmall, match="minimum of scheme 'magnitude-pruning'"):
        create_scheme("magnitude-pruning").plan(feature, 12)
