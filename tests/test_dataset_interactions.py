"""The ``interactions`` dataset: your own CSV, TSV or Parquet file (plain or .gz), its column mapping, IDs,
timestamps, filters, bag columns and fingerprint, and one clear line for each thing wrong with it."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pandas as pd
import pytest
from cli_checks import assert_one_line_error, invoke
from embbench_plugins.datasets.interactions import Interactions
from files import write

from embbench import registry
from embbench.data import prepare_split
from embbench.errors import ConfigError, DataNotFound
from embbench.run.store import ResultStore

# user, item, time, stars: string IDs, a duplicate (ann, b2), ISO dates with and without a time and offset
CSV = """who,what,when,stars
ann,b2,2021-03-01,5
bob,a1,2021-03-01T12:00:00Z,3
ann,c3,2021-03-02T00:00:00+01:00,4
cat,b2,2021-03-04,1
ann,b2,2021-03-05,2
"""
DAY = 86_400
MARCH_1 = 1_614_556_800  # 2021-03-01T00:00:00Z
MAPPING = {"user": "who", "item": "what", "timestamp": "when", "rating": "stars"}


def dataset(tmp_path, text: str = CSV, name: str = "shop/log.csv", packed: bool = False, **params) -> Interactions:
    write(tmp_path / name, text, packed)
    params.setdefault("columns", MAPPING)
    return Interactions(data_dir=tmp_path, path=name, **params)


def test_a_csv_with_a_header_is_read_through_the_column_mapping(tmp_path):
    frame = dataset(tmp_path).load()
    assert list(frame.columns) == ["user", "item", "timestamp", "rating"]
    assert all(frame[column].dtype == np.int64 for column in ("user", "item", "timestamp"))
    assert frame["rating"].tolist() == [5.0, 3.0, 4.0, 1.0, 2.0]


def test_string_ids_are_numbered_in_sorted_order(tmp_path):
    data = dataset(tmp_path)
    frame = data.load()
    assert frame["user"].tolist() == [0, 1, 0, 2, 0]  # ann, bob, cat
    assert frame["item"].tolist() == [1, 0, 2, 1, 1]  # a1, b2, c3
    assert data.id_labels["user"].tolist() == ["ann", "bob", "cat"]
    assert data.id_labels["item"].tolist() == ["a1", "b2", "c3"]


def test_the_same_ids_come_back_whatever_the_row_order(tmp_path):
    header, *rows = CSV.splitlines()
    shuffled = dataset(tmp_path, "\n".join([header, *reversed(rows)]) + "\n", name="b.csv").load()
    original = dataset(tmp_path).load()
    pairs = set(zip(original["user"], original["item"], strict=True))
    assert set(zip(shuffled["user"], shuffled["item"], strict=True)) == pairs


def test_integer_ids_keep_their_values_and_leading_zeros_make_text(tmp_path):
    frame = dataset(tmp_path, "user,item,timestamp\n42,7,1\n-3,1000,2\n", name="ints.csv", columns=None).load()
    assert frame["user"].tolist() == [42, -3] and frame["item"].tolist() == [7, 1000]
    padded = dataset(tmp_path, "user,item,timestamp\n007,1,1\n7,1,2\n", name="padded.csv", columns=None)
    assert padded.load()["user"].tolist() == [0, 1] and padded.id_labels["user"].tolist() == ["007", "7"]


def test_iso_dates_become_unix_seconds_in_utc(tmp_path):
    frame = dataset(tmp_path).load()
    assert frame["timestamp"].tolist() == [MARCH_1, MARCH_1 + DAY // 2, MARCH_1 + DAY - 3600, MARCH_1 + 3 * DAY,
                                           MARCH_1 + 4 * DAY]


def test_numeric_timestamps_are_kept_and_fractions_round_down(tmp_path):
    frame = dataset(tmp_path, "user,item,timestamp\n1,2,1600000000123\n1,3,7.9\n1,4,-2.5\n", name="t.csv",
                    columns=None).load()
    assert frame["timestamp"].tolist() == [1_600_000_000_123, 7, -3]


def test_default_column_names_need_no_mapping_and_a_missing_rating_is_fine(tmp_path):
    frame = dataset(tmp_path, "timestamp,item,user\n5,1,2\n", name="plain.csv", columns=None).load()
    assert frame.to_dict("records") == [{"user": 2, "item": 1, "timestamp": 5}]


@pytest.mark.parametrize("name, text, separator", [
    ("log.tsv", CSV.replace(",", "\t"), None),
    ("log.tab", CSV.replace(",", "\t"), None),
    ("log.txt", CSV.replace(",", ";"), ";"),
    ("log.dat", CSV.replace(",", "::"), "::"),
])
def test_tsv_and_other_separators(tmp_path, name, text, separator):
    expected = dataset(tmp_path).load()
    pd.testing.assert_frame_equal(dataset(tmp_path, text, name=name, separator=separator).load(), expected)


def test_a_gzip_file_reads_and_fingerprints_like_the_plain_one(tmp_path):
    plain = dataset(tmp_path / "a")
    packed = dataset(tmp_path / "b", name="shop/log.csv", packed=True)
    assert packed.path().name == "log.csv.gz"  # found from path = "shop/log.csv"
    pd.testing.assert_frame_equal(packed.load(), plain.load())
    assert packed.fingerprint() == plain.fingerprint()


def test_a_relative_path_is_inside_the_data_folder_and_an_absolute_one_is_as_given(tmp_path):
    write(tmp_path / "elsewhere" / "x.csv", CSV)
    absolute = Interactions(data_dir=tmp_path / "data", path=str(tmp_path / "elsewhere" / "x.csv"), columns=MAPPING)
    assert len(absolute.load()) == 5
    assert dataset(tmp_path).path() == tmp_path / "shop" / "log.csv"


def test_parquet_files_with_typed_columns(tmp_path):
    frame = pd.DataFrame({
        "who": ["ann", "bob", "ann"], "what": [3, 1, 2], "stars": [5.0, 3.0, 4.0],
        "when": pd.to_datetime(["2021-03-01", "2021-03-02", "2021-03-03"]),
    })
    (tmp_path / "p").mkdir()
    frame.to_parquet(tmp_path / "p" / "log.parquet")
    (tmp_path / "p" / "log2.parquet.gz").write_bytes(gzip.compress((tmp_path / "p" / "log.parquet").read_bytes()))
    for name in ("p/log.parquet", "p/log2.parquet.gz"):
        loaded = Interactions(data_dir=tmp_path, path=name, columns=MAPPING).load()
        assert loaded["user"].tolist() == [0, 1, 0] and loaded["item"].tolist() == [3, 1, 2]
        assert loaded["timestamp"].tolist() == [MARCH_1, MARCH_1 + DAY, MARCH_1 + 2 * DAY]


def test_parquet_without_pyarrow_names_the_package_to_install(tmp_path, monkeypatch):
    pd.DataFrame({"user": [1], "item": [2], "timestamp": [3]}).to_parquet(tmp_path / "log.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were absent
    with pytest.raises(ConfigError, match="needs the package pyarrow.*pip install pyarrow"):
        Interactions(data_dir=tmp_path, path="log.parquet").load()


def test_min_rating_keeps_ratings_at_or_above_it(tmp_path):
    frame = dataset(tmp_path, min_rating=4).load()
    assert frame["rating"].tolist() == [5.0, 4.0]
    assert frame["user"].tolist() == [0, 0]  # IDs are numbered over the whole file, before the filter


def test_duplicate_rows_are_all_loaded_and_the_split_keeps_the_earliest(tmp_path):
    text = "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in [
        (1, 10, 1), (1, 11, 2), (1, 10, 9), (1, 12, 3), (1, 13, 4), (1, 13, 4)])
    data = dataset(tmp_path, text, name="dup.csv", columns=None)
    assert len(data.load()) == 6
    split = prepare_split(data)
    assert split.test["item"].tolist() == [13] and split.train["item"].tolist() == [10, 11]


def test_the_fingerprint_follows_the_content_and_the_mapping(tmp_path):
    base = dataset(tmp_path).fingerprint()
    assert dataset(tmp_path).fingerprint() == base
    assert dataset(tmp_path, min_rating=3).fingerprint() != base
    assert dataset(tmp_path, columns={**MAPPING, "rating": "stars", "user": "what", "item": "who"}).fingerprint() \
        != base
    assert dataset(tmp_path, CSV.replace("cat", "cow")).fingerprint() != base


def test_a_changed_file_gives_a_new_split(tmp_path):
    first = prepare_split(dataset(tmp_path, columns=None, text="user,item,timestamp\n1,1,1\n1,2,2\n1,3,3\n"))
    second = prepare_split(dataset(tmp_path, columns=None, text="user,item,timestamp\n1,1,1\n1,2,2\n1,4,3\n"))
    assert first.fingerprint != second.fingerprint and second.test["item"].tolist() == [4]


def test_bag_columns_become_bag_features_of_their_owner(tmp_path):
    text = "user,item,timestamp,genres\n1,10,1,Drama|Comedy\n2,10,2,Drama | Comedy\n1,11,3,\n2,12,4,War\n"
    data = dataset(tmp_path, text, name="bags.csv", columns=None,
                   bag_columns={"genres": {"column": "genres", "owner": "item"}})
    assert "genres" not in data.load().columns
    source = data.bag_features()["genres"]
    assert source.owner == "item" and source.keys.tolist() == [10, 12]  # item 11 has an empty bag
    assert source.values.tolist() == [0, 1, 2]  # Comedy, Drama for item 10; War for item 12
    assert source.offsets.tolist() == [0, 2, 3]


def test_without_bag_columns_there_are_no_bag_features(tmp_path):
    assert dataset(tmp_path).bag_features() == {}


# -- one clear message for each thing wrong -------------------------------------------------------------------
def test_a_missing_file_names_the_path_and_the_data_folder(tmp_path):
    with pytest.raises(DataNotFound, match=f"{tmp_path / 'no' / 'such.csv'} not found.*data folder {tmp_path}"):
        Interactions(data_dir=tmp_path, path="no/such.csv").load()


def test_a_missing_column_lists_the_columns_and_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="no column 'wen' for the timestamp \\(did you mean 'when'\\?\\); its "
                                          "columns: who, what, when, stars"):
        dataset(tmp_path, columns={**MAPPING, "timestamp": "wen"}).load()


def test_an_explicitly_mapped_rating_column_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no column 'score' for the rating"):
        dataset(tmp_path, columns={**MAPPING, "rating": "score"}).load()


def test_a_timestamp_that_is_neither_number_nor_date_names_its_line(tmp_path):
    with pytest.raises(DataNotFound, match="holds 'yesterday' at line 3 .*neither a number nor an ISO 8601 date"):
        dataset(tmp_path, CSV.replace("2021-03-01T12:00:00Z", "yesterday")).load()


def test_an_empty_id_names_its_line(tmp_path):
    with pytest.raises(DataNotFound, match="column 'who' \\(user\\) is empty in 1 rows, first at line 4"):
        dataset(tmp_path, CSV.replace("ann,c3", ",c3")).load()


def test_a_rating_that_is_not_a_number_names_its_line(tmp_path):
    with pytest.raises(DataNotFound, match="holds 'five' at line 2"):
        dataset(tmp_path, CSV.replace("b2,2021-03-01,5", "b2,2021-03-01,five")).load()


def test_nothing_left_after_min_rating_says_what_ratings_there_are(tmp_path):
    with pytest.raises(DataNotFound, match="has a rating >= 6 \\(5 rows, ratings 1 to 5\\); lower min_rating"):
        dataset(tmp_path, min_rating=6).load()


def test_a_file_with_only_a_header_is_one_error(tmp_path):
    with pytest.raises(DataNotFound, match="holds no rows"):
        dataset(tmp_path, "who,what,when\n", columns={"user": "who", "item": "what", "timestamp": "when"}).load()


@pytest.mark.parametrize("params, message", [
    ({}, "parameter 'path' is required"),
    ({"path": "x.csv", "columns": {"usr": "a"}}, "columns has no key 'usr' \\(did you mean 'user'\\?\\)"),
    ({"path": "x.csv", "columns": {"user": "a", "item": "a"}}, "maps both user and item to the column 'a'"),
    ({"path": "x.parquet", "separator": ";"}, "separator applies to CSV and TSV files"),
    ({"path": "x.csv", "bag_columns": {"g": {"column": "g", "owner": "shop"}}}, "owner must be one of user, item"),
    ({"path": "x.csv", "bag_columns": {"g": {"column": "user"}}}, "is already the interactions' user column"),
])
def test_bad_parameters_are_one_config_error_naming_them(tmp_path, params, message):
    with pytest.raises(ConfigError, match=message):
        registry.create("datasets", "interactions", data_dir=tmp_path, **params)


def test_the_command_line_prints_a_missing_column_as_one_line_and_writes_nothing(tmp_path):
    write(tmp_path / "data" / "log.csv", CSV)
    suite = tmp_path / "s.toml"
    suite.write_text('epochs = 1\n[[datasets]]\nname = "interactions"\n'
                     'params = { path = "log.csv", columns = { user = "user_id" } }\n'
                     '[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n')
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite), "--db", str(db), "--data-dir", str(tmp_path / "data"))
    assert_one_line_error(result, "datasets[0]", "no column 'user_id' for the user", "its columns: who, what")
    assert not db.exists()


def test_a_ranking_suite_runs_on_your_own_file(tmp_path):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 600), rng.integers(0, 60, 600)
    rows = [f"u{u}\ti{i}\t2021-01-01T00:00:{t % 60:02d}Z\n" for t, (u, i) in enumerate(zip(users, items, strict=True))]
    write(tmp_path / "data" / "mine.tsv", "u\ti\tt\n" + "".join(rows), packed=True)
    suite = tmp_path / "s.toml"
    suite.write_text('epochs = 1\ndim = 4\nlatency_batch_sizes = []\n[[datasets]]\nname = "interactions"\n'
                     'params = { path = "mine.tsv.gz", columns = { user = "u", item = "i", timestamp = "t" } }\n'
                     '[[models]]\nname = "gmf"\n[[schemes]]\nname = "hashing-trick"\nbudgets = ["1/2"]\n')
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite), "--db", str(db), "--data-dir", str(tmp_path / "data"),
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert ResultStore(db).frame().iloc[0]["status"] == "ok"
