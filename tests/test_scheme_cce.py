"""CCE: the per-ID assignment (its size, its narrow type, unseen IDs hashed), the hashed-slot variant as the
fallback, re-clustering after every epoch without overflowing its seeds, and a k-means that finds planted
clusters."""

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
from embbench_plugins.schemes.cce import kmeans, nearest_centroid

from embbench import Budget, ConfigError, FeatureSpec, VocabularyIndex, build_embedding, state_size_bytes
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 1500, 16)


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(budget: str = "1/4", feature: FeatureSpec = FEATURE, **params):
    params.setdefault("kmeans_iterations", 4)  # enough for the properties tested, and quick
    return build_embedding(create_scheme("cce", **params), "cce", feature, budget_of(budget, feature), 0)


def train_a_little(module, feature: FeatureSpec = FEATURE) -> None:
    """Pull the embeddings of the training IDs towards random targets, so that clustering has structure."""
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    ids = torch.arange(feature.num_ids)
    targets = torch.randn(feature.num_ids, feature.dim, generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        optimizer.zero_grad()
        (module(ids) - targets).pow(2).mean().backward()
        optimizer.step()


# the per-ID assignment and its size


def test_default_assignment_is_per_id_one_entry_per_training_id_in_uint8_and_counted():
    module, plan = build()
    p = plan.params
    assert p["assignment"] == "per-id" and p["keys"] == FEATURE.num_ids and p["rows"] <= 256
    assert module.assignment.shape == (FEATURE.num_ids, p["columns"]) and module.assignment.dtype == torch.uint8
    dictionary = VocabularyIndex.size_bytes(FEATURE.ids)  # 0..1499: a run, 8 bytes
    expected = 2 * p["rows"] * FEATURE.dim * 4 + FEATURE.num_ids * p["columns"] * 1 + dictionary + 2 * 8
    assert plan.size_bytes == state_size_bytes(module) == expected
    assert plan.size_bytes >= 0.99 * plan.budget_bytes  # the rows take what the assignment leaves


@pytest.mark.parametrize(("rows", "dtype", "width"), [(256, torch.uint8, 1), (257, torch.int16, 2),
                                                      (32768, torch.int16, 2), (32769, torch.int32, 4)])
def test_per_id_assignment_takes_the_narrowest_type_that_holds_the_rows(rows, dtype, width):
    feature = FeatureSpec.from_vocabulary("item", 300, 4)
    module, plan = build_embedding(create_scheme("cce", rows=rows, num_columns=2), "cce", feature, 10**7, 0)
    assert plan.params["assignment"] == "per-id" and module.assignment.dtype == dtype
    assert module.assignment.element_size() == width
    assert plan.size_bytes == state_size_bytes(module) == 2 * rows * 4 * 4 + 300 * 2 * width + 8 + 16


def test_per_id_uses_the_budget_of_a_large_vocabulary():
    feature = FeatureSpec.from_vocabulary("item", 1_000_000, 32)
    for budget in ("1/2", "1/4", "1/16"):
        plan = create_scheme("cce").plan(feature, budget_of(budget, feature))
        assert plan.params["assignment"] == "per-id"
        assert plan.size_bytes >= 0.99 * plan.budget_bytes, budget


def test_a_budget_too_small_for_the_per_id_assignment_falls_back_to_hashed_slots_and_says_so():
    budget = budget_of("1/64")  # 1500 IDs x 4 uint8 entries alone are more than 1/64 of the table
    plan = create_scheme("cce").plan(FEATURE, budget)
    assert plan.params["assignment"] == "hashed" and plan.params["keys"] < FEATURE.num_ids * 4
    assert "per-ID assignment" in plan.notes["assignment"] and "over the budget" in plan.notes["assignment"]
    module, built = build("1/64")
    assert state_size_bytes(module) == built.size_bytes <= budget
    assert built.size_bytes >= 0.9 * budget


def test_unseen_ids_take_hashed_rows_and_training_ids_their_own_assignment():
    module, _ = build()
    train_a_little(module)
    module.on_epoch_end(1)
    known = torch.arange(10)
    clustered, _ = module.rows_of_ids(known)
    assert torch.equal(clustered - module.column_offsets, module.assignment[:10].long())
    unseen = torch.tensor([FEATURE.num_ids, FEATURE.num_ids + 1, -1, 2**63 - 1, -(2**63), 10**12])
    clustered, hashed = module.rows_of_ids(unseen)
    assert torch.equal(clustered - module.column_offsets, module.unseen_hash(unseen))
    assert torch.equal(hashed - module.column_offsets, module.residual_hash(unseen))
    with torch.no_grad():
        assert torch.isfinite(module(unseen)).all()


def test_with_a_row_per_id_reclustering_keeps_every_training_embedding():
    """Per-ID (unlike slots) each training ID can be its own cluster: with as many rows as IDs, k-means puts
    every ID on its own centroid and the re-clustered module embeds the training IDs exactly as before."""
    feature = FeatureSpec.from_vocabulary("item", 200, 8)
    module, plan = build_embedding(create_scheme("cce", rows=200), "cce", feature, 10**6, 0)
    assert plan.params["assignment"] == "per-id"
    train_a_little(module, feature)
    ids = torch.arange(200)
    with torch.no_grad():
        before = module(ids)
        module.on_epoch_end(1)
        after = module(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert (module.hashed.weight == 0).all()  # no residual left to spread


# re-clustering


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


@pytest.mark.parametrize("assignment", ["per-id", "hashed"])
def test_each_key_is_assigned_the_nearest_of_the_new_centroids(assignment):
    module, _ = build(assignment=assignment)
    train_a_little(module)
    keys = torch.arange(module.num_keys)
    with torch.no_grad():
        first_column = module.embed_keys(keys)[:, : module.chunk]
        module.on_epoch_end(1)
        centroids = module.clustered.weight[: module.rows]
    nearest = torch.cdist(first_column, centroids).argmin(1)
    agree = (nearest == module.assignment[:, 0].long()).float().mean()
    assert agree > 0.99  # exact up to ties and float rounding


def test_reclusters_after_every_epoch_by_default_and_stops_after_max_clusterings():
    every, _ = build()
    bounded, _ = build(max_clusterings=2)
    assert every.max_clusterings is None
    for module in (every, bounded):
        module.on_epoch_end(1)
        module.on_epoch_end(2)
    for module, changes in ((every, True), (bounded, False)):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        module.on_epoch_end(50)
        same = all(torch.equal(state[k], v) for k, v in module.state_dict().items())
        assert same != changes


def test_thirty_reclusterings_neither_overflow_the_seeds_nor_repeat_the_hash():
    """Regression: the residual hash's seed was multiplied by 31 at each re-clustering and overflowed int64
    at the 11th."""
    module, plan = build(max_clusterings=30, kmeans_iterations=2)
    seeds = set()
    ids = torch.cat([torch.arange(FEATURE.num_ids), torch.tensor([-1, 2**63 - 1])])
    for epoch in range(1, 31):
        module.on_epoch_end(epoch)
        seed = int(module.residual_hash.hash_seed)
        assert 0 <= seed < 2**62
        seeds.add(seed)
    assert len(seeds) == 30
    assert state_size_bytes(module) == plan.size_bytes
    with torch.no_grad():
        assert torch.isfinite(module(ids)).all()


def test_reclustering_is_deterministic():
    first, _ = build()
    second, _ = build()
    for module in (first, second):
        train_a_little(module)
        module.on_epoch_end(1)
    assert torch.equal(first.assignment, second.assignment)


def test_kmeans_samples_200_points_per_row_unless_told():
    module, plan = build()
    assert module.kmeans_points == 200 * plan.params["rows"]
    assert build(kmeans_points=100)[0].kmeans_points == 100


# k-means


def planted(clusters: int = 8, per_cluster: int = 50, dim: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=generator) * 10
    truth = torch.arange(clusters).repeat_interleave(per_cluster)
    points = centers[truth] + 0.1 * torch.randn(len(truth), dim, generator=generator)
    return points, truth, centers


def test_kmeans_finds_planted_clusters():
    points, truth, centers = planted()
    centroids = kmeans(points, 8, 100, torch.Generator().manual_seed(3))
    labels = nearest_centroid(points, centroids)
    # each planted cluster is exactly one found cluster, and its centroid is the planted centre
    pairs = torch.unique(torch.stack([truth, labels], 1), dim=0)
    assert len(pairs) == 8 and len(pairs[:, 1].unique()) == 8
    matched = centroids[labels[:: 50]]
    assert (matched - centers).abs().max() < 0.1


def test_kmeans_reseeds_emptied_clusters_by_splitting_large_ones():
    """Half the points on one spot: started from duplicates of it, plain Lloyd would leave clusters empty."""
    points, _, _ = planted(clusters=4, per_cluster=25)
    points = torch.cat([points, torch.zeros(100, 4)])
    centroids = kmeans(points, 8, 100, torch.Generator().manual_seed(0))
    counts = torch.bincount(nearest_centroid(points, centroids), minlength=8)
    assert (counts > 0).all()


def test_kmeans_with_no_more_points_than_clusters_keeps_every_point():
    points = torch.randn(5, 3)
    centroids = kmeans(points, 8, 10, torch.Generator().manual_seed(0))
    assert centroids.shape == (8, 3) and torch.equal(centroids[:5], points)


def test_kmeans_from_random_points_as_faiss_also_converges_to_a_fixed_point():
    points, _, _ = planted(seed=2)
    centroids = kmeans(points, 8, 100, torch.Generator().manual_seed(0), init="random")
    labels = nearest_centroid(points, centroids)
    means = torch.zeros_like(centroids).index_add_(0, labels, points) / torch.bincount(labels, minlength=8)[:, None]
    torch.testing.assert_close(centroids, means)  # Lloyd's fixed point: each centroid the mean of its points


def test_kmeans_is_deterministic_for_a_seed():
    points, _, _ = planted(seed=4)
    first = kmeans(points, 6, 100, torch.Generator().manual_seed(1))
    second = kmeans(points, 6, 100, torch.Generator().manual_seed(1))
    assert torch.equal(first, second)


# initialisation and parameters


def test_uniform_init_follows_the_reference_over_the_whole_dim_and_is_recorded():
    module, plan = build(init="uniform")
    bound = FEATURE.dim**-0.5  # the whole embedding's dim, though each table is d/c wide
    for table in (module.clustered, module.hashed):
        assert table.weight.abs().max() <= bound and table.weight.abs().max() > 0.95 * bound
    assert "uniform" in plan.notes["init"] and plan.params["init"] == "uniform"
    normal, plan = build(init="normal", init_std=0.02)
    assert abs(normal.clustered.weight.std().item() - 0.02) < 0.002 and "normal" in plan.notes["init"]


@pytest.mark.parametrize(("params", "message"), [
    ({"assignment_share": 1.0}, "assignment_share must be in"),
    ({"max_clusterings": -1}, "max_clusterings must be in"),
    ({"max_clusterings": 100_001}, "max_clusterings must be in"),
    ({"assignment": "per-slot"}, "assignment"),
    ({"kmeans_points": 0}, "kmeans_points must be in"),
    ({"init": "xavier"}, "init"),
    ({"kmeans_init": "forgy"}, "kmeans_init"),
])
def test_bad_hyper_parameters_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        create_scheme("cce", **params)


# inside a collection (one lookup of all tables per batch)

BATCHES = [torch.randint(-50, 2000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 1499, 1500, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


def test_each_table_is_read_once_per_column():
    module, _ = build()
    reads = module.lookups(BATCHES[1])
    assert module.clustered.lookups == module.hashed.lookups == module.columns == 4
    assert [read.table for read in reads] == [module.clustered] * 4 + [module.hashed] * 4
    clustered, hashed = module.rows_of_ids(BATCHES[1])
    assert torch.equal(torch.stack([read.indices for read in reads], dim=1), torch.cat([clustered, hashed], dim=1))


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize(("num_columns", "assignment"), [(4, "per-id"), (1, "per-id"), (4, "hashed")])
def test_embeds_the_same_inside_a_collection(num_columns, assignment, backend, optimizer):
    module, _ = build(num_columns=num_columns, assignment=assignment)
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
