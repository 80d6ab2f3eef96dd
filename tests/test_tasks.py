"""Tasks as plugins: rating classification's protocol, classification metrics against brute force, budgets
shared over features, the DLRM model, model/task mismatches, memory refusal and the table-backend axis."""

from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from embbench_plugins.tasks.classification import binarize_ratings, hold_out_last_two

from embbench import registry
from embbench.collection import TableTraining, torchrec_available
from embbench.errors import BudgetTooSmall, ConfigError
from embbench.metrics import binary_auc, log_loss
from embbench.run.resolve import memory_refusal, plan_features
from embbench.run.sweep import prepare, run_suite
from embbench.schemes import Budget, FeatureSpec, build_embedding, full_table_bytes

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def brute_force_auc(scores: list[float], labels: list[int]) -> float:
    pairs = [(p, n) for p, n in itertools.product(range(len(scores)), repeat=2) if labels[p] == 1 and labels[n] == 0]
    wins = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs)
    return wins / len(pairs)


def test_binary_auc_matches_brute_force_with_ties():
    generator = np.random.default_rng(0)
    for _ in range(20):
        scores = generator.integers(0, 5, size=30).astype(float).tolist()  # many ties
        labels = generator.integers(0, 2, size=30).tolist()
        if 0 < sum(labels) < 30:
            assert binary_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
                brute_force_auc(scores, labels), abs=1e-12
            )
    assert math.isnan(binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert binary_auc(torch.tensor([float("nan"), 0.0]), torch.tensor([1, 0])) == 0.0  # NaN counts against


def test_log_loss_matches_its_formula():
    logits, labels = torch.tensor([2.0, -1.0, 0.0, 3.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = torch.sigmoid(logits.double())
    expected = float(-(labels * p.log() + (1 - labels) * (1 - p).log()).mean())
    assert log_loss(logits, labels) == pytest.approx(expected, rel=1e-12)


def test_ratings_are_binarised_compacted_and_the_last_two_per_user_held_out():
    frame = pd.DataFrame({
        "user": [50, 50, 50, 50, 50, 7, 7, 9],
        "item": [300, 100, 200, 400, 500, 100, 200, 100],
        "rating": [5, 3, 1, 4, 2, 4, 5, 1],
        "timestamp": [10, 20, 30, 40, 50, 5, 6, 1],
    })
    binary = binarize_ratings(frame)
    # ratings 5, 1, 4, 2, 4, 5, 1: the 3-star row is gone
    assert binary["label"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert sorted(binary["user"].unique()) == [0, 1, 2] and binary["item"].max() == 4  # compacted
    splits = hold_out_last_two(binary)
    # user 50 (index 2) keeps rows at t=10, 30, 40, 50: validation t=40 (rating 4), test t=50 (rating 2)
    assert splits["test"]["label"].tolist() == [0.0] and splits["validation"]["label"].tolist() == [1.0]
    assert splits["test"]["timestamp"].tolist() == [50] and splits["validation"]["timestamp"].tolist() == [40]
    assert len(splits["train"]) == 5  # users with fewer than three rows keep them all in training


def test_a_fraction_applies_per_feature_and_bytes_are_shared_in_proportion():
    features = {
        "small": FeatureSpec.from_vocabulary("small", 100, 8),
        "large": FeatureSpec.from_vocabulary("large", 10_000, 8),
    }
    quarter = Budget.parse("1/4").allocate(features)
    assert quarter == {name: full_table_bytes(f.num_ids, 8) // 4 for name, f in features.items()}
    shares = Budget.parse("100000b").allocate(features)
    assert sum(shares.values()) <= 100_000 and sum(shares.values()) > 100_000 - 2
    ratio = {name: shares[name] / full_table_bytes(f.num_ids, 8) for name, f in features.items()}
    assert ratio["small"] == pytest.approx(ratio["large"], rel=1e-3)
    assert Budget.parse("1GB").allocate(features) == {n: full_table_bytes(f.num_ids, 8) for n, f in features.items()}


def test_full_table_has_a_row_for_every_declared_id():
    feature = FeatureSpec("f", np.array([3, 9], dtype=np.int64), np.array([1, 1]), 4, vocabulary_size=1000)
    scheme = registry.create_scheme("full")
    module, plan = build_embedding(scheme, "full", feature, 10**9, seed=0)
    assert plan.params["rows"] == 1001 and plan.size_bytes == 1001 * 4 * 4 + 2 * 8
    assert module(torch.tensor([3, 9, 10])).shape == (3, 4)
    with pytest.raises(ValueError, match="smaller than"):
        FeatureSpec("f", np.arange(5), np.ones(5), 4, vocabulary_size=3)


def test_dlrm_scores_rows_and_rejects_bad_widths():
    model_class = registry.get_model_class("dlrm")
    embeddings = {name: torch.nn.Embedding(10, 4) for name in ("a", "b", "c")}
    model = model_class(embeddings, num_dense=2, dim=4)
    logits = model(torch.randn(5, 2), torch.randint(0, 10, (5, 3)))
    assert logits.shape == (5,)
    no_dense = model_class(embeddings, num_dense=0, dim=4, interaction="cat")
    assert no_dense(torch.zeros(5, 0), torch.randint(0, 10, (5, 3))).shape == (5,)
    assert model.dense_size_bytes() == sum(p.numel() * 4 for n, p in model.named_parameters() if "embeddings" not in n)
    with pytest.raises(ValueError, match="bottom"):
        model_class(embeddings, num_dense=2, dim=4, bottom=[0])


def suite_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(body)
    return path


SYNTHETIC = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 60, num_items = 40, interactions_per_user = 6 }\n'


def test_a_model_of_another_task_is_one_clear_error(tmp_path):
    body = 'task = "ctr"\n' + SYNTHETIC + '[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n'
    with pytest.raises(ConfigError, match="model 'gmf' is not a CTRModel"):
        prepare(str(suite_file(tmp_path, body)))


def test_a_dataset_without_ratings_is_one_clear_error(tmp_path):
    body = 'task = "rating-classification"\n' + SYNTHETIC + '[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n'
    with pytest.raises(ConfigError, match="no explicit ratings"):
        prepare(str(suite_file(tmp_path, body)))


def test_early_stopping_must_be_a_metric_of_the_task(tmp_path):
    body = 'early_stopping = "logloss"\n' + SYNTHETIC + '[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n'
    with pytest.raises(ConfigError, match="not a metric of task 'ranking'"):
        prepare(str(suite_file(tmp_path, body)))


def test_tables_beyond_the_memory_available_are_refused_before_building(tmp_path):
    feature = FeatureSpec.from_vocabulary("f", 100_000, 8)
    plan = registry.create_scheme("full").plan(feature, 10**9)
    dense_adam = TableTraining("torch", "dense-adam")
    assert memory_refusal({"f": plan}, dense_adam, available=10**9) is None
    reason = memory_refusal({"f": plan}, dense_adam, available=3 * plan.size_bytes)
    assert reason.startswith("refused before building: the embeddings store 4.0 MB, about 16.0 MB while training")
    assert "(4x with dense-adam on the dense kernel)" in reason
    assert "of the 12.0 MB this machine has available" in reason
    # row-wise Adagrad keeps one float per row: the same tables fit where dense Adam's would not
    assert memory_refusal({"f": plan}, TableTraining("torch", "rowwise-adagrad"), 3 * plan.size_bytes) is None


@pytest.mark.skipif(not (SHARED_DATA / "movielens-100k").is_dir(), reason="needs ../shared/data/movielens-100k")
def test_rating_classification_trains_and_reports_auc_and_log_loss(tmp_path):
    body = (
        'task = "rating-classification"\nepochs = 2\nbudgets = ["1/4"]\nlatency_batch_sizes = [64]\n'
        '[[datasets]]\nname = "movielens-100k"\n[[models]]\nname = "gmf"\n'
        '[[schemes]]\nname = "full"\nbudgets = ["1"]\n[[schemes]]\nname = "hashing-trick"\n'
    )
    summary = run_suite(str(suite_file(tmp_path, body)), db=tmp_path / "r.sqlite", data_dir=SHARED_DATA,
                        progress=False)
    assert summary.ok == 2
    rows = sqlite3.connect(tmp_path / "r.sqlite").execute(
        "select scheme, task, test_auc, test_logloss, test_hr10 from cells order by scheme"
    ).fetchall()
    full, hashed = rows
    assert full[1] == "rating-classification" and full[4] is None
    assert 0.7 < full[2] < 1 and 0 < full[3] < math.log(2)  # better than chance and than a constant 0.5
    assert hashed[2] < full[2]  # a quarter of the rows, shared by hashing, costs accuracy here


@pytest.mark.skipif(not torchrec_available(), reason="the torchrec backend needs torchrec")
def test_the_table_backend_is_a_suite_axis_and_both_backends_train_alike(tmp_path):
    body = (
        'epochs = 1\nbackends = ["torch", "torchrec"]\nembedding_optimizers = ["sgd"]\nlatency_batch_sizes = []\n'
        + SYNTHETIC
        + '[[models]]\nname = "gmf"\n[[schemes]]\nname = "hashing-trick"\nbudgets = ["1/2"]\n'
    )
    summary = run_suite(str(suite_file(tmp_path, body)), db=tmp_path / "b.sqlite", progress=False)
    assert summary.ok == 2
    rows = sqlite3.connect(tmp_path / "b.sqlite").execute(
        "select table_backend, test_auc, config_json from cells order by table_backend"
    ).fetchall()
    assert [row[0] for row in rows] == ["torch", "torchrec"]
    assert rows[0][1] == pytest.approx(rows[1][1], abs=1e-4)  # identical initial weights and SGD updates
    assert '"backend": "torch"' in rows[0][2]


def test_ctr_trains_dlrm_per_field_and_refuses_a_full_table_too_large_for_memory(tmp_path):
    body = (
        'task = "ctr"\nepochs = 3\nlearning_rate = 0.01\ndim = 8\nbudgets = ["20KB"]\nlatency_batch_sizes = [64]\n'
        'precisions = ["fp32", "int8"]\n'
        '[[datasets]]\nname = "synthetic-ctr"\nlabel = "small"\n'
        'params = { num_fields = 3, vocabulary_size = 300, num_dense = 2, train_rows = 6000,'
        ' validation_rows = 1000, test_rows = 1000 }\n'
        '[[datasets]]\nname = "synthetic-ctr"\nlabel = "huge"\n'
        'params = { num_fields = 3, vocabulary_size = 1_000_000_000_000, num_dense = 2, train_rows = 2000,'
        ' validation_rows = 500, test_rows = 500 }\n'
        '[[models]]\nname = "dlrm"\n'
        '[[schemes]]\nname = "full"\nbudgets = ["1"]\n[[schemes]]\nname = "hashing-trick"\n'
    )
    summary = run_suite(str(suite_file(tmp_path, body)), db=tmp_path / "c.sqlite", progress=False)
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute(
        "select dataset, scheme, precision, status, test_auc, test_logloss, size_bytes, budget_bytes, error,"
        " embedding_latency_ms from cells order by dataset, scheme, precision"
    ).fetchall()
    by = {(r[0], r[1], r[2]): r for r in rows}
    assert summary.failed == 0 and len(rows) == 8
    full = by[("small", "full", "fp32")]
    hashed = by[("small", "hashing-trick", "fp32")]
    assert full[3] == hashed[3] == "ok" and full[4] > 0.6 and 0 < full[5] < math.log(2)
    assert hashed[6] <= 20_000 < full[6]  # the budget covers the three fields together
    assert by[("small", "hashing-trick", "int8")][3] == "ok"  # quantised tables of a CTR model
    assert hashed[9] > 0  # embedding latency, summed over the fields
    refused = by[("huge", "full", "fp32")]
    assert refused[3] == "skipped" and refused[8].startswith("refused before building")
    assert by[("huge", "full", "int8")][3] == "skipped"
    assert by[("huge", "hashing-trick", "fp32")][3] == "ok"  # 10^12 IDs per field, compressed: it runs


def test_a_field_below_the_schemes_smallest_module_gets_that_minimum_and_the_others_share_the_rest():
    features = {
        "tiny": FeatureSpec.from_vocabulary("tiny", 3, 16),
        "large": FeatureSpec.from_vocabulary("large", 50_000, 16),
    }
    scheme = registry.create_scheme("hashing-trick")
    budget = Budget.parse("1/4")
    total = sum(budget.allocate(features).values())
    plans = plan_features(scheme, features, budget)
    tiny_minimum = plans["tiny"].budget_bytes  # the minimum the scheme stated
    with pytest.raises(BudgetTooSmall):
        scheme.plan(features["tiny"], budget.allocate(features)["tiny"])  # its own share is too small
    assert sum(plan.size_bytes for plan in plans.values()) <= total
    assert plans["tiny"].size_bytes == tiny_minimum  # exactly the smallest module
    assert plans["large"].budget_bytes == total - tiny_minimum
    with pytest.raises(BudgetTooSmall, match="smallest modules"):
        plan_features(scheme, features, Budget.parse("100b"))
