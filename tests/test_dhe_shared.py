"""One scheme instance shared by several features (``Scheme.shares_features``), as ``dhe`` does it with
``share = "all"``: one DHE network for user and item, told the feature by salted hashes (each feature its own hash
functions) or a one-hot indicator input, planned once within the sum of the features' budgets and stored (and
counted) once."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from embbench import (
    Budget,
    BudgetTooSmall,
    FeatureEmbeddings,
    FeatureSpec,
    Scheme,
    SchemePlan,
    build_features,
    distinct_plans,
    modules_size_bytes,
    state_size_bytes,
)
from embbench.registry import create_scheme
from embbench.run.resolve import allocate, plan_features
from embbench.run.store import ResultStore
from embbench.run.suites import parse_suite_text
from embbench.run.sweep import run_suite

DIM = 8
FEATURES = {
    "user": FeatureSpec.from_vocabulary("user", 3000, DIM),
    "item": FeatureSpec.from_vocabulary("item", 1200, DIM),
}
SEEDS = {"user": 1, "item": 2}
SMALL = {"num_hashes": 32, "hidden_layers": 2}


def shared_dhe(**params) -> Scheme:
    return create_scheme("dhe", share="all", **{**SMALL, **params})


def plans_and_modules(scheme: Scheme, budget: str = "1/4"):
    plans = plan_features(scheme, FEATURES, Budget.parse(budget))
    return plans, build_features(scheme, scheme.name, FEATURES, plans, SEEDS)


def test_one_plan_serves_every_feature_within_the_sum_of_their_budgets():
    plans = plan_features(shared_dhe(), FEATURES, Budget.parse("1/4"))
    plan = plans["user"]
    assert plans["item"] is plan and plan.shared_by == ("user", "item")
    assert plan.budget_bytes == sum(allocate(Budget.parse("1/4"), FEATURES).values())
    assert 0.9 * plan.budget_bytes <= plan.size_bytes <= plan.budget_bytes
    # A single bigger network instead of two small ones.
    alone = plan_features(create_scheme("dhe", **SMALL), FEATURES, Budget.parse("1/4"))
    assert plan.params["width"] > max(p.params["width"] for p in alone.values())


@pytest.mark.parametrize("indicator", ["salted", "one-hot"])
def test_two_features_hold_one_copy_of_the_weights_and_count_it_once(indicator):
    plans, modules = plans_and_modules(shared_dhe(share_indicator=indicator))
    user, item = modules["user"], modules["item"]
    assert user.decoder is item.decoder
    assert {id(p) for p in user.parameters()} == {id(p) for p in item.parameters()}
    embeddings = FeatureEmbeddings(modules)
    assert len(list(embeddings.parameters())) == len(list(user.parameters()))
    size = plans["user"].size_bytes
    assert state_size_bytes(embeddings) == modules_size_bytes(modules.values()) == size
    assert [p.size_bytes for p in distinct_plans(plans)] == [size]


def test_salted_features_hash_with_their_own_seeds_into_one_network():
    plans, modules = plans_and_modules(shared_dhe())
    user, item = modules["user"], modules["item"]
    assert user.encoder is not item.encoder and user.feature_code is None
    ids = torch.arange(0, 1200, 3)
    assert (user.encoder(ids) != item.encoder(ids)).any(dim=1).all()  # every ID: another code per feature
    width = plans["user"].params["width"]
    assert user.decoder.hidden[0].in_features == SMALL["num_hashes"]
    # the network once, and a hash seed per feature
    assert plans["user"].size_bytes == shared_dhe().size_bytes(width, DIM) + 8 == state_size_bytes(user) + 8


def test_one_hot_features_share_one_encoder_and_add_an_input_each():
    plans, modules = plans_and_modules(shared_dhe(share_indicator="one-hot"))
    user, item = modules["user"], modules["item"]
    assert user.encoder is item.encoder
    torch.testing.assert_close(user.feature_code, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(item.feature_code, torch.tensor([0.0, 1.0]))
    width = plans["user"].params["width"]
    assert user.decoder.hidden[0].in_features == SMALL["num_hashes"] + len(FEATURES)
    assert plans["user"].size_bytes == shared_dhe().size_bytes(width, DIM, SMALL["num_hashes"] + 2)


@pytest.mark.parametrize("training", [True, False])
def test_salted_hashes_make_the_same_raw_id_embed_differently_per_feature(training):
    _, modules = plans_and_modules(shared_dhe())
    ids = torch.arange(0, 1200, 3)
    with torch.no_grad():
        user, item = (modules[name].train(training)(ids) for name in ("user", "item"))
    assert (user - item).abs().sum(dim=1).min() > 1e-3


def test_batch_norm_cancels_a_one_hot_indicator_on_a_features_own_training_batch():
    """Why salted is the default: the one-hot adds one vector to every row of a feature's batch, which the first
    BatchNorm's batch mean removes; without BatchNorm it does tell the features apart."""
    ids = torch.arange(0, 1200, 3)
    _, modules = plans_and_modules(shared_dhe(share_indicator="one-hot"))
    with torch.no_grad():
        user, item = (modules[name].train()(ids) for name in ("user", "item"))
    torch.testing.assert_close(user, item)
    _, modules = plans_and_modules(shared_dhe(share_indicator="one-hot", batch_norm=False))
    with torch.no_grad():
        user, item = (modules[name].train()(ids) for name in ("user", "item"))
    assert (user - item).abs().sum(dim=1).min() > 1e-3


def test_training_through_one_feature_changes_the_others_embeddings():
    _, modules = plans_and_modules(shared_dhe())
    ids = torch.arange(64)
    with torch.no_grad():
        modules["item"].eval()
        before = modules["item"](ids)
    modules["user"].train()
    optimizer = torch.optim.SGD(modules["user"].parameters(), lr=0.5)
    modules["user"](ids).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        modules["item"].eval()
        assert not torch.allclose(modules["item"](ids), before)


def test_each_feature_caches_its_own_known_ids():
    _, modules = plans_and_modules(shared_dhe(cache_known_ids=True))
    ids = torch.tensor([5, 17, 1199])
    with torch.no_grad():
        for module in modules.values():
            module.eval()
            torch.testing.assert_close(module(ids), module._compute(ids))
    assert modules["user"].cached_ids.numel() == 3000 and modules["item"].cached_ids.numel() == 1200


def test_a_scheme_that_does_not_share_plans_and_builds_each_feature_alone():
    scheme = create_scheme("dhe", **SMALL)
    plans, modules = plans_and_modules(scheme)
    assert plans["user"].shared_by == plans["item"].shared_by == ()
    assert modules["user"].decoder is not modules["item"].decoder
    assert modules_size_bytes(modules.values()) == sum(p.size_bytes for p in distinct_plans(plans))
    assert not create_scheme("hashing-trick").shares_features


def test_sharing_with_a_single_feature_is_the_features_own_module():
    plans = plan_features(shared_dhe(), {"item": FEATURES["item"]}, Budget.parse("1/4"))
    assert plans["item"].shared_by == ()


def test_a_budget_below_the_shared_networks_minimum_names_the_scheme():
    with pytest.raises(BudgetTooSmall, match="scheme 'dhe'"):
        plan_features(shared_dhe(num_hashes=1024), FEATURES, Budget.parse("1000b"))


class _WrongSize(Scheme):
    """Shares features but states a size its modules do not store."""

    @property
    def shares_features(self) -> bool:
        return True

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        raise AssertionError("planned together, never alone")

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        raise AssertionError("built together, never alone")

    def plan_shared(self, features: Sequence[FeatureSpec], budget_bytes: int) -> SchemePlan:
        return SchemePlan(self.name, {}, 4 * DIM, budget_bytes, shared_by=tuple(f.name for f in features))

    def build_shared(self, features: Sequence[FeatureSpec], plan: SchemePlan, seed: int) -> dict[str, nn.Module]:
        # two tables where the plan states one: each feature its own copy
        return {feature.name: nn.Embedding(1, DIM) for feature in features}


def test_the_shared_modules_state_is_held_equal_to_the_plan():
    scheme = _WrongSize()
    plans = plan_features(scheme, FEATURES, Budget.parse("1/4"))
    with pytest.raises(RuntimeError, match="user, item but the modules store 64 bytes together"):
        build_features(scheme, "wrong-size", FEATURES, plans, SEEDS)


@pytest.mark.parametrize("params, message", [
    ({"share": "some"}, "share must be one of none, all"),
    ({"share": "all", "side_features": True}, "share 'all' takes no side_features"),
    ({"share": "all", "share_indicator": "learned"}, "share_indicator must be one of salted, one-hot"),
    ({"share_indicator": "one-hot"}, "needs share = 'all'"),
    ({"share": "all", "encoding": "identity"}, "the identity encoding has none"),
])
def test_invalid_sharing_is_a_value_error_naming_the_parameter(params, message):
    from embbench_plugins.schemes.dhe import DeepHashEmbedding

    with pytest.raises(ValueError, match=message):
        DeepHashEmbedding(**params)


def test_features_of_different_dims_cannot_share_one_network():
    features = [FeatureSpec.from_vocabulary("user", 10, 8), FeatureSpec.from_vocabulary("item", 10, 16)]
    with pytest.raises(ValueError, match="one embedding dim"):
        shared_dhe().plan_shared(features, 10**6)


SUITE = """
epochs = 4
early_stopping = "none"
budgets = ["1/4"]
dim = 8
batch_size = 256
learning_rate = 0.01
latency_batch_sizes = []
[[datasets]]
name = "synthetic"
params = { num_users = 200, num_items = 120, interactions_per_user = 12 }
[[models]]
name = "gmf"
[[schemes]]
name = "dhe"
params = { num_hashes = 32, hidden_layers = 2 }
[[schemes]]
name = "dhe"
label = "dhe-shared"
params = { num_hashes = 32, hidden_layers = 2, share = "all" }
"""


def test_sharing_is_part_of_a_cells_identity(tmp_path):
    cells = parse_suite_text(SUITE, tmp_path / "s.toml").cells()
    keys = {cell.scheme.label: cell.key for cell in cells}
    assert keys["dhe"] != keys["dhe-shared"]
    assert next(c for c in cells if c.scheme.label == "dhe-shared").identity()["scheme"]["params"]["share"] == "all"


def test_a_gmf_model_trains_end_to_end_through_one_shared_network(tmp_path):
    path = tmp_path / "shared.toml"
    path.write_text(SUITE)
    summary = run_suite(str(path), db=tmp_path / "r.sqlite", progress=False)
    assert summary.ok == 2
    rows = ResultStore(tmp_path / "r.sqlite").frame().set_index("scheme_label")
    shared = rows.loc["dhe-shared"]
    losses = [epoch["loss"] for epoch in json.loads(shared["history_json"])]
    assert len(losses) == 4 and losses[-1] < losses[0]
    plan_json = json.loads(shared["plan_json"])
    assert plan_json["user"]["shared_by"] == plan_json["item"]["shared_by"] == ["user", "item"]
    # the size counts the one network once, and the two separate networks of plain dhe each
    assert shared["size_bytes"] == plan_json["user"]["size_bytes"] == plan_json["item"]["size_bytes"]
    assert shared["budget_bytes"] == rows.loc["dhe", "budget_bytes"]
    separate = json.loads(rows.loc["dhe", "plan_json"])
    assert rows.loc["dhe", "size_bytes"] == separate["user"]["size_bytes"] + separate["item"]["size_bytes"]
    assert np.isfinite(shared["test_auc"])
