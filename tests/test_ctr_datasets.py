"""The click-through datasets: Criteo and Avazu readers (shared samples and official layouts), synthetic-ctr."""

from __future__ import annotations

import math
import tracemalloc
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from embbench_plugins.datasets.avazu import FIELDS as AVAZU_FIELDS
from embbench_plugins.datasets.avazu import Avazu, weekdays
from embbench_plugins.datasets.criteo import Criteo, hash_values
from embbench_plugins.datasets.synthetic_ctr import CHUNK_ROWS, MAX_IDS, SyntheticCTR
from files import write

from embbench.ctr import SPLITS, CTRData, hash_strings
from embbench.errors import DataNotFound

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(folder: str) -> Path:
    """The real data beside the repository (never copied into it); the test is skipped where it is absent."""
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA / folder}")
    return SHARED_DATA


def one_id(value: str) -> int:
    return int(hash_strings([value])[0])


def sizes(data: CTRData) -> tuple[int, int, int]:
    return len(data.train), len(data.validation), len(data.test)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    positives = labels == 1
    p, n = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - p * (p + 1) / 2) / (p * n))


def test_entry_points_name_the_three_datasets():
    names = {point.name: point.value for point in entry_points(group="embbench.datasets")}
    assert names["criteo"].endswith(":Criteo") and names["avazu"].endswith(":Avazu")
    assert names["synthetic-ctr"].endswith(":SyntheticCTR")
    for plugin in (Criteo, Avazu, SyntheticCTR):
        assert plugin.summary and "\n" not in plugin.summary


# --- Criteo --------------------------------------------------------------------------------------------------


def test_hash_values_equals_hash_strings():
    values = np.array(["68fd1e64", "", "1005", "Tuesday", "ünï", "68fd1e64"], dtype=object)
    np.testing.assert_array_equal(hash_values(values), hash_strings(values))
    np.testing.assert_array_equal(hash_values(np.array([None, np.nan], dtype=object)), hash_strings(["", ""]))


def test_real_criteo_sample():
    dataset = Criteo(data_dir=shared("criteo-sample"))
    data = dataset.load_ctr()
    data.validate("criteo")
    assert dataset.files()[0] == "sample"
    assert sizes(data) == (7_200, 409, 391)
    assert len(data.fields) == 26 and len(data.dense_names) == 13
    # 1,728 clicks in all (shared/data/SOURCES.md): 21.5 % of training rows
    assert [int(data.frame(name).labels.sum()) for name in SPLITS] == [1_549, 93, 86]
    # the first row: 0 | 1 1 5 0 1382 4 15 2 181 1 2 <missing> 2 | 68fd1e64 ... C22 missing ...
    raw = np.array([1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2], dtype=np.float64)
    np.testing.assert_allclose(data.train.dense[0], np.log1p(raw).astype(np.float32), rtol=1e-6)
    assert data.train.labels[0] == 0.0
    assert data.train.sparse[0, 0] == one_id("68fd1e64") and data.train.sparse[0, 25] == one_id("9727dd16")
    assert data.train.sparse[0, 21] == one_id("")  # C22 is empty: the missing value is an ID like any other
    assert dataset.fingerprint() == Criteo(data_dir=SHARED_DATA).fingerprint()
    assert len(dataset.fingerprint()) == 64


def criteo_line(row: int, label: int) -> str:
    dense = [str(row), "", "-3", *[str(row % 5)] * 10]
    categorical = [f"{row:08x}", "", *["abcdef01"] * 24]
    return "\t".join([str(label), *dense, *categorical]) + "\n"


@pytest.mark.parametrize("packed", [False, True])
def test_criteo_official_train_txt_is_split_by_row_order_like_dlrm(tmp_path, packed):
    text = "".join(criteo_line(row, row % 2) for row in range(30))
    write(tmp_path / "criteo" / "train.txt", text, packed)
    dataset = Criteo(data_dir=tmp_path)
    data = dataset.load_ctr()
    data.validate("criteo")
    assert dataset.files()[0] == "kaggle"
    # 30 rows: the last 30 // 7 = 4 held out, their first half validation, the second test
    assert sizes(data) == (26, 2, 2)
    order = [frame.sparse[:, 0] for frame in (data.train, data.validation, data.test)]
    np.testing.assert_array_equal(np.concatenate(order), hash_strings([f"{row:08x}" for row in range(30)]))
    np.testing.assert_array_equal(data.test.labels, [0.0, 1.0])
    # I1 = row, I2 missing -> 0, I3 = -3 -> 0
    np.testing.assert_allclose(data.test.dense[:, :3], np.log1p([[28, 0, 0], [29, 0, 0]]), rtol=1e-6)
    assert data.train.dense.dtype == np.float32 and data.train.sparse.dtype == np.int64

    limited = Criteo(max_rows=21, data_dir=tmp_path)
    assert sizes(limited.load_ctr()) == (18, 2, 1)
    assert limited.fingerprint() != dataset.fingerprint()
    # the fingerprint is of the uncompressed rows used: a longer file with the same first 21 rows agrees
    write(tmp_path / "longer" / "criteo" / "train.txt", text + criteo_line(30, 1), not packed)
    assert Criteo(max_rows=21, data_dir=tmp_path / "longer").fingerprint() == limited.fingerprint()
    assert Criteo(data_dir=tmp_path / "longer").fingerprint() != dataset.fingerprint()


def test_criteo_official_file_wins_over_a_sample_and_a_sample_needs_all_three_files(tmp_path):
    rows = "".join(criteo_line(row, 1) for row in range(14))
    for name in ("train.csv", "dev.csv"):
        write(tmp_path / "criteo-sample" / name, rows)
    with pytest.raises(DataNotFound):
        Criteo(data_dir=tmp_path).files()
    write(tmp_path / "criteo-sample" / "test.csv", rows + "\n", packed=True)  # a blank line is no row
    assert Criteo(data_dir=tmp_path).files()[0] == "sample"
    assert sizes(Criteo(max_rows=14, data_dir=tmp_path).load_ctr()) == (14, 14, 14)
    write(tmp_path / "criteo-kaggle" / "train.txt", rows)
    assert Criteo(data_dir=tmp_path).files() == ("kaggle", (tmp_path / "criteo-kaggle" / "train.txt",))


def test_criteo_missing_files_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBBENCH_OFFLINE", "1")
    with pytest.raises(DataNotFound) as caught:
        Criteo(data_dir=tmp_path).load_ctr()
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "criteo") in message and "train.txt" in message
    assert "ailab.criteo.com" in message and "docs/datasets-ctr.md" in message


def test_criteo_unreadable_rows_are_one_line_errors(tmp_path):
    write(tmp_path / "criteo" / "train.txt", "".join(criteo_line(row, 1) for row in range(20)) + criteo_line(20, 2))
    with pytest.raises(DataNotFound, match="label is missing or not 0/1") as caught:
        Criteo(data_dir=tmp_path).load_ctr()
    assert "\n" not in str(caught.value)
    write(tmp_path / "small" / "criteo" / "train.txt", "".join(criteo_line(row, 1) for row in range(13)))
    with pytest.raises(DataNotFound, match="at least 14"):
        Criteo(data_dir=tmp_path / "small").load_ctr()
    (tmp_path / "bad" / "criteo").mkdir(parents=True)
    (tmp_path / "bad" / "criteo" / "train.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(DataNotFound, match="could not read"):
        Criteo(data_dir=tmp_path / "bad").load_ctr()


@pytest.mark.parametrize("value", [0, 13, -1, 2.5, "100", True])
def test_criteo_max_rows_is_validated(value):
    with pytest.raises(ValueError, match="max_rows must be None"):
        Criteo(max_rows=value)


# --- Avazu ---------------------------------------------------------------------------------------------------


def test_real_avazu_sample():
    dataset = Avazu(data_dir=shared("avazu-sample"))
    data = dataset.load_ctr()
    data.validate("avazu")
    assert dataset.files()[0] == "sample"
    assert sizes(data) == (8_087, 480, 432)
    # every column but id and click, with hour as two fields
    assert len(data.fields) == 23 and data.fields[:3] == ("hour_of_day", "weekday", "C1")
    assert data.dense_names == () and data.train.dense.shape == (8_087, 0)
    assert sum(int(data.frame(name).labels.sum()) for name in SPLITS) == 1_563
    assert data.train.labels[:5].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    # every row is from 14102100, 2014-10-21 00h, a Tuesday; dev/test have no header but are read alike
    for name in SPLITS:
        frame = data.frame(name)
        assert (frame.sparse[:, 0] == one_id("00")).all() and (frame.sparse[:, 1] == one_id("Tuesday")).all()
    first = dict(zip(data.fields, data.train.sparse[0], strict=True))
    assert first["C1"] == one_id("1005") and first["site_id"] == one_id("1fbe01fe") and first["C21"] == one_id("79")


AVAZU_HEADER = "id,click,hour," + ",".join(AVAZU_FIELDS[2:]) + "\n"


def avazu_line(row: int, hour: int, click: int) -> str:
    values = [str(row), str(click), str(hour), "1005", str(row % 3), f"{row:08x}", *["x"] * 18]
    return ",".join(values) + "\n"


@pytest.mark.parametrize("packed", [False, True])
def test_avazu_official_train_is_split_by_the_last_day(tmp_path, packed):
    hours = [14102100] * 6 + [14102213] * 6 + [14102523] * 5  # Tuesday, Wednesday, Saturday
    text = AVAZU_HEADER + "".join(avazu_line(row, hour, row % 2) for row, hour in enumerate(hours))
    write(tmp_path / "avazu" / ("train" if packed else "train.csv"), text, packed)
    dataset = Avazu(data_dir=tmp_path)
    data = dataset.load_ctr()
    data.validate("avazu")
    assert dataset.files()[0] == "kaggle"
    # the last day's 5 rows: the first 3 validation, the last 2 test, by row order
    assert sizes(data) == (12, 3, 2)
    site = data.fields.index("site_id")
    order = [frame.sparse[:, site] for frame in (data.train, data.validation, data.test)]
    np.testing.assert_array_equal(np.concatenate(order), hash_strings([f"{row:08x}" for row in range(17)]))
    assert (data.test.sparse[:, 1] == one_id("Saturday")).all() and (data.test.sparse[:, 0] == one_id("23")).all()
    np.testing.assert_array_equal(data.train.sparse[[0, 6], 1], hash_strings(["Tuesday", "Wednesday"]))
    assert data.train.dense.shape == (12, 0)

    # max_rows reads the first rows only: then the last day among them (Wednesday) is held out
    limited = Avazu(max_rows=9, data_dir=tmp_path)
    assert sizes(limited.load_ctr()) == (6, 2, 1)
    assert limited.fingerprint() != dataset.fingerprint()
    with pytest.raises(DataNotFound, match="all of them on 20141021; the time split needs rows of two days") as caught:
        Avazu(max_rows=6, data_dir=tmp_path).load_ctr()
    assert "\n" not in str(caught.value)


def test_avazu_time_split_of_rows_out_of_time_order(tmp_path):
    hours = [14102100, 14102200, 14102201, 14102100, 14102202, 14102203]  # the last day is not at the end
    lines = "".join(avazu_line(row, hour, 1) for row, hour in enumerate(hours))
    write(tmp_path / "avazu" / "train.csv", AVAZU_HEADER + lines)
    data = Avazu(data_dir=tmp_path).load_ctr()
    data.validate("avazu")
    site = data.fields.index("site_id")
    for frame, rows in zip((data.train, data.validation, data.test), ([0, 3], [1, 2], [4, 5]), strict=True):
        np.testing.assert_array_equal(frame.sparse[:, site], hash_strings([f"{row:08x}" for row in rows]))


def test_avazu_reads_files_without_a_header(tmp_path):
    rows = "".join(avazu_line(row, 14102100 + (row >= 4) * 100, 1) for row in range(6))
    write(tmp_path / "avazu" / "train.csv", rows)
    assert sizes(Avazu(data_dir=tmp_path).load_ctr()) == (4, 1, 1)


def test_avazu_weekdays():
    np.testing.assert_array_equal(weekdays(np.array([141021, 141026, 101, 240229])), [1, 6, 5, 3])


def test_avazu_missing_files_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBBENCH_OFFLINE", "1")
    with pytest.raises(DataNotFound) as caught:
        Avazu(data_dir=tmp_path).fingerprint()
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "avazu") in message and "train.gz" in message
    assert "kaggle.com" in message


def test_avazu_bad_hour_is_a_one_line_error(tmp_path):
    write(tmp_path / "avazu" / "train.csv", AVAZU_HEADER + avazu_line(0, 14132100, 0) + avazu_line(1, 14102200, 1))
    with pytest.raises(DataNotFound, match="not YYMMDDHH"):
        Avazu(data_dir=tmp_path).load_ctr()


# --- synthetic-ctr -------------------------------------------------------------------------------------------

SMALL = {"train_rows": CHUNK_ROWS + 1000, "validation_rows": 3000, "test_rows": 2000}


def arrays(data: CTRData) -> list[np.ndarray]:
    return [getattr(data.frame(name), part) for name in SPLITS for part in ("sparse", "dense", "labels")]


def test_synthetic_ctr_is_deterministic_and_the_seed_matters():
    data = SyntheticCTR(**SMALL).load_ctr()
    data.validate("synthetic-ctr")
    assert sizes(data) == (CHUNK_ROWS + 1000, 3000, 2000)
    assert data.fields == tuple(f"C{f}" for f in range(1, 9)) and data.dense_names == ("I1", "I2", "I3", "I4")
    assert data.vocabulary_sizes == dict.fromkeys(data.fields, 1_000_000)
    again = SyntheticCTR(**SMALL)
    test_first = again.generate("test")  # the order of generation does not matter
    for first, second in zip(arrays(data), arrays(again.load_ctr()), strict=True):
        assert first.tobytes() == second.tobytes()
    assert test_first.sparse.tobytes() == data.test.sparse.tobytes()
    other = SyntheticCTR(seed=1, **SMALL).load_ctr()
    assert (other.train.sparse != data.train.sparse).mean() > 0.5
    assert not np.array_equal(other.train.dense, data.train.dense)
    # the splits are different draws, not copies
    assert not np.array_equal(data.validation.sparse[:2000], data.test.sparse)
    assert SyntheticCTR(**SMALL).fingerprint() == SyntheticCTR(**SMALL, data_dir="/elsewhere").fingerprint()
    assert SyntheticCTR(**SMALL).fingerprint() != SyntheticCTR(seed=1, **SMALL).fingerprint()


def test_synthetic_ctr_billion_id_vocabulary_zipf_head_and_disjoint_fields():
    vocabulary, fields, rows = 10**9, 6, 40_000
    dataset = SyntheticCTR(num_fields=fields, vocabulary_size=vocabulary, train_rows=rows, validation_rows=10,
                           test_rows=10, num_dense=0)
    data = dataset.load_ctr()
    data.validate("synthetic-ctr")
    assert data.vocabulary_sizes == dict.fromkeys(data.fields, vocabulary) and data.train.dense.shape == (rows, 0)
    sparse = data.train.sparse
    assert (sparse >= 0).all()
    indices, field_of = dataset.decode_ids(sparse)
    assert (field_of == np.arange(fields)).all()  # every ID names its own field: the fields' IDs never meet
    assert indices.min() >= 0 and indices.max() < vocabulary
    assert len(np.unique(indices)) > rows  # the tail: most IDs are rare
    np.testing.assert_array_equal(dataset.raw_ids(indices[:, 2], 2), sparse[:, 2])
    # the head: index 0's share of all draws is its Zipf probability (binomial tolerance, 5 sigma)
    head = dataset.zipf.mass(0, 1)
    draws = rows * fields
    assert abs((indices == 0).mean() - head) < 5 * math.sqrt(head * (1 - head) / draws)
    # the largest vocabulary the fields allow still decodes
    widest = SyntheticCTR(num_fields=fields, vocabulary_size=MAX_IDS // fields, train_rows=100, validation_rows=1,
                          test_rows=1)
    top = np.array([0, MAX_IDS // fields - 1])
    decoded, field = widest.decode_ids(widest.raw_ids(top, fields - 1))
    np.testing.assert_array_equal(decoded, top)
    np.testing.assert_array_equal(field, [fields - 1] * 2)


def test_synthetic_ctr_memory_does_not_grow_with_the_vocabulary():
    def peak(vocabulary: int) -> int:
        dataset = SyntheticCTR(vocabulary_size=vocabulary, train_rows=20_000, validation_rows=10, test_rows=10)
        tracemalloc.start()
        try:
            dataset.load_ctr()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, huge = peak(10**3), peak(10**12)
    assert huge < 1.1 * small


def test_synthetic_ctr_click_rate_and_bayes_auc():
    dataset = SyntheticCTR(train_rows=60_000, validation_rows=20_000, test_rows=20_000)
    data = dataset.load_ctr()
    for name in SPLITS:
        labels = data.frame(name).labels
        assert 0.15 <= labels.mean() <= 0.35
        logits = dataset.true_logits(name)
        # the labels were drawn from these logits: their mean probability matches the click rate
        assert abs(float(np.mean(1 / (1 + np.exp(-logits)))) - labels.mean()) < 0.015
        assert 0.75 <= auc(logits, labels) <= 0.87
    # the IDs carry signal: the first-order term alone ranks rows far better than chance
    heavy = SyntheticCTR(num_fields=2, num_dense=0, vocabulary_size=50, train_rows=30_000, validation_rows=10,
                         test_rows=10)
    frame = heavy.generate("train")
    rate = {key: frame.labels[frame.sparse[:, 0] == key].mean() for key in np.unique(frame.sparse[:, 0])}
    assert auc(np.array([rate[key] for key in frame.sparse[:, 0]]), frame.labels) > 0.6


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"num_fields": 0}, "num_fields"),
        ({"vocabulary_size": 0}, "vocabulary_size"),
        ({"vocabulary_size": 2**62}, "vocabulary_size"),
        ({"vocabulary_size": 1.5}, "vocabulary_size"),
        ({"zipf_exponent": 3.5}, "zipf_exponent"),
        ({"num_dense": 65}, "num_dense"),
        ({"train_rows": 0}, "train_rows"),
        ({"validation_rows": -1}, "validation_rows"),
        ({"test_rows": True}, "test_rows"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_ctr_parameters_are_validated(params, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        SyntheticCTR(**params)


def test_synthetic_ctr_edge_sizes():
    for params in ({"vocabulary_size": 1}, {"num_fields": 1, "num_dense": 0}, {"zipf_exponent": 0.0}):
        data = SyntheticCTR(train_rows=500, validation_rows=50, test_rows=50, **params).load_ctr()
        data.validate("synthetic-ctr")
        assert 0.15 <= data.train.labels.mean() <= 0.35
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticCTR().true_logits("dev")
