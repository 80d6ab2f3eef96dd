"""The dataset API: the leave-last-out protocol, its content-keyed cache, the file and download helpers."""

from __future__ import annotations

import gzip
import hashlib
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embbench.data import (
    Dataset,
    Split,
    cache_dir,
    download_archive,
    find_file,
    prepare_split,
    read_table,
    resolve_data_dir,
)
from embbench.errors import ConfigError, DataNotFound, PluginError


class FrameDataset(Dataset):
    """A dataset over a given frame that counts how often it is loaded."""

    def __init__(self, frame: pd.DataFrame) -> None:
        super().__init__(None)
        self.frame = frame
        self.loads = 0

    def load(self) -> pd.DataFrame:
        self.loads += 1
        return self.frame.copy()

    def fingerprint(self) -> str:
        row_hashes = pd.util.hash_pandas_object(self.frame, index=False).to_numpy()
        return hashlib.sha256(row_hashes.tobytes()).hexdigest()


def interactions(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype(np.int64)


def triples(frame: pd.DataFrame) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in frame[["user", "item", "timestamp"]].to_numpy()]


# user 7: out of file order in time; user 3: a duplicate; user 5: too short; user 9: equal timestamps
SMALL = interactions([
    (7, 100, 30), (7, 101, 10), (3, 200, 1), (7, 102, 20), (3, 201, 2), (5, 300, 1), (7, 103, 40),
    (3, 200, 5), (3, 202, 3), (5, 301, 2), (9, 400, 8), (9, 401, 8), (9, 402, 8), (3, 203, 4),
])


@pytest.fixture
def small_split() -> Split:
    return prepare_split(FrameDataset(SMALL))


def test_last_interaction_by_time_is_test_and_second_last_is_validation(small_split):
    test = dict(zip(small_split.test["user"], small_split.test["item"], strict=True))
    validation = dict(zip(small_split.validation["user"], small_split.validation["item"], strict=True))
    assert test[7] == 103 and validation[7] == 100
    assert triples(small_split.train[small_split.train["user"] == 7]) == [(7, 101, 10), (7, 102, 20)]


def test_equal_timestamps_keep_file_order(small_split):
    assert triples(small_split.test[small_split.test["user"] == 9]) == [(9, 402, 8)]
    assert triples(small_split.validation[small_split.validation["user"] == 9]) == [(9, 401, 8)]
    assert triples(small_split.train[small_split.train["user"] == 9]) == [(9, 400, 8)]


def test_duplicate_pairs_keep_the_earliest_interaction(small_split):
    user3 = pd.concat([small_split.train, small_split.validation, small_split.test])
    user3 = user3[user3["user"] == 3]
    assert sorted(triples(user3)) == [(3, 200, 1), (3, 201, 2), (3, 202, 3), (3, 203, 4)]
    assert triples(small_split.test[small_split.test["user"] == 3]) == [(3, 203, 4)]


def test_users_with_too_few_distinct_items_are_dropped(small_split):
    assert list(small_split.users) == [3, 7, 9]
    for frame in (small_split.train, small_split.validation, small_split.test):
        assert 5 not in set(frame["user"])
    assert 300 not in small_split.items and 301 not in small_split.items


def test_duplicates_do_not_count_towards_min_interactions():
    frame = interactions([(1, 10, 1), (1, 10, 2), (1, 11, 3), (2, 20, 1), (2, 21, 2), (2, 22, 3)])
    assert list(prepare_split(FrameDataset(frame)).users) == [2]


def test_every_user_has_exactly_one_validation_and_one_test_row(small_split):
    for frame in (small_split.validation, small_split.test):
        assert list(frame["user"]) == list(small_split.users)


def test_held_out_rows_never_appear_in_train(small_split):
    train_pairs = set(zip(small_split.train["user"], small_split.train["item"], strict=True))
    for frame in (small_split.validation, small_split.test):
        assert not train_pairs & set(zip(frame["user"], frame["item"], strict=True))
    held_out = pd.concat([small_split.validation, small_split.test])
    assert not held_out.duplicated(["user", "item"]).any()


def test_frames_are_int64_and_train_is_sorted_by_user_then_time(small_split):
    for frame in (small_split.train, small_split.validation, small_split.test):
        assert list(frame.columns) == ["user", "item", "timestamp"]
        assert all(dtype == np.int64 for dtype in frame.dtypes)
    ordered = small_split.train.sort_values(["user", "timestamp"], kind="stable")
    assert triples(ordered) == triples(small_split.train)


def test_items_are_the_sorted_catalogue_of_all_kept_rows(small_split):
    kept = pd.concat([small_split.train, small_split.validation, small_split.test])
    assert small_split.items.dtype == np.int64 and small_split.users.dtype == np.int64
    assert list(small_split.items) == sorted(set(kept["item"]))


def test_feature_counts_are_training_frequencies(small_split):
    users, user_counts = small_split.feature_counts("user")
    assert list(users) == [3, 7, 9] and list(user_counts) == [2, 2, 1]
    items, item_counts = small_split.feature_counts("item")
    assert list(items) == [101, 102, 200, 201, 400] and set(item_counts) == {1}
    assert items.dtype == np.int64 and item_counts.dtype == np.int64


def test_feature_counts_rejects_unknown_columns(small_split):
    with pytest.raises(ConfigError, match="'timestamp'"):
        small_split.feature_counts("timestamp")


def test_summary_counts_users_items_and_rows(small_split):
    assert small_split.summary() == {
        "users": 3, "items": 11, "train_rows": 5, "validation_rows": 3, "test_rows": 3,
    }


def test_min_interactions_raises_the_bar():
    assert list(prepare_split(FrameDataset(SMALL), min_interactions=4).users) == [3, 7]


def test_min_interactions_below_three_is_rejected():
    with pytest.raises(ConfigError, match="min_interactions"):
        prepare_split(FrameDataset(SMALL), min_interactions=2)


def test_no_user_left_is_one_clear_error():
    with pytest.raises(DataNotFound, match="no user with at least 3"):
        prepare_split(FrameDataset(interactions([(1, 1, 1), (1, 2, 2)])))


def test_load_without_required_columns_is_a_plugin_error():
    with pytest.raises(PluginError, match="timestamp"):
        prepare_split(FrameDataset(pd.DataFrame({"user": [1], "item": [2]})))


def test_second_split_comes_from_the_cache_without_loading():
    dataset = FrameDataset(SMALL)
    first = prepare_split(dataset)
    second = prepare_split(dataset)
    assert dataset.loads == 1
    assert second.fingerprint == first.fingerprint
    for name in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(getattr(second, name), getattr(first, name))
    np.testing.assert_array_equal(second.items, first.items)
    np.testing.assert_array_equal(second.users, first.users)


def test_use_cache_false_always_loads():
    dataset = FrameDataset(SMALL)
    prepare_split(dataset, use_cache=False)
    prepare_split(dataset, use_cache=False)
    assert dataset.loads == 2


def test_cache_is_keyed_by_content_and_min_interactions():
    changed = SMALL.copy()
    changed.loc[0, "item"] = 999
    keys = {
        prepare_split(FrameDataset(SMALL)).fingerprint,
        prepare_split(FrameDataset(changed)).fingerprint,
        prepare_split(FrameDataset(SMALL), min_interactions=4).fingerprint,
    }
    assert len(keys) == 3


def test_cache_folder_holds_only_finished_splits(isolated_cache):
    split = prepare_split(FrameDataset(SMALL))
    assert cache_dir() == isolated_cache
    entries = sorted(p.name for p in (isolated_cache / "splits").iterdir())
    assert entries == [split.fingerprint]
    assert {p.name for p in (isolated_cache / "splits" / split.fingerprint).iterdir()} == {
        "train.parquet", "validation.parquet", "test.parquet", "meta.json",
    }


def test_an_unreadable_cache_is_rebuilt(isolated_cache):
    dataset = FrameDataset(SMALL)
    key = prepare_split(dataset).fingerprint
    (isolated_cache / "splits" / key / "train.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="rebuilding the split cache"):
        split = prepare_split(dataset)
    assert dataset.loads == 2 and len(split.train) == 5
    assert prepare_split(dataset).summary() == split.summary() and dataset.loads == 2


def test_a_million_interactions_split_in_seconds():
    rng = np.random.default_rng(0)
    n = 1_000_000
    frame = pd.DataFrame({
        "user": rng.integers(0, 20_000, n),
        "item": rng.integers(0, 5_000, n),
        "timestamp": rng.integers(0, 10**6, n),
    })
    started = time.perf_counter()
    split = prepare_split(FrameDataset(frame), use_cache=False)
    assert time.perf_counter() - started < 10
    kept_rows = len(split.train) + len(split.validation) + len(split.test)
    assert kept_rows == len(frame.drop_duplicates(["user", "item"]))


def test_data_dir_comes_from_argument_then_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBBENCH_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("EMBBENCH_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "embbench" / "data"


def test_cache_dir_comes_from_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBBENCH_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EMBBENCH_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "embbench"


def test_find_file_tries_folders_in_order_and_gzip_variants(tmp_path):
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "r.dat").write_text("x")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "r.dat.gz").write_bytes(gzip.compress(b"x"))
    assert find_file(tmp_path, ["ours", "official"], ["r.dat"]) == tmp_path / "ours" / "r.dat.gz"
    assert find_file(tmp_path, ["official", "ours"], ["r.dat"]) == tmp_path / "official" / "r.dat"
    assert find_file(tmp_path, ["missing"], ["r.dat"]) is None


def test_find_file_follows_a_symlink_that_git_checked_out_as_text(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ratings.head.dat.gz").write_bytes(gzip.compress(b"1::2::3::4\n"))
    (tmp_path / "d" / "ratings.dat.gz").write_text("ratings.head.dat.gz")
    assert find_file(tmp_path, ["d"], ["ratings.dat"]) == tmp_path / "d" / "ratings.head.dat.gz"


def test_find_file_keeps_small_files_that_name_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ratings.dat").write_text("1::2::3::4")
    assert find_file(tmp_path, ["d"], ["ratings.dat"]) == tmp_path / "d" / "ratings.dat"


def test_read_table_decompresses_gzip_transparently(tmp_path):
    text = "a,b\n1,x\n2,é\n"
    plain, packed = tmp_path / "t.csv", tmp_path / "t.csv.gz"
    plain.write_text(text, encoding="utf-8")
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    for path in (plain, packed):
        frame = read_table(path)
        assert list(frame["a"]) == [1, 2] and list(frame["b"]) == ["x", "é"]


def test_download_failure_is_one_line_naming_the_destination(tmp_path):
    dest = tmp_path / "data"
    url = "http://127.0.0.1:9/x.zip"
    with pytest.raises(DataNotFound) as caught:
        download_archive(url, dest, "Test data", size_bytes=1, sha256="0" * 64)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"could not download Test data from {url} (")
    assert f"put the files in {dest}/" in message


def test_embbench_offline_refuses_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBBENCH_OFFLINE", "1")
    with pytest.raises(DataNotFound, match="EMBBENCH_OFFLINE"):
        download_archive("https://example.invalid/x.zip", tmp_path, "Test data", size_bytes=1, sha256="0" * 64)


def test_download_extracts_the_archive_into_dest(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ml-test/ratings.dat", "1::2::3::4\n")
    archive = tmp_path / "archive.zip"
    archive.write_bytes(buffer.getvalue())
    dest = tmp_path / "data"
    (dest / "ml-test").mkdir(parents=True)
    (dest / "ml-test" / "mine.txt").write_text("kept")
    size, sha256 = len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest()
    assert download_archive(archive.as_uri(), dest, "Test data", size_bytes=size, sha256=sha256) == dest
    assert (dest / "ml-test" / "ratings.dat").read_text() == "1::2::3::4\n"
    assert (dest / "ml-test" / "mine.txt").read_text() == "kept"
    assert sorted(p.name for p in dest.iterdir()) == ["ml-test"]


def test_download_of_something_not_a_zip_is_one_line(tmp_path):
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    with pytest.raises(DataNotFound, match="not a zip archive") as caught:
        download_archive(
            not_zip.as_uri(), tmp_path / "data", "Test data", size_bytes=5, sha256=hashlib.sha256(b"hello").hexdigest()
        )
    assert "\n" not in str(caught.value)
    assert not any(Path(tmp_path / "data").iterdir())
