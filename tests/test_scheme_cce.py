"""CCE: re-clustering between epochs changes the assignment, keeps the size, and leaves unseen IDs working."""

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

from embbench import Budget, ConfigError, FeatureSpec, build_embedding, state_size_bytes
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 1500, 16)


def build(budget: str = "1/4", **params):
    params.setdefault("kmeans_iterations", 4)  # enough for the properties tested, and quick
    budget_bytes = Budget.parse(budget).resolve(FEATURE.num_ids, FEATURE.dim)
    return build_embedding(create_scheme("cce", **params), "cce", FEATURE, budget_bytes, 0)


def train_a_little(module) -> None:
    """Pull the embeddings of the training IDs towards random targets, so that clustering has structure."""
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    ids = torch.arange(FEATURE.num_ids)
    targets = torch.randn(FEATURE.num_ids, FEATURE.dim, generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        optimizer.zero_grad()
        (module(ids) - targets).pow(2).mean().backward()
        optimizer.step()


def test_on_epoch_end_reassigns_keeps_size_and_roughly_keeps_embeddings():
    module, plan = build()
    train_a_little(module)
    ids = torch.arange(FEATURE.num_ids)
    before_assignment = module.assignment.clone()
    with torch.no_grad():
        before = module(ids)
    module.on_epoch_end(1)
    assert not torch.equal(module.assignment, before_assignment)
    assert state_size_bytes(module) == plan.size_bytes
    with torch.no_grad():
        after = module(ids)
    # The centroids plus the mean residuals reproduce the trained embeddings far better than a fresh start.
    assert (after - before).pow(2).mean() < 0.5 * before.pow(2).mean()


def test_each_slot_is_assigned_the_nearest_of_the_new_centroids():
    module, _ = build()
    train_a_little(module)
    slots = torch.arange(module.num_slots)
    with torch.no_grad():
        first_column = module.embed_slots(slots)[:, : module.chunk]
        module.on_epoch_end(1)
        centroids = module.clustered.weight[: module.rows]
    nearest = torch.cdist(first_column, centroids).argmin(1)
    agree = (nearest == module.assignment[:, 0].long()).float().mean()
    assert agree > 0.99  # exact up to ties and float rounding


def test_unseen_ids_keep_working_after_clustering_and_later_epochs_do_nothing():
    module, _ = build()
    module.on_epoch_end(1)
    extreme = torch.tensor([-1, 2**63 - 1, -(2**63), 10**12])
    with torch.no_grad():
        out = module(extreme)
    assert out.shape == (4, FEATURE.dim) and torch.isfinite(out).all()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.on_epoch_end(module.max_clusterings + 1)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_assignment_is_int16_while_rows_allow_and_counted_in_the_size():
    module, plan = build()
    p = plan.params
    assert module.assignment.dtype == torch.int16
    expected = 2 * p["rows"] * FEATURE.dim * 4 + p["slots"] * p["columns"] * 2 + (1 + p["columns"]) * 8
    assert plan.size_bytes == expected
    assert p["slots"] * p["columns"] * 2 <= 0.5 * plan.budget_bytes


def test_reclustering_is_deterministic():
    first, _ = build()
    second, _ = build()
    for module in (first, second):
        train_a_little(module)
        module.on_epoch_end(1)
    assert torch.equal(first.assignment, second.assignment)


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ConfigError, match="assignment_share must be in"):
        create_scheme("cce", assignment_share=1.0)


# inside a collection (one lookup of all tables per batch)

BATCHES = [torch.randint(-50, 2000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 1499, 1500, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


def test_each_table_is_read_once_per_column():
    module, _ = build()
    reads = module.lookups(BATCHES[1])
    assert module.clustered.lookups == module.hashed.lookups == module.columns == 4
    assert [read.table for read in reads] == [module.clustered] * 4 + [module.hashed] * 4
    clustered, hashed = module.rows_of_slots(module.slot_hash(BATCHES[1])[:, 0])
    assert torch.equal(torch.stack([read.indices for read in reads], dim=1), torch.cat([clustered, hashed], dim=1))


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize("num_columns", [4, 1])
def test_embeds_the_same_inside_a_collection(num_columns, backend, optimizer):
    module, _ = build(num_columns=num_columns)
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_a_batch_costs_one_pool_call_per_store(backend, optimizer):
    module, _ = build()
    assert_one_pool_call_per_store(module, BATCHES[0], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
def test_sgd_step_and_reclustering_in_a_collection_match_the_standalone_module(backend):
    """The epoch-end re-clustering reads and rewrites the tables where the collection holds them."""
    module, _ = build()
    probe = torch.cat([torch.arange(-10, 1510), BATCHES[1]])
    assert_sgd_step_matches_dense(module, BATCHES[0], probe, backend, after_step=lambda m: m.on_epoch_end(1))
