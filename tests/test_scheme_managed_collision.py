"""managed-collision (torchrec MCH): IDs admitted by the eviction policy own a row, all others share the last
one; the remapping is learnt from training batches only; its state is counted in the size."""

from __future__ import annotations

import sys

import pytest
import torch
from collection_checks import (
    assert_one_pool_call_per_store,
    assert_same_embeddings_in_collection,
    assert_sgd_step_matches_dense,
    backend_params,
    kernel_params,
)

from embbench import Budget, BudgetTooSmall, ConfigError, FeatureSpec, PluginError, build_embedding, state_size_bytes
from embbench.collection import FeatureEmbeddings, TableTraining, torchrec_available
from embbench.registry import create_scheme

pytest.importorskip("torchrec", reason="managed-collision wraps torchrec's MCHManagedCollisionModule")

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)


def build(budget: str = "1/4", seed: int = 0, **params):
    budget_bytes = Budget.parse(budget).resolve(FEATURE.num_ids, FEATURE.dim)
    scheme = create_scheme("managed-collision", **params)
    return build_embedding(scheme, "managed-collision", FEATURE, budget_bytes, seed)


def train_on(module, *batches: list[int]) -> None:
    module.train()
    for batch in batches:
        module(torch.tensor(batch))
    module.eval()


@pytest.mark.parametrize("policy, metadata", [("lfu", 1), ("lru", 1), ("distance-lfu", 2)])
def test_size_counts_table_slots_and_torchrecs_fixed_state(policy, metadata):
    module, plan = build(eviction_policy=policy)
    rows = plan.params["rows"]
    assert plan.size_bytes == state_size_bytes(module) == 1026 * 8 + rows * (16 * 4 + (2 + metadata) * 8)
    assert plan.size_bytes <= plan.budget_bytes < plan.size_bytes + 16 * 4 + (2 + metadata) * 8
    assert module.mch.state_dict()["_mch_sorted_raw_ids"].numel() == rows


def test_before_training_every_id_shares_the_last_row():
    module, plan = build(rows=8)
    ids = torch.tensor([0, 1, 4999, -7, -(2**63)])
    assert (module.index_tuples(ids)[:, 0] == plan.params["rows"] - 1).all()


def test_the_id_2_63_minus_1_is_torchrecs_empty_slot_marker_and_takes_an_empty_slots_row():
    module, _ = build(rows=8)
    assert module.rows(torch.tensor([2**63 - 1]))[0] == 0


def test_lfu_admits_the_most_frequent_training_ids_and_the_rest_share_the_last_row():
    module, _ = build(rows=4)  # three slots and the shared row
    train_on(module, [10] * 5 + [-20] * 4 + [2**62] * 3 + [40])
    rows = module.rows(torch.tensor([10, -20, 2**62, 40, 12345]))
    assert len(set(rows[:3].tolist())) == 3 and 3 not in rows[:3].tolist()
    assert rows[3] == rows[4] == 3


def test_an_evicted_ids_row_goes_to_the_id_that_replaces_it():
    module, _ = build(rows=4)
    train_on(module, [10] * 5 + [20] * 4 + [30] * 2)
    row_of_30 = int(module.rows(torch.tensor([30]))[0])
    train_on(module, [50] * 9)  # LFU: 50's count beats 30's
    rows = module.rows(torch.tensor([10, 20, 30, 50]))
    assert rows[3] == row_of_30 and rows[2] == 3


def test_evaluation_does_not_change_the_remapping():
    module, _ = build(rows=4)
    module.eval()
    module(torch.tensor([1, 1, 2, 3]))
    assert (module.rows(torch.tensor([1, 2, 3])) == 3).all()


def test_eviction_interval_buffers_batches_and_the_epoch_end_flushes_them():
    module, _ = build(rows=4, eviction_interval=3)
    train_on(module, [7, 7], [8])
    assert (module.rows(torch.tensor([7, 8])) == 3).all()
    module.on_epoch_end(1)
    assert (module.rows(torch.tensor([7, 8])) != 3).all()


def test_a_batch_larger_than_the_first_is_profiled_whole():
    module, _ = build(rows=64)
    train_on(module, [1], list(range(100, 140)) * 2)
    assert (module.rows(torch.tensor(range(100, 140))) != 63).all()


def test_gradients_reach_only_the_rows_ids_map_to():
    module, _ = build(rows=4)
    train_on(module, [5, 5, 6, 6, 7, 7])  # every slot taken
    module.train()
    module(torch.tensor([5, 99])).sum().backward()  # 99, seen once, is not admitted
    touched = module.table.weight.grad.abs().sum(dim=1) > 0
    assert touched.tolist().count(True) == 2 and touched[3]


@pytest.mark.skipif(not torchrec_available(), reason="quantised tables need torchrec")
def test_quantised_tables_keep_the_remapping():
    from embbench.measure.quantization import quantize_model

    module, _ = build(rows=16)
    train_on(module, [3, 3, 4, 5])
    embeddings = FeatureEmbeddings({"f": module}, TableTraining("torchrec", "sgd"))
    quantized = quantize_model(embeddings, "fp16")
    ids = torch.tensor([3, 4, 5, 6])
    assert torch.equal(quantized["f"].rows(ids), module.rows(ids))
    embeddings.eval()
    with torch.no_grad():
        torch.testing.assert_close(quantized.embed("f", ids), embeddings.embed("f", ids), rtol=0, atol=1e-4)


def test_budget_below_torchrecs_fixed_state_names_the_minimum():
    with pytest.raises(BudgetTooSmall, match="fixed state"):
        build("1/64")


@pytest.mark.parametrize(
    "params, message",
    [({"rows": 1}, "rows must be >= 2"), ({"eviction_policy": "fifo"}, "eviction_policy must be one of"),
     ({"eviction_interval": 0}, "eviction_interval must be >= 1")],
)
def test_bad_hyper_parameters_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        create_scheme("managed-collision", **params)


def test_without_torchrec_the_plugin_loads_and_building_says_why(monkeypatch):
    scheme = create_scheme("managed-collision")
    plan = scheme.plan(FEATURE, 10**6)
    monkeypatch.setitem(sys.modules, "torchrec.modules", None)
    monkeypatch.setitem(sys.modules, "torchrec.modules.mc_modules", None)
    with pytest.raises(PluginError, match="torchrec cannot be imported"):
        scheme.build(FEATURE, plan, seed=0)


# inside a collection (one lookup of all tables per batch)

BATCHES = [torch.tensor([5, 5, 6, 6, 7, 9]), torch.randint(0, 40, (64,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("eviction_interval", [1, 2])
def test_embeds_and_learns_the_remapping_the_same_inside_a_collection(eviction_interval, backend, optimizer):
    module, _ = build(rows=16, eviction_interval=eviction_interval)
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


def test_a_collection_records_training_ids_only():
    module, _ = build(rows=4)
    embeddings = FeatureEmbeddings({"f": module}, TableTraining("torch", "adam"))
    embeddings.eval()
    embeddings({"f": torch.tensor([1, 1, 2])})
    assert (module.rows(torch.tensor([1, 2])) == 3).all()
    embeddings.train()
    embeddings({"f": torch.tensor([1, 1, 2])})
    assert (module.rows(torch.tensor([1, 2])) != 3).all()


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_a_batch_costs_one_pool_call_per_store(backend, optimizer):
    module, _ = build(rows=16)
    assert_one_pool_call_per_store(module, BATCHES[1], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
def test_sgd_step_through_a_collection_matches_a_dense_step(backend):
    module, _ = build(rows=16)
    train_on(module, BATCHES[0].tolist())
    assert_sgd_step_matches_dense(module, BATCHES[1], torch.arange(-5, 60), backend)
