"""The global-temporal split: one cut-off time for every user, its held-out rows, its cache key, the suite
settings that choose it, and the ranking task on it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import assert_one_line_error, invoke
from embbench_plugins.tasks.ranking import RankingIndex
from test_data import FrameDataset, interactions, triples

from embbench.data import GLOBAL_TEMPORAL, LEAVE_LAST_OUT, SplitProtocol, prepare_split
from embbench.errors import ConfigError
from embbench.run.store import ResultStore
from embbench.run.suites import parse_suite

# 20 distinct interactions at times 1..20 (and one repeat): with 0.2 + 0.2 held out, train is t <= 12,
# validation 13..16, test 17..20. User 1 is in both periods (twice in the validation one); users 2 and 4 have a
# validation row only; user 3 appears only in the test period, first with item 99 that nobody trained on.
TWENTY = interactions(
    [(1, 10 + t, t) for t in range(1, 6)] + [(2, 30 + t, 5 + t) for t in range(1, 6)] + [(4, 60, 11), (4, 61, 12)]
    + [(1, 50, 13), (1, 52, 14), (4, 51, 15), (2, 36, 16)]
    + [(3, 99, 17), (1, 53, 18), (3, 62, 19), (3, 63, 20), (1, 11, 20)]  # the last repeats (1, 11, 1)
)
TEMPORAL = SplitProtocol(GLOBAL_TEMPORAL, 0.2, 0.2)


def test_the_cut_offs_fall_at_the_fractions_of_the_interactions_by_time():
    frame = interactions([(t % 4, 100 + t, t) for t in range(1, 21)])
    split = prepare_split(FrameDataset(frame), protocol=SplitProtocol(GLOBAL_TEMPORAL))  # 0.1 and 0.1
    assert split.train["timestamp"].max() == 16
    assert sorted(split.validation["timestamp"]) == [17, 18]
    assert sorted(split.test["timestamp"]) == [19, 20]


def test_no_held_out_interaction_is_earlier_than_any_training_one():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"user": rng.integers(0, 50, 3000), "item": rng.integers(0, 400, 3000),
                          "timestamp": rng.integers(0, 500, 3000)})
    split = prepare_split(FrameDataset(frame), protocol=SplitProtocol(GLOBAL_TEMPORAL, 0.15, 0.2))
    assert split.train["timestamp"].max() < split.validation["timestamp"].min()
    assert split.validation["timestamp"].max() < split.test["timestamp"].min()


def test_the_periods_hold_about_their_fractions_of_the_interactions():
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"user": rng.integers(0, 40, 5000), "item": rng.integers(0, 10**6, 5000),
                          "timestamp": rng.permutation(5000)})
    split = prepare_split(FrameDataset(frame), protocol=SplitProtocol(GLOBAL_TEMPORAL, 0.2, 0.1))
    assert len(split.train) == 3500  # distinct times, no duplicate pairs: exactly 70 %
    assert set(split.validation["user"]) <= set(range(40)) and len(split.validation) <= 40


def test_each_user_holds_out_the_first_interaction_of_each_period():
    split = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    assert triples(split.validation) == [(1, 50, 13), (2, 36, 16), (4, 51, 15)]
    assert triples(split.test) == [(1, 53, 18), (3, 99, 17)]  # user 1's repeat of item 11 is no new interaction


def test_the_training_frame_is_everything_before_the_first_cut_off():
    split = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    before = TWENTY[TWENTY["timestamp"] <= 12].sort_values(["user", "timestamp"], kind="stable")
    assert triples(split.train) == triples(before)


def test_users_and_items_first_seen_after_the_cut_off_are_kept_as_unseen_ids():
    split = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    assert 3 in split.users and 3 not in set(split.train["user"])
    assert 99 in split.items and 99 not in set(split.train["item"])


def test_negatives_are_drawn_from_the_training_items_only_under_global_temporal():
    temporal = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    np.testing.assert_array_equal(temporal.sampling_items, np.unique(temporal.train["item"]))
    leave_last_out = prepare_split(FrameDataset(TWENTY))
    np.testing.assert_array_equal(leave_last_out.sampling_items, leave_last_out.items)


def test_ties_at_a_cut_off_fall_after_it():
    times = [1, 2, 3, 4, 5, 7, 7, 7, 7, 8]  # the 60 % cut-off lands on the second 7
    frame = interactions([(row % 3, row, time) for row, time in enumerate(times)])
    split = prepare_split(FrameDataset(frame), protocol=SplitProtocol(GLOBAL_TEMPORAL, 0.3, 0.1))
    assert split.train["timestamp"].max() == 5 and len(split.train) == 5
    assert split.validation["timestamp"].min() == 7 and split.test["timestamp"].tolist() == [8]


def test_min_interactions_drops_the_same_users_as_leave_last_out():
    temporal = prepare_split(FrameDataset(TWENTY), min_interactions=4, protocol=TEMPORAL)
    leave_last_out = prepare_split(FrameDataset(TWENTY), min_interactions=4)
    assert set(temporal.users) == set(leave_last_out.users) == {1, 2}


def test_the_split_is_deterministic_and_cached_under_its_own_key():
    dataset = FrameDataset(TWENTY)
    first = prepare_split(dataset, protocol=TEMPORAL)
    again = prepare_split(dataset, protocol=TEMPORAL)
    assert dataset.loads == 1 and again.protocol == TEMPORAL
    for name in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(getattr(again, name), getattr(first, name))
    uncached = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL, use_cache=False)
    pd.testing.assert_frame_equal(uncached.test, first.test)
    keys = {first.fingerprint, prepare_split(dataset).fingerprint,
            prepare_split(dataset, protocol=SplitProtocol(GLOBAL_TEMPORAL, 0.2, 0.1)).fingerprint}
    assert len(keys) == 3


def test_leave_last_out_keeps_the_cache_key_it_had_before_the_protocols():
    dataset = FrameDataset(TWENTY)
    material = json.dumps([dataset.fingerprint(), "leave-last-out/v1", 3])
    assert prepare_split(dataset).fingerprint == hashlib.sha256(material.encode()).hexdigest()


def test_timestamps_all_equal_leave_nothing_to_train_on():
    frame = interactions([(u, i, 5) for u in range(3) for i in range(4)])
    with pytest.raises(ConfigError, match="nothing to train on"):
        prepare_split(FrameDataset(frame), protocol=TEMPORAL)


def test_cut_offs_on_the_same_time_leave_an_empty_validation_period():
    frame = interactions([(u, 10 * u + i, i if i < 3 else 9) for u in range(4) for i in range(5)])
    with pytest.raises(ConfigError, match="empty validation period.*raise validation_fraction"):
        prepare_split(FrameDataset(frame), protocol=SplitProtocol(GLOBAL_TEMPORAL, 0.05, 0.3))


@pytest.mark.parametrize("kind, validation, test, message", [
    ("temporal", 0.1, 0.1, "unknown split 'temporal'"),
    (GLOBAL_TEMPORAL, 0.0, 0.1, "validation_fraction must be a number between 0 and 1"),
    (GLOBAL_TEMPORAL, 0.5, 0.5, "must be below 1"),
])
def test_a_bad_protocol_is_one_clear_error(kind, validation, test, message):
    with pytest.raises(ConfigError, match=message):
        SplitProtocol(kind, validation, test)


# -- the ranking task's index on a global-temporal split --------------------------------------------------------
def test_ranking_evaluates_each_held_out_set_over_the_users_that_have_a_row():
    split = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    index = RankingIndex(split)
    assert split.users[index.evaluated["validation"]].tolist() == [1, 2, 4]
    assert split.users[index.evaluated["test"]].tolist() == [1, 3]


def test_the_excluded_items_are_the_training_items_and_the_other_held_out_item():
    split = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    index = RankingIndex(split)
    rows = index.evaluated["validation"]
    mask = index.excluded_mask("validation", rows)
    for row, user in zip(range(len(rows)), split.users[rows], strict=True):
        trained = set(split.train.loc[split.train["user"] == user, "item"])
        other = set(split.test.loc[split.test["user"] == user, "item"])
        assert set(split.items[mask[row].numpy()]) == trained | other


def test_leave_last_out_excludes_as_before_for_any_block_of_users():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"user": rng.integers(0, 30, 600), "item": rng.integers(0, 80, 600),
                          "timestamp": rng.integers(0, 10**5, 600)})
    split = prepare_split(FrameDataset(frame))
    index = RankingIndex(split)
    rows = np.arange(5, 17)
    mask = index.excluded_mask("test", rows)
    for row, user in enumerate(split.users[rows]):
        expected = set(split.train.loc[split.train["user"] == user, "item"])
        expected |= set(split.validation.loc[split.validation["user"] == user, "item"])
        assert set(split.items[mask[row].numpy()]) == expected


def test_training_negatives_come_from_the_sampling_items():
    split = prepare_split(FrameDataset(TWENTY), protocol=TEMPORAL)
    (_, items), labels = RankingIndex(split).epoch_rows(50, torch.Generator().manual_seed(0))
    negatives = set(items[labels == 0].tolist())
    assert negatives <= set(split.sampling_items) and 99 not in negatives


# -- the suite settings ------------------------------------------------------------------------------------------
SUITE = """
epochs = 1
dim = 4
budgets = ["1/2"]
latency_batch_sizes = []
{settings}
[[datasets]]
name = "synthetic"
params = {{ num_users = 60, num_items = 40, interactions_per_user = 6 }}
[[models]]
name = "gmf"
[[schemes]]
name = "hashing-trick"
"""


def suite_at(tmp_path, settings: str = ""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "suite.toml"  # one name for all: the suite's name is part of a cell's identity
    path.write_text(SUITE.format(settings=settings))
    return path


def test_the_default_split_leaves_cell_keys_as_they_were(tmp_path):
    default, explicit = (parse_suite(suite_at(tmp_path / name, body)).cells()[0]
                         for name, body in (("a", ""), ("b", f'split = "{LEAVE_LAST_OUT}"')))
    assert "split" not in default.identity() and "test_fraction" not in default.identity()
    assert default.key == explicit.key


def test_a_global_temporal_split_is_part_of_the_cell_identity(tmp_path):
    cells = [parse_suite(suite_at(tmp_path / name, body)).cells()[0] for name, body in (
        ("a", ""), ("b", 'split = "global-temporal"'), ("c", 'split = "global-temporal"\ntest_fraction = 0.2'))]
    assert cells[1].identity()["split"] == GLOBAL_TEMPORAL and cells[2].identity()["test_fraction"] == 0.2
    assert len({cell.key for cell in cells}) == 3


def test_fractions_without_the_global_temporal_split_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'test_fraction' applies to split = \"global-temporal\" only"):
        parse_suite(suite_at(tmp_path, "test_fraction = 0.2"))


def test_an_unknown_split_suggests_the_closest(tmp_path):
    result = invoke("run", "suite", str(suite_at(tmp_path, 'split = "global-temporl"')),
                    "--db", str(tmp_path / "r.sqlite"))
    assert_one_line_error(result, "unknown split 'global-temporl'", "did you mean 'global-temporal'")
    assert not (tmp_path / "r.sqlite").exists()


def test_a_task_without_the_split_refuses_it_in_one_line(tmp_path):
    body = SUITE.format(settings='split = "global-temporal"\ntask = "rating-classification"')
    path = tmp_path / "suite.toml"
    path.write_text(body.replace('name = "synthetic"', 'name = "movielens-100k"').replace(
        "params = { num_users = 60, num_items = 40, interactions_per_user = 6 }\n", ""))
    result = invoke("run", "suite", str(path), "--db", str(tmp_path / "r.sqlite"))
    assert_one_line_error(result, "split 'global-temporal'", "task 'rating-classification'", "leave-last-out")
    assert not (tmp_path / "r.sqlite").exists()


def test_a_ranking_suite_runs_on_a_global_temporal_split(tmp_path):
    result = invoke("run", "suite", str(suite_at(tmp_path, 'split = "global-temporal"')),
                    "--db", str(tmp_path / "r.sqlite"), "--no-progress")
    assert result.exit_code == 0, result.output
    row = ResultStore(tmp_path / "r.sqlite").frame().iloc[0]
    assert row["status"] == "ok" and 0.0 <= row["test_auc"] <= 1.0
    assert json.loads(row["config_json"])["split"] == GLOBAL_TEMPORAL
