"""Bag (multivalent) features through the scheme API (embbench.bags): a bag embeds as the sum or mean of its IDs'
single embeddings under every kind of scheme (table-backed with a linear combine: rows pooled in the kernel; with a
non-linear one, and schemes without tables: each ID embedded, then pooled; DHE: embeddings or encodings pooled),
standalone and through the collection's kernels, empty bags as zeros; gradients reach only the rows of the bags'
IDs; the lists of a dataset's bag feature; GMF with a bag feature trains; a suite with bags runs, counts the bag
feature's module in its size, and a bag the dataset lacks is one error line."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from collection_checks import count_pool_calls, kernel_params
from torch import nn

from embbench import (
    BagIndex,
    Bags,
    BagSource,
    Dataset,
    FeatureEmbeddings,
    FeatureSpec,
    TableTraining,
    TaskData,
    build_embedding,
    create_scheme,
    embed_bags,
    full_table_bytes,
)
from embbench.bags import attach_bags, bag_route
from embbench.errors import ConfigError
from embbench.registry import create_dataset, create_task, get_model_class
from embbench.run.store import ResultStore
from embbench.run.suites import configuration_toml, parse_suite, suite_toml
from embbench.run.sweep import prepare, run_suite
from embbench.training import PlainStep, TrainConfig

DIM = 8
VOCABULARY = 300
#: a bag embedding and the pool of its IDs' single embeddings: fp32 sums in another order
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

#: (label, scheme, parameters, where the scheme pools a bag)
SCHEMES = [
    ("full", "full", {}, "rows"),
    ("hashing-trick", "hashing-trick", {}, "rows"),
    ("compositional-concat", "compositional", {"operation": "concat"}, "rows"),
    ("compositional-mult", "compositional", {"operation": "mult"}, "each"),
    ("hash-embedding", "hash-embedding", {}, "each"),
    ("multi-hashing", "multi-hashing", {"combiner": "concat"}, "rows"),
    ("mixed-dim", "mixed-dim", {}, "rows"),
    ("robe", "robe", {}, "rows"),
    ("tt-rec", "tt-rec", {}, "each"),
    ("dhe", "dhe", {"num_hashes": 16, "hidden_layers": 2}, "own"),
]
TABLE_SCHEMES = [entry for entry in SCHEMES if entry[3] != "own" and entry[1] != "tt-rec"]


def feature(name: str = "tag", vocabulary: int = VOCABULARY) -> FeatureSpec:
    return FeatureSpec.from_vocabulary(name, vocabulary, DIM)


def build(scheme: str, params: dict, spec: FeatureSpec | None = None, seed: int = 0) -> nn.Module:
    spec = spec or feature()
    budget = full_table_bytes(spec.num_ids, DIM)
    module, _ = build_embedding(create_scheme(scheme, **params), scheme, spec, budget, seed)
    return module


def some_bags(mode: str) -> Bags:
    """Six bags: three IDs (one of them twice), empty, one ID, five IDs (one unseen), empty, two IDs."""
    lengths = torch.tensor([3, 0, 1, 5, 0, 2])
    values = torch.tensor([4, 4, 17, 250, 0, 1, 2, VOCABULARY + 9, 299, 33, 17])
    return Bags.from_lengths(values, lengths, mode)


def pooled_one_by_one(module: nn.Module, bags: Bags) -> torch.Tensor:
    """The specification: each bag's IDs embedded on their own (one call per bag), summed or averaged."""
    rows = []
    for start, stop in zip(bags.offsets[:-1].tolist(), bags.offsets[1:].tolist(), strict=True):
        if stop == start:
            rows.append(torch.zeros(DIM))
            continue
        embedded = module(bags.values[start:stop])
        rows.append(embedded.sum(0) if bags.mode == "sum" else embedded.mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("label,scheme,params,route", SCHEMES, ids=[entry[0] for entry in SCHEMES])
def test_a_bag_embeds_as_the_pool_of_its_ids_single_embeddings(label, scheme, params, route, mode):
    module = build(scheme, params).eval()
    assert bag_route(module) == route
    bags = some_bags(mode)
    with torch.no_grad():
        got = embed_bags(module, bags)
        want = pooled_one_by_one(module, bags)
    assert got.shape == (6, DIM)
    torch.testing.assert_close(got, want, **TOLERANCE)
    assert not torch.equal(got[0], got[2])  # the bags differ: the check is not vacuous


@pytest.mark.parametrize("backend,optimizer", kernel_params((("torch", "adam"), ("torchrec", "sgd"))))
@pytest.mark.parametrize("label,scheme,params,route", TABLE_SCHEMES, ids=[entry[0] for entry in TABLE_SCHEMES])
def test_a_bag_embeds_the_same_through_the_collection_kernels(label, scheme, params, route, backend, optimizer):
    module = build(scheme, params).eval()
    embeddings = FeatureEmbeddings({"tag": copy.deepcopy(module)}, TableTraining(backend, optimizer)).eval()
    assert embeddings.tables is not None
    for mode in ("sum", "mean"):
        bags = some_bags(mode)
        with torch.no_grad():
            torch.testing.assert_close(embeddings.embed_bags("tag", bags), pooled_one_by_one(module, bags), **TOLERANCE)


def owned_bags() -> BagSource:
    """Items 10, 11, 12 (and 99, absent: an empty bag) with bags of tag IDs."""
    return BagSource.from_pairs("item", np.array([10, 10, 11, 12, 12, 12]), np.array([0, 3, 3, 1, 2, 5]))


def tables_of(scheme: str, params: dict, backend: str, optimizer: str) -> FeatureEmbeddings:
    users, items, tags = feature("user", 40), feature("item", 60), feature("tag", 6)
    modules = {
        "user": build(scheme, params, users, 1), "item": build(scheme, params, items, 2),
        "tag": build(scheme, params, tags, 3),
    }
    return FeatureEmbeddings(modules, TableTraining(backend, optimizer), {"tag": BagIndex(owned_bags(), "mean")})


@pytest.mark.parametrize("backend,optimizer", kernel_params((("torch", "adam"), ("torchrec", "sgd"))))
@pytest.mark.parametrize("scheme,params", [("full", {}), ("compositional", {"operation": "concat"})])
def test_a_linear_schemes_bags_are_pooled_in_the_one_kernel_call_of_the_batch(scheme, params, backend, optimizer):
    embeddings = tables_of(scheme, params, backend, optimizer)
    ids = {"user": torch.tensor([1, 2, 3, 4]), "item": torch.tensor([10, 99, 12, 11])}
    assert count_pool_calls(embeddings, ids) == [1] * len(embeddings.tables.stores)
    with torch.no_grad():
        vectors = embeddings(ids)
        single = embeddings.embed("tag", torch.tensor([0, 3, 1, 2, 5, 3]))
    assert set(vectors) == {"user", "item", "tag"}
    want = torch.stack([single[:2].mean(0), torch.zeros(DIM), single[2:5].mean(0), single[5]])
    torch.testing.assert_close(vectors["tag"], want, **TOLERANCE)


@pytest.mark.parametrize("label,scheme,params,route", SCHEMES, ids=[entry[0] for entry in SCHEMES])
def test_empty_bags_give_zero_vectors(label, scheme, params, route):
    module = build(scheme, params).eval()
    for mode in ("sum", "mean"):
        empty = Bags(torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), mode)
        with torch.no_grad():
            assert torch.equal(embed_bags(module, empty), torch.zeros(3, DIM))


def test_the_bag_index_gives_each_owner_its_list_and_an_unknown_owner_an_empty_bag():
    source = BagSource.from_pairs("item", np.array([12, 10, 12, 10, 10]), np.array([5, 3, 1, 0, 3]))  # (10, 3) twice
    assert source.keys.tolist() == [10, 12] and source.offsets.tolist() == [0, 2, 4]
    bags = BagIndex(source, "sum")(torch.tensor([12, 7, 10, 12]))
    assert bags.offsets.tolist() == [0, 2, 2, 4, 6]
    assert bags.values.tolist() == [1, 5, 0, 3, 1, 5]
    assert bags.mode == "sum"


def test_a_multi_hot_frame_gives_one_bag_id_per_flagged_column():
    flags = pd.DataFrame({"Action": [1.0, 0.0, 0.0], "Drama": [1.0, 1.0, 0.0]}, index=[7, 3, 5])
    source = BagSource.from_multi_hot("item", flags)
    assert source.keys.tolist() == [3, 7] and source.values.tolist() == [1, 0, 1]  # item 5 has no genre


def test_a_bag_feature_counts_how_often_training_reads_each_of_its_ids():
    items = FeatureSpec("item", np.array([10, 11, 13]), np.array([4, 1, 7]), DIM)  # 13 has no bag
    bag = owned_bags().feature("tag", items)
    assert bag.ids.tolist() == [0, 3] and bag.counts.tolist() == [4, 5]  # 12's tags are never read in training
    assert bag.dim == DIM


def test_dhe_pools_encodings_before_the_decoder_when_asked():
    spec = feature()
    default = build("dhe", {"num_hashes": 16, "hidden_layers": 2}, spec).eval()
    module = build("dhe", {"num_hashes": 16, "hidden_layers": 2, "bag_pooling": "encoding"}, spec).eval()
    assert default.bag_pooling == "embedding"
    bags = some_bags("mean")
    with torch.no_grad():
        got = embed_bags(module, bags)
        codes = module._encode(bags.values)
        want = torch.stack([
            module.decoder(codes[start:stop].mean(0, keepdim=True))[0] if stop > start else torch.zeros(DIM)
            for start, stop in zip(bags.offsets[:-1].tolist(), bags.offsets[1:].tolist(), strict=True)
        ])
        torch.testing.assert_close(got, want, **TOLERANCE)
        torch.testing.assert_close(got[2], module(torch.tensor([250]))[0], **TOLERANCE)  # a bag of one ID: the ID
        assert not torch.allclose(got[0], embed_bags(default, bags)[0], atol=1e-4)  # not the pooled embeddings


def rows_read(embeddings: FeatureEmbeddings, values: torch.Tensor) -> dict[str, set[int]]:
    """Per table key of the feature 'tag', the rows its lookups of ``values`` read."""
    module = embeddings["tag"]
    read: dict[str, set[int]] = {}
    for lookup in module.lookups(values):
        read.setdefault(lookup.table._key, set()).update(lookup.bags()[0].tolist())
    return read


@pytest.mark.parametrize("backend,optimizer", kernel_params((("torch", "sgd"), ("torchrec", "sgd"))))
@pytest.mark.parametrize("scheme,params", [("full", {}), ("hashing-trick", {}), ("hash-embedding", {})])
def test_gradients_reach_only_the_rows_of_the_bags_ids(scheme, params, backend, optimizer):
    embeddings = FeatureEmbeddings({"tag": build(scheme, params)}, TableTraining(backend, optimizer, 0.5))
    collection = embeddings.tables
    assert collection is not None
    before = {key: collection.weight(key).detach().clone() for key in collection.table_keys}
    bags = Bags.from_lengths(torch.tensor([5, 9, 9, 120]), torch.tensor([2, 0, 2]), "mean")
    target = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    loss = (embeddings.embed_bags("tag", bags) * target).sum()
    sparse = torch.optim.SGD(collection.table_parameters(), lr=0.5) if collection.table_parameters() else None
    loss.backward()
    if sparse is not None:
        assert all(p.grad is None or p.grad.is_sparse for p in collection.table_parameters())
        sparse.step()
    read = rows_read(embeddings, bags.values)
    for key in collection.table_keys:
        changed = (collection.weight(key).detach() != before[key]).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) == read.get(key, set()), key


class TaggedItems(Dataset):
    """Forty users, sixty items with one or two of six tags; a user interacts with items of the tag user % 6."""

    def load(self) -> pd.DataFrame:
        generator = np.random.default_rng(0)
        rows = []
        for user in range(40):
            liked = [item for item in range(60) if user % 6 in self.tags(item)]
            chosen = generator.choice(liked, size=min(8, len(liked)), replace=False)
            rows += [(user, int(item), step) for step, item in enumerate(chosen)]
        return pd.DataFrame(rows, columns=["user", "item", "timestamp"])

    @staticmethod
    def tags(item: int) -> tuple[int, ...]:
        return (item % 6,) if item % 2 else (item % 6, (item // 6) % 6)

    def fingerprint(self) -> str:
        return "tagged-items/v1"

    def bag_features(self) -> dict[str, BagSource]:
        pairs = [(item, tag) for item in range(60) for tag in self.tags(item)]
        owners, tags = zip(*pairs, strict=True)
        return {"tags": BagSource.from_pairs("item", np.array(owners), np.array(tags))}


def test_gmf_with_a_bag_feature_trains_and_adds_the_pooled_bag_to_the_item_vector():
    task = create_task("ranking")
    data = attach_bags(task, TaggedItems(), task.prepare(TaggedItems(), DIM), ["tags"])
    assert list(data.features) == ["user", "item", "tags"] and data.features["tags"].num_ids == 6
    modules = {name: build("full", {}, spec, seed) for seed, (name, spec) in enumerate(data.features.items())}
    embeddings = FeatureEmbeddings(
        modules, TableTraining("torch", "adam", 0.05), {"tags": BagIndex(data.bags["tags"], "mean")}
    )
    torch.manual_seed(0)
    model = get_model_class("gmf")(embeddings, DIM)
    config = TrainConfig(epochs=1, batch_size=64, learning_rate=0.05)
    step = PlainStep(model, config, torch.device("cpu"))
    losses = []
    for epoch in range(8):
        (users, items), labels = task.epoch_rows(data, config, torch.Generator().manual_seed(epoch))
        losses.append(np.mean([
            step((users[start:start + 64], items[start:start + 64]), labels[start:start + 64])
            for start in range(0, len(labels), 64)
        ]))
    assert losses[-1] < 0.7 * losses[0], losses
    items = torch.tensor([1, 2, 59])
    with torch.no_grad():
        own, bags = embeddings.embed("item", items), embeddings.embed_bags("tags", embeddings.bags["tags"](items))
        torch.testing.assert_close(model.item_vectors(items), own + bags)
        assert not torch.allclose(bags, torch.zeros_like(bags))


#: scheme entries of the suites below: the full table, and a small DHE (a test trains it for an epoch)
FULL = '[[schemes]]\nname = "full"\nbudgets = ["1"]'
SMALL_DHE = '[[schemes]]\nname = "dhe"\nbudgets = ["1/2"]\nparams = { num_hashes = 32, hidden_layers = 2 }'


def bag_suite(tmp_path: Path, bags: Sequence[str], task: str = "ranking", schemes: Sequence[str] = (FULL,)) -> Path:
    path = tmp_path / "bags.toml"
    names = ", ".join(f'"{name}"' for name in bags)
    lines = [f'task = "{task}"', "epochs = 1", "dim = 8", "num_negatives = 1", "batch_size = 4096",
             "latency_batch_sizes = []", f"bags = [{names}]"]
    entries = ['[[datasets]]\nname = "movielens-100k"', '[[models]]\nname = "gmf"', *schemes]
    path.write_text("\n".join(lines) + "\n" + "\n".join(entries) + "\n")
    return path


def test_bags_are_part_of_a_cells_identity_only_when_set(tmp_path):
    without = parse_suite(bag_suite(tmp_path, [])).cells()[0]
    assert "bags" not in without.identity() and "bag_mode" not in without.identity()
    with_bags = parse_suite(bag_suite(tmp_path, ["genres"])).cells()[0]
    assert with_bags.identity()["bags"] == ["genres"] and with_bags.key != without.key


def test_a_bag_the_dataset_lacks_is_one_error_line_naming_the_bags_it_offers(tmp_path, shared_data):
    with pytest.raises(ConfigError) as raised:
        prepare(bag_suite(tmp_path, ["tagz"]), data_dir=shared_data)
    message = str(raised.value)
    assert "\n" not in message and "no bag feature 'tagz'" in message and "it offers: genres" in message


def test_a_task_that_takes_no_bags_refuses_them_in_one_line():
    users, items = feature("user", 40), feature("item", 60)
    data = TaskData({"user": users, "item": items}, payload=None)
    with pytest.raises(ConfigError, match="takes bags of no feature"):
        attach_bags(create_task("ctr"), TaggedItems(), data, ["tags"])


def test_rating_classification_keys_a_bag_feature_by_its_compacted_ids(tmp_path, shared_data):
    prepared = prepare(bag_suite(tmp_path, ["genres"], task="rating-classification"), data_dir=shared_data)
    data = prepared.data["movielens-100k"]
    raw_items = data.payload["raw_ids"]["item"]
    source = data.bags["genres"]
    assert source.keys.tolist() == list(range(len(raw_items)))
    genres = create_dataset("movielens-100k", data_dir=shared_data).bag_features()["genres"]
    for compact in (0, 7, len(raw_items) - 1):
        at = int(np.searchsorted(genres.keys, raw_items[compact]))
        want = genres.values[genres.offsets[at]:genres.offsets[at + 1]]
        assert source.values[source.offsets[compact]:source.offsets[compact + 1]].tolist() == want.tolist()
    assert set(prepared.runs[0].plans) == {"user", "item", "genres"}


def test_a_scheme_entry_with_its_own_bags_runs_beside_the_same_scheme_without(tmp_path, shared_data):
    with_genres = FULL.replace('name = "full"', 'name = "full"\nlabel = "full+genres"\nbags = ["genres"]')
    path = bag_suite(tmp_path, [], schemes=(FULL, with_genres))
    suite = parse_suite(path)
    assert [entry.bags for entry in suite.schemes] == [None, ("genres",)]
    prepared = prepare(suite, data_dir=shared_data)
    plans = {run.trained.scheme.label: set(run.plans) for run in prepared.runs}
    assert plans == {"full": {"user", "item"}, "full+genres": {"user", "item", "genres"}}
    keys = [cell.key for cell in suite.cells()]
    assert len(set(keys)) == 2
    written = tmp_path / "again.toml"
    written.write_text(suite_toml(suite))
    assert [cell.key for cell in parse_suite(written).cells()] == keys
    configs = [json.loads(json.dumps(cell.config())) for cell in suite.cells()]
    rebuilt = tmp_path / "bags.toml"  # the suite's own name: the cells' identity holds it
    rebuilt.write_text(configuration_toml("bags", configs))
    assert sorted(cell.key for cell in parse_suite(rebuilt).cells()) == sorted(keys)


def test_a_suite_with_a_bag_feature_runs_and_counts_its_module_in_the_size(tmp_path, shared_data):
    summary = run_suite(bag_suite(tmp_path, ["genres"], schemes=(FULL, SMALL_DHE)), db=tmp_path / "r.sqlite",
                        data_dir=shared_data, progress=False)
    assert summary.ok == 2, summary.failures
    frame = ResultStore(tmp_path / "r.sqlite").frame()
    plans = {row["scheme"]: json.loads(row["plan_json"]) for _, row in frame.iterrows()}
    for _, row in frame.iterrows():
        assert set(plans[row["scheme"]]) == {"user", "item", "genres"}
        assert row["size_bytes"] == sum(plan["size_bytes"] for plan in plans[row["scheme"]].values())
        assert 0.5 < row["test_auc"] <= 1.0
    # ML-100K's 19 genre flags, all read in training: the full table holds a row for each, one OOV row, the IDs
    assert plans["full"]["genres"]["size_bytes"] == (19 + 1) * 8 * 4 + 19 * 8
