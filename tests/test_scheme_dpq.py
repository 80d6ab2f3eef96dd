"""DPQ and MGQE: the stored state is the packed codes and the codebooks alone (its bytes the size formula; the
training-time query table and keys left out), every evaluation embedding is the concatenation of the centroids its
stored codes pick, codes stay in range (MGQE's tail among its first K_tail), the state round-trips exactly, the
codes are re-derived after training steps, and the model learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from collection_checks import assert_same_embeddings_in_collection, assert_sgd_step_matches_dense, backend_params
from embbench_plugins.schemes.dpq import code_bits, pack_codes, packed_bytes, unpack_codes

from embbench import (
    Budget,
    BudgetTooSmall,
    ConfigError,
    FeatureSpec,
    TableInit,
    build_embedding,
    initialise_tables,
    state_size_bytes,
)
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 1500, 16)


def skewed_feature(num_ids: int = 1500, dim: int = 16, seed: int = 0) -> FeatureSpec:
    """Spread-out IDs (a sorted-offsets dictionary) with Zipf-like training counts."""
    generator = np.random.default_rng(seed)
    ids = np.sort(generator.choice(10**6, size=num_ids, replace=False)).astype(np.int64)
    counts = generator.permutation(np.ceil(10_000 / np.arange(1, num_ids + 1))).astype(np.int64)
    return FeatureSpec("item", ids, counts, dim)


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(name: str = "dpq", budget: str = "1/4", feature: FeatureSpec = FEATURE, seed: int = 0, **params):
    return build_embedding(create_scheme(name, **params), name, feature, budget_of(budget, feature), seed)


def train_steps(module, ids: torch.Tensor, targets: torch.Tensor, steps: int, lr: float = 0.05) -> None:
    """Adam on every parameter (query table, keys, codebooks), pulling the training embeddings to ``targets``."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        (module(ids) - targets).pow(2).sum(1).mean().backward()
        optimizer.step()
    module.eval()


def random_targets(feature: FeatureSpec = FEATURE, seed: int = 1) -> torch.Tensor:
    return torch.randn(feature.num_ids, feature.dim, generator=torch.Generator().manual_seed(seed))


def read_code(packed: torch.Tensor, index: int, bits: int) -> int:
    """Code ``index`` of a packed byte string, read bit by bit (independently of unpack_codes)."""
    data = packed.tolist()
    return sum(((data[(index * bits + t) // 8] >> ((index * bits + t) % 8)) & 1) << t for t in range(bits))


def stored_embedding(state: dict[str, torch.Tensor], row: int, plan) -> torch.Tensor:
    """The embedding of code row ``row`` from the state_dict alone: its codes read from the packed bytes (hot or
    tail, by the bitmap), the centroids they pick concatenated."""
    p = plan.params
    groups, codebook = p["groups"], state["codebook"]
    if p["tail_centroids"] is None:
        hot, rank = True, row
    else:
        bitmap = state["hot_bitmap"].tolist()
        flags = [(bitmap[r // 8] >> (r % 8)) & 1 for r in range(row + 1)]
        hot, rank = bool(flags[row]), sum(1 for flag in flags[:row] if flag == flags[row])
    store, bits = (state["hot_codes"], code_bits(p["centroids"])) if hot else (
        state["tail_codes"], code_bits(p["tail_centroids"]))
    codes = [read_code(store, rank * groups + j, bits) for j in range(groups)]
    return torch.cat([codebook[j, code] for j, code in enumerate(codes)])


# packed codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16])
def test_packed_codes_take_bits_each_and_read_back_exactly(bits):
    count = 1001  # not a multiple of 8: the last byte is partly used
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8) == packed_bytes(count, bits)
    assert torch.equal(unpack_codes(packed, torch.arange(count), bits), codes)
    for index in (0, 1, 7, 500, count - 1):
        assert read_code(packed, index, bits) == int(codes[index])


def test_code_bits_is_the_ceiling_of_log2_of_the_centroids():
    assert [code_bits(k) for k in (1, 2, 3, 4, 5, 16, 17, 256, 257, 65536)] == [0, 1, 2, 2, 3, 4, 5, 8, 9, 16]


# the stored state and its size


@pytest.mark.parametrize(("name", "budget", "mapping"), [
    ("dpq", "1/4", "per-id"), ("dpq", "1/16", "per-id"), ("dpq", "1/64", "hashed"),
    ("mgqe", "1/4", "per-id"), ("mgqe", "1/16", "per-id"), ("mgqe", "1/32", "hashed"),
])
def test_the_state_is_codes_codebooks_and_mapping_and_its_bytes_are_the_formula(name, budget, mapping):
    module, plan = build(name, budget)
    p = plan.params
    assert p["mapping"] == mapping
    rows, groups, k, tail, dim = p["rows"], p["groups"], p["centroids"], p["tail_centroids"], FEATURE.dim
    hot = p["hot_rows"]
    if tail is None:
        assert hot == rows
        codes = math.ceil(rows * groups * code_bits(k) / 8)
    else:
        assert hot == int(0.1 * rows) and code_bits(tail) < code_bits(k)
        codes = (math.ceil(hot * groups * code_bits(k) / 8) + math.ceil((rows - hot) * groups * code_bits(tail) / 8)
                 + math.ceil(rows / 8))  # and the bitmap of hot rows
    mapping_bytes = 8 + 8 if mapping == "per-id" else 8  # a run dictionary and the unseen hash, or the slot hash
    assert state_size_bytes(module) == plan.size_bytes == codes + k * dim * 4 + mapping_bytes
    assert plan.size_bytes <= plan.budget_bytes
    expected = {"codebook", "hot_codes", "tail_codes"} | ({"hot_bitmap"} if tail is not None else set())
    expected |= {"vocabulary.vocabulary_start", "unseen_hash.hash_seed"} if mapping == "per-id" else {
        "slot_hash.hash_seed"}
    assert set(module.state_dict()) == expected  # no query table, no keys, no logit statistics


def test_the_training_memory_is_stated_but_not_counted():
    module, plan = build()
    p = plan.params
    training = sum(t.numel() * t.element_size() for t in (module.query.weight, module.assignment.keys))
    assert training == (p["rows"] + p["centroids"]) * FEATURE.dim * 4
    assert f"{training:,} bytes" in plan.notes["training_memory"]
    assert state_size_bytes(module) == plan.size_bytes < plan.size_bytes + training


def test_codes_are_packed_in_the_narrowest_width_of_k():
    module, plan = build(num_groups=4, num_centroids=5)  # 3 bits per code, not a byte
    assert plan.params["groups"] == 4 and module.hot_bits == 3
    assert module.hot_codes.numel() == math.ceil(FEATURE.num_ids * 4 * 3 / 8)


# every evaluation embedding is the centroids its stored codes pick


@pytest.mark.parametrize(("name", "budget"), [("dpq", "1/4"), ("dpq", "1/64"), ("mgqe", "1/8"), ("mgqe", "1/32")])
def test_every_evaluation_embedding_is_the_concatenation_of_the_centroids_its_stored_codes_pick(name, budget):
    module, plan = build(name, budget)
    train_steps(module, torch.arange(FEATURE.num_ids), random_targets(), steps=5)
    state = module.state_dict()
    ids = torch.arange(0, FEATURE.num_ids, 37)
    rows, known = module.rows_of(ids)
    assert bool(known.all())
    with torch.no_grad():
        out = module(ids)
    for position, row in enumerate(rows.tolist()):
        torch.testing.assert_close(out[position], stored_embedding(state, row, plan), rtol=0, atol=0)


def test_evaluation_reads_no_query_and_ignores_the_training_state():
    module, _ = build()
    ids = torch.arange(0, FEATURE.num_ids, 5)
    with torch.no_grad():
        before = module.eval()(ids)
        module.query.weight.normal_()
        module.assignment.keys.normal_()
        after = module(ids)
    assert torch.equal(before, after)
    reads = module.lookups(ids)
    assert len(reads) == 1 and reads[0].indices.numel() == 0 and int(reads[0].lengths.sum()) == 0


# codes in range, and MGQE's tail


def test_codes_are_in_range_and_unseen_ids_take_hashed_codes():
    module, plan = build()
    k = plan.params["centroids"]
    ids = torch.cat([torch.arange(FEATURE.num_ids), torch.tensor([-1, 1500, 10**12, 2**63 - 1, -(2**63)])])
    codes = module.index_tuples(ids)
    assert codes.shape == (len(ids), plan.params["groups"]) and codes.min() >= 0 and codes.max() < k
    assert len(torch.unique(codes[: FEATURE.num_ids], dim=0)) > 1
    unseen = ids[FEATURE.num_ids :]
    assert torch.equal(codes[FEATURE.num_ids :], module.unseen_hash(unseen))
    with torch.no_grad():
        first, second = module(unseen), module(unseen.clone())
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_mgqe_gives_the_most_frequent_ids_all_k_centroids_and_the_tail_only_the_first_k_tail():
    feature = skewed_feature()
    module, plan = build("mgqe", "1/8", feature)
    p = plan.params
    k, tail = p["centroids"], p["tail_centroids"]
    assert tail < k and code_bits(tail) < code_bits(k) and p["hot_rows"] == int(0.1 * feature.num_ids)
    ids = torch.as_tensor(feature.ids)
    hot = module.is_hot(module.rows_of(ids)[0]).numpy()
    order = np.lexsort((feature.ids, -feature.counts))
    assert hot.sum() == p["hot_rows"] and hot[order[: p["hot_rows"]]].all()
    train_steps(module, ids, random_targets(feature), steps=5)
    codes = module.index_tuples(ids)
    assert codes[~torch.from_numpy(hot)].max() < tail
    assert codes[torch.from_numpy(hot)].max() >= tail  # the frequent IDs do use the centroids beyond the tail's
    assert codes.min() >= 0 and codes.max() < k
    unseen = module.index_tuples(torch.tensor([-5, 10**7, 2**63 - 1]))
    assert unseen.max() < tail  # an unseen ID is embedded like a tail ID


def test_mgqe_tail_rows_learn_only_among_the_first_k_tail_centroids_in_training_too():
    feature = skewed_feature()
    module, plan = build("mgqe", "1/8", feature)
    ids = torch.as_tensor(feature.ids)
    module.train()
    rows, _ = module.rows_of(ids)
    logits = module.logits(module.query.weight[rows], module.is_hot(rows), training=True)
    tail = ~module.is_hot(rows)
    assert torch.isinf(logits[tail][:, :, plan.params["tail_centroids"] :]).all()
    assert torch.isfinite(logits[~tail]).all()


def test_mgqe_with_hashed_rows_makes_the_rows_of_the_heaviest_counts_hot():
    feature = skewed_feature()
    module, plan = build("mgqe", "1/32", feature)
    assert plan.params["mapping"] == "hashed"
    slots = module.slot_hash(torch.as_tensor(feature.ids))[:, 0].numpy()
    weight = np.bincount(slots, weights=feature.counts, minlength=plan.params["rows"])
    hot = module.is_hot(torch.arange(plan.params["rows"])).numpy()
    assert hot.sum() == plan.params["hot_rows"] > 0
    assert weight[hot].min() >= weight[~hot].max()


# state round trip, and when the codes are re-derived


@pytest.mark.parametrize(("name", "budget"), [("dpq", "1/4"), ("mgqe", "1/8"), ("dpq", "1/64")])
def test_a_state_dict_round_trip_reproduces_every_embedding_exactly(name, budget):
    trained, _ = build(name, budget, seed=0)
    train_steps(trained, torch.arange(FEATURE.num_ids), random_targets(), steps=5)
    fresh, _ = build(name, budget, seed=7)  # other codebooks, queries and keys
    fresh.load_state_dict(trained.state_dict())  # strict: nothing missing, nothing unexpected
    ids = torch.cat([torch.arange(-20, FEATURE.num_ids + 20), torch.tensor([2**63 - 1, -(2**63)])])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), trained(ids))
    assert not torch.equal(fresh.query.weight, trained.query.weight)  # the training state did not travel


def test_after_training_steps_evaluation_re_derives_the_codes_from_the_queries():
    module, _ = build()
    ids = torch.arange(FEATURE.num_ids)
    before = module.index_tuples(ids)
    train_steps(module, ids, random_targets(), steps=3)
    after = module.index_tuples(ids)
    assert not torch.equal(before, after)
    with torch.no_grad():  # the argmax of each row's logits normalised by the running statistics
        derived = module.logits(module.query.weight, module.is_hot(ids), training=False).argmax(-1)
    assert torch.equal(after, derived)


def test_loading_a_state_keeps_its_codes_rather_than_re_deriving_them():
    """The trainer restores the best epoch's state after later epochs moved the queries: its codes must stay."""
    module, _ = build()
    ids = torch.arange(FEATURE.num_ids)
    train_steps(module, ids, random_targets(), steps=2)
    best_codes = module.index_tuples(ids)
    best = {name: value.clone() for name, value in module.state_dict().items()}
    train_steps(module, ids, random_targets(seed=2), steps=5)
    assert not torch.equal(module.index_tuples(ids), best_codes)
    module.train()
    module(ids[:64]).sum().backward()  # a training forward: the codes would be re-derived at the next use ...
    module.load_state_dict(best)  # ... unless a state is loaded: its codes are the model
    assert torch.equal(module.index_tuples(ids), best_codes)


def test_restarting_the_query_table_as_a_suite_init_re_derives_the_codes():
    module, _ = build()
    ids = torch.arange(FEATURE.num_ids)
    before = module.index_tuples(ids)
    assert initialise_tables(module, TableInit("uniform", scale=1.0)) == 1  # the query table, the only table
    after = module.index_tuples(ids)
    assert not torch.equal(before, after)
    with torch.no_grad():
        derived = module.logits(module.query.weight, module.is_hot(ids), training=False).argmax(-1)
    assert torch.equal(after, derived)


def test_same_seed_same_codes_other_seed_other_codes():
    first, second, other = (build(seed=seed)[0] for seed in (3, 3, 4))
    ids = torch.arange(FEATURE.num_ids)
    assert torch.equal(first.index_tuples(ids), second.index_tuples(ids))
    assert not torch.equal(first.index_tuples(ids), other.index_tuples(ids))


# learning


@pytest.mark.parametrize(("name", "budget", "ratio"),
                         [("dpq", "1/8", 0.05), ("mgqe", "1/8", 0.05), ("dpq", "1/32", 0.7)])
def test_the_compressed_model_learns_a_clustered_target(name, budget, ratio):
    """IDs of 8 planted clusters regress to their cluster's vector, measured in evaluation (stored codes only):
    per-ID codes learn it all but exactly; hashed rows (1/32: fewer rows than IDs) keep the collisions' error."""
    generator = torch.Generator().manual_seed(5)
    centers = torch.randn(8, FEATURE.dim, generator=generator)
    targets = centers[torch.randint(0, 8, (FEATURE.num_ids,), generator=generator)]
    module, plan = build(name, budget)
    assert plan.params["mapping"] == ("hashed" if budget == "1/32" else "per-id")
    ids = torch.arange(FEATURE.num_ids)

    def eval_loss() -> float:
        with torch.no_grad():
            return float((module.eval()(ids) - targets).pow(2).sum(1).mean())

    initial = eval_loss()
    train_steps(module, ids, targets, steps=150)
    assert eval_loss() < ratio * initial


# inside a collection


BATCHES = [torch.randint(-50, 2000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 1499, 1500, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(("name", "budget"), [("dpq", "1/4"), ("mgqe", "1/32")])
def test_an_sgd_step_through_a_collection_re_derives_the_same_codes_as_standalone(name, budget, backend):
    """The codes are re-derived from the query rows where the collection holds them."""
    module, _ = build(name, budget)
    probe = torch.cat([torch.arange(-10, 1510), BATCHES[1]])
    assert_sgd_step_matches_dense(module, BATCHES[0], probe, backend)


@pytest.mark.parametrize(("name", "budget"), [("dpq", "1/4"), ("mgqe", "1/8")])
def test_embeds_the_same_inside_a_collection(name, budget):
    module, _ = build(name, budget)
    assert_same_embeddings_in_collection(module, BATCHES, "torch", "adam")


# planning


def test_plans_use_at_least_90_percent_of_budgets_up_to_the_largest_layout():
    feature = FeatureSpec.from_vocabulary("item", 1_000_000, 32)
    for name, budgets in (("dpq", ("1/4", "1/8", "1/16", "1/64", "1/256", "1/1000")),
                          ("mgqe", ("1/8", "1/16", "1/64", "1/256", "1/1000"))):
        for budget in budgets:
            plan = create_scheme(name).plan(feature, budget_of(budget, feature))
            assert 0.9 * plan.budget_bytes <= plan.size_bytes <= plan.budget_bytes, (name, budget)


def test_the_largest_layout_is_d_groups_of_max_centroids_and_larger_budgets_are_not_filled():
    feature = FeatureSpec.from_vocabulary("item", 1_000_000, 32)
    plan = create_scheme("dpq").plan(feature, budget_of("1/2", feature))
    assert (plan.params["groups"], plan.params["centroids"]) == (32, 256)
    assert plan.size_bytes == 1_000_000 * 32 + 256 * 32 * 4 + 16
    assert plan.size_bytes == create_scheme("dpq").plan(feature, budget_of("1", feature)).size_bytes


def test_per_id_codes_need_min_code_bits_else_the_ids_are_hashed_to_rows_and_the_plan_says_why():
    feature = FeatureSpec.from_vocabulary("item", 1_000_000, 32)
    per_id = create_scheme("dpq").plan(feature, budget_of("1/64", feature))
    assert per_id.params["mapping"] == "per-id"
    assert per_id.params["groups"] * code_bits(per_id.params["centroids"]) >= 16
    hashed = create_scheme("dpq").plan(feature, budget_of("1/128", feature))
    assert hashed.params["mapping"] == "hashed" and "16 code bits" in hashed.notes["mapping"]
    assert hashed.params["rows"] < feature.num_ids
    assert hashed.params["groups"] * code_bits(hashed.params["centroids"]) >= 16
    asked, _ = build(mapping="hashed")
    assert asked.vocabulary is None and asked.num_rows <= FEATURE.num_ids + 1


def test_fewer_bits_suffice_where_they_tell_every_id_apart():
    scheme = create_scheme("dpq")
    assert scheme.required_bits(10**6, 32) == 16 and scheme.required_bits(1000, 32) == 10  # 2^10 >= 1000
    feature = FeatureSpec.from_vocabulary("item", 1000, 32)
    plan = scheme.plan(feature, budget_of("1/24", feature))
    assert plan.params["mapping"] == "per-id"
    assert 10 <= plan.params["groups"] * code_bits(plan.params["centroids"]) < 16


def test_given_groups_and_centroids_are_kept_groups_rounded_to_a_divisor_of_the_dim():
    _, plan = build(num_groups=4, num_centroids=32)
    assert (plan.params["groups"], plan.params["centroids"]) == (4, 32)
    _, plan = build(num_groups=5)
    assert plan.params["groups"] == 4
    _, plan = build("mgqe", num_centroids=64, tail_centroids=10)
    assert (plan.params["centroids"], plan.params["tail_centroids"]) == (64, 10)


def test_a_budget_below_one_row_of_the_fewest_centroids_is_refused_with_that_minimum():
    minimum = 1 + 16 * FEATURE.dim * 4 + 8  # one row's 4-bit code, 16 centroids of d, the hash seed
    with pytest.raises(BudgetTooSmall, match=f"{minimum:,} bytes"):
        create_scheme("dpq").plan(FEATURE, minimum - 1)
    assert create_scheme("dpq").plan(FEATURE, minimum).size_bytes == minimum


@pytest.mark.parametrize(("name", "params", "message"), [
    ("dpq", {"num_groups": 0}, "num_groups must be in"),
    ("dpq", {"num_centroids": 1}, "num_centroids must be in"),
    ("dpq", {"max_centroids": 70_000}, "max_centroids must be in"),
    ("dpq", {"min_centroids": 300}, "min_centroids must be in"),
    ("dpq", {"mapping": "per-slot"}, "mapping.* must be one of"),
    ("dpq", {"min_code_bits": 0}, "min_code_bits must be in"),
    ("dpq", {"temperature": 0.0}, "temperature must be in"),
    ("dpq", {"init_std": 0.0}, "init_std must be in"),
    ("mgqe", {"num_centroids": 16, "tail_centroids": 16}, "tail_centroids must be in"),
    ("mgqe", {"frequent_fraction": 1.5}, "frequent_fraction must be in"),
])
def test_bad_hyper_parameters_are_rejected_naming_them(name, params, message):
    with pytest.raises(ConfigError, match=message):
        create_scheme(name, **params)
