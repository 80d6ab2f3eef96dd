"""The built-in datasets: MovieLens parsers on files in the official formats, and the synthetic generator."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from embbench_plugins.datasets.movielens import MovieLens1M, MovieLens100K, MovieLensLatest, OfficialArchive
from embbench_plugins.datasets.synthetic import Synthetic, ZipfLaw
from files import write

from embbench.data import prepare_split
from embbench.errors import DataNotFound

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (user, item, rating, timestamp): user 2 rates item 20 twice, user 1 has ties
ROWS = [(1, 10, 5, 100), (2, 20, 3, 50), (1, 11, 4, 100), (2, 21, 1, 40), (1, 12, 2, 90), (2, 20, 5, 60)]
EXPECTED = pd.DataFrame([(u, i, t) for u, i, _, t in ROWS], columns=["user", "item", "timestamp"])

ML100K = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)
ML1M = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS)
LATEST = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in ROWS)


def assert_interactions(frame: pd.DataFrame) -> None:
    assert all(frame[column].dtype == np.int64 for column in ("user", "item", "timestamp"))
    pd.testing.assert_frame_equal(frame[["user", "item", "timestamp"]], EXPECTED)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("folder", ["movielens-100k", "ml-100k"])
def test_movielens_100k_reads_u_data(tmp_path, packed, folder):
    write(tmp_path / folder / "u.data", ML100K, packed)
    assert_interactions(MovieLens100K(data_dir=tmp_path).load())


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("folder", ["movielens-1m", "ml-1m"])
def test_movielens_1m_reads_ratings_dat(tmp_path, packed, folder):
    write(tmp_path / folder / "ratings.dat", ML1M, packed)
    frame = MovieLens1M(data_dir=tmp_path).load()
    assert_interactions(frame)
    assert list(frame["rating"]) == [r for _, _, r, _ in ROWS]


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("variant", ["latest-small", "latest", "20m", "25m"])
def test_movielens_latest_reads_ratings_csv_of_each_variant(tmp_path, packed, variant):
    write(tmp_path / f"ml-{variant}" / "ratings.csv", LATEST, packed)
    frame = MovieLensLatest(data_dir=tmp_path, variant=variant).load()
    assert_interactions(frame)
    assert list(frame["rating"]) == [r - 0.5 for _, _, r, _ in ROWS]


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gz"])
def test_movielens_genres_become_multi_hot_side_features_by_movie_id(tmp_path, packed):
    flags = ["0"] * 19
    u_item = "|".join(["10", "A (1995)", "01-Jan-1995", "", "http://x"] + ["1"] + flags[1:]) + "\n"
    u_item += "|".join(["11", "B|C (1996)".replace("|", " "), "", "", ""] + flags[:3] + ["1"] + flags[4:]) + "\n"
    write(tmp_path / "ml-100k" / "u.data", ML100K, packed)
    write(tmp_path / "ml-100k" / "u.item", u_item, packed)
    hundred_k = MovieLens100K(data_dir=tmp_path).item_side_features()
    assert hundred_k.shape == (2, 19) and hundred_k.loc[10].tolist()[0] == 1 and hundred_k.loc[11].tolist()[3] == 1

    write(tmp_path / "ml-1m" / "ratings.dat", ML1M, packed)
    write(tmp_path / "ml-1m" / "movies.dat", "10::A (1995)::Comedy|Drama\n11::B: the sequel (1996)::Drama\n", packed)
    one_m = MovieLens1M(data_dir=tmp_path).item_side_features()
    assert list(one_m.columns) == ["Comedy", "Drama"] and one_m.loc[10].tolist() == [1, 1]
    assert one_m.loc[11].tolist() == [0, 1] and one_m.dtypes.eq(np.float32).all()

    write(tmp_path / "ml-latest-small" / "ratings.csv", LATEST, packed)
    write(tmp_path / "ml-latest-small" / "movies.csv", 'movieId,title,genres\n10,"A, the",Comedy\n'
          "11,B,(no genres listed)\n", packed)
    latest = MovieLensLatest(data_dir=tmp_path).item_side_features()
    assert list(latest.columns) == ["Comedy"] and latest.loc[11].tolist() == [0]


def test_movielens_without_a_movie_file_has_no_side_features(tmp_path):
    write(tmp_path / "ml-1m" / "ratings.dat", ML1M, False)
    assert MovieLens1M(data_dir=tmp_path).item_side_features() is None


def test_movielens_latest_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="variant must be one of 'latest-small', 'latest', '20m', '25m'"):
        MovieLensLatest(data_dir=tmp_path, variant="10m")


def test_data_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    write(tmp_path / "movielens-1m" / "ratings.dat", ML1M, packed=False)
    monkeypatch.setenv("EMBBENCH_DATA_DIR", str(tmp_path))
    assert_interactions(MovieLens1M().load())


def test_fingerprint_is_the_sha256_of_the_uncompressed_file(tmp_path):
    plain = MovieLens1M(data_dir=tmp_path / "a")
    write(tmp_path / "a" / "ml-1m" / "ratings.dat", ML1M, packed=False)
    packed = MovieLens1M(data_dir=tmp_path / "b")
    write(tmp_path / "b" / "ml-1m" / "ratings.dat", ML1M, packed=True)
    assert plain.fingerprint() == packed.fingerprint() == hashlib.sha256(ML1M.encode()).hexdigest()


def test_changed_file_gives_a_different_split(tmp_path):
    write(tmp_path / "a" / "ml-1m" / "ratings.dat", ML1M, packed=False)
    write(tmp_path / "b" / "ml-1m" / "ratings.dat", ML1M.replace("::12::", "::13::"), packed=False)
    first = prepare_split(MovieLens1M(data_dir=tmp_path / "a"))
    second = prepare_split(MovieLens1M(data_dir=tmp_path / "b"))
    assert first.fingerprint != second.fingerprint and 13 in second.items and 13 not in first.items


@pytest.mark.parametrize("dataset", [MovieLens100K, MovieLens1M, MovieLensLatest])
def test_missing_files_offline_are_one_line_saying_where_to_put_them(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("EMBBENCH_OFFLINE", "1")
    with pytest.raises(DataNotFound) as caught:
        dataset(data_dir=tmp_path).fingerprint()
    message = str(caught.value)
    assert "\n" not in message and f"put the files in {tmp_path}/" in message
    assert "files.grouplens.org" in message


def test_missing_files_with_an_unreachable_server_are_one_line(tmp_path):
    dataset = MovieLens100K(data_dir=tmp_path)
    dataset.archive = OfficialArchive("http://127.0.0.1:9/ml-100k.zip", 1, "0" * 64)
    with pytest.raises(DataNotFound) as caught:
        dataset.load()
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)
    assert "u.data" in str(caught.value) and "ml-100k/" in str(caught.value)


def zip_with(tmp_path: Path, member: str, text: str) -> OfficialArchive:
    """A local archive holding ``member``, with its true size and sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr(member, text)
    archive = tmp_path / "archive.zip"
    archive.write_bytes(buffer.getvalue())
    return OfficialArchive(archive.as_uri(), len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest())


def test_missing_files_are_downloaded_from_the_archive(tmp_path):
    dataset = MovieLens1M(data_dir=tmp_path / "data")
    dataset.archive = zip_with(tmp_path, "ml-1m/ratings.dat", ML1M)
    assert_interactions(dataset.load())
    assert (tmp_path / "data" / "ml-1m" / "ratings.dat").read_text() == ML1M


def test_a_download_that_is_not_the_recorded_archive_is_refused(tmp_path):
    dataset = MovieLens1M(data_dir=tmp_path / "data")
    genuine = zip_with(tmp_path, "ml-1m/ratings.dat", ML1M)
    dataset.archive = OfficialArchive(genuine.url, genuine.size_bytes, "0" * 64)
    with pytest.raises(DataNotFound, match="refused the archive of MovieLens 1M") as caught:
        dataset.load()
    assert "\n" not in str(caught.value) and genuine.url in str(caught.value)
    assert not (tmp_path / "data" / "ml-1m").exists()


@pytest.mark.parametrize(("dataset", "params"), [
    (MovieLens100K, {}), (MovieLens1M, {}),
    *[(MovieLensLatest, {"variant": v}) for v in MovieLensLatest.variants if v != "latest"],
])
def test_every_downloadable_movielens_records_its_official_archive(tmp_path, dataset, params):
    instance = dataset(data_dir=tmp_path, **params)
    archive = instance.archive
    assert archive.url == f"https://files.grouplens.org/datasets/movielens/{instance.folders[1]}.zip"
    assert archive.size_bytes > 0 and len(archive.sha256) == 64 and set(archive.sha256) <= set("0123456789abcdef")


def test_ml_latest_is_never_downloaded_unverified(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("ml-latest must not be downloaded")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    dataset = MovieLensLatest(data_dir=tmp_path, variant="latest")
    assert dataset.archive is None
    with pytest.raises(DataNotFound, match="no checksum of it can be recorded") as caught:
        dataset.load()
    message = str(caught.value)
    assert "\n" not in message and f"unzip it into {tmp_path}/" in message and "ml-latest.zip" in message


def test_an_archive_without_the_ratings_file_is_one_line(tmp_path):
    dataset = MovieLens1M(data_dir=tmp_path / "data")
    dataset.archive = zip_with(tmp_path, "ml-1m/README", "no ratings")
    with pytest.raises(DataNotFound, match="holds no ml-1m/ratings.dat") as caught:
        dataset.load()
    assert "\n" not in str(caught.value)


def test_a_corrupt_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "ml-1m" / "ratings.dat.gz"
    path.parent.mkdir()
    path.write_bytes(b"this is not gzip data at all")
    for read in (MovieLens1M(data_dir=tmp_path).fingerprint, MovieLens1M(data_dir=tmp_path).load):
        with pytest.raises(DataNotFound) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"could not read {path} as MovieLens 1M ratings.dat (")
        assert "\n" not in message


# The real files beside the repository (never copied into it); skipped where they are absent.


def shared(folder: str) -> Path:
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA / folder}")
    return SHARED_DATA


def test_real_movielens_100k():
    dataset = MovieLens100K(data_dir=shared("movielens-100k"))
    frame = dataset.load()
    assert (len(frame), frame["user"].nunique(), frame["item"].nunique()) == (100_000, 943, 1_682)
    # the published sha256 of the uncompressed u.data (shared/data/SOURCES.md)
    assert dataset.fingerprint() == "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
    split = prepare_split(dataset)
    assert len(split.users) == 943 and len(split.test) == 943 and len(split.items) == 1_682


def test_real_movielens_latest_small():
    dataset = MovieLensLatest(data_dir=shared("movielens-latest-small"))
    frame = dataset.load()
    assert dataset.fingerprint() == "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646"
    assert (len(frame), frame["user"].nunique()) == (100_836, 610)
    assert frame["rating"].min() == 0.5 and frame["rating"].max() == 5.0


def test_real_movielens_1m_first_users():
    frame = MovieLens1M(data_dir=shared("movielens-1m")).load()
    assert len(frame) == 487_650
    assert (frame["user"].min(), frame["user"].max()) == (1, 2999)
    # ratings.dat.gz there is a symlink to the subset; the fingerprint is the subset's published sha256
    dataset = MovieLens1M(data_dir=SHARED_DATA)
    assert dataset.fingerprint() == "1273c4edfe3c0ff9e3a0a0d55819faeb947da0ad7df3927333b51ebefbeedc3d"


# Synthetic


def test_synthetic_is_deterministic_given_the_seed():
    pd.testing.assert_frame_equal(Synthetic(seed=3).load(), Synthetic(seed=3).load())
    assert Synthetic(seed=3).fingerprint() == Synthetic(seed=3).fingerprint()


def test_synthetic_differs_across_seeds():
    first, second = Synthetic(seed=0), Synthetic(seed=1)
    assert not first.load()["item"].equals(second.load()["item"])
    assert first.fingerprint() != second.fingerprint()


def test_synthetic_fingerprint_covers_every_parameter():
    variants = [
        {}, {"num_users": 10}, {"num_items": 500}, {"interactions_per_user": 5}, {"zipf_exponent": 0.5},
        {"latent_dim": 4}, {"affinity": 0.0}, {"seed": 9},
    ]
    assert len({Synthetic(**params).fingerprint() for params in variants}) == len(variants)


def test_synthetic_has_k_distinct_items_per_user_in_time_order():
    frame = Synthetic(num_users=300, num_items=200, interactions_per_user=12).load()
    per_user = frame.groupby("user")
    assert (per_user["item"].nunique() == 12).all() and len(per_user) == 300
    assert (per_user["timestamp"].apply(list) == [list(range(12))] * 300).all()
    assert all(frame[column].dtype == np.int64 for column in ("user", "item", "timestamp"))


def test_synthetic_raw_ids_are_spread_out_not_indices():
    dataset = Synthetic(num_users=100, num_items=100)
    frame = dataset.load()
    assert frame["item"].min() >= 0 and frame["user"].min() >= 0
    assert frame["item"].max() > 2**40 and frame["user"].max() > 2**40
    assert not set(frame["item"]) <= set(range(100))
    ids = dataset.item_ids(np.arange(200_000))
    assert len(np.unique(ids)) == 200_000 and not np.array_equal(ids, np.sort(ids))


def test_synthetic_popularity_follows_zipf():
    dataset = Synthetic(num_users=2000, num_items=1000, interactions_per_user=20)
    counts = dataset.load()["item"].value_counts()
    by_index = counts.reindex(dataset.item_ids(np.arange(1000)), fill_value=0).to_numpy()
    bands = [by_index[0:5].mean(), by_index[5:50].mean(), by_index[50:500].mean(), by_index[500:].mean()]
    assert bands == sorted(bands, reverse=True) and bands[0] > 5 * bands[2]


def test_zipf_law_samples_its_own_probabilities():
    law = ZipfLaw(1000, 1.2)
    sample = law.sample(np.random.default_rng(0).random(200_000))
    observed = np.bincount(sample, minlength=1000)[:5] / len(sample)
    np.testing.assert_allclose(observed, law.probabilities(5), rtol=0.05)
    assert law.probabilities(1000).sum() == pytest.approx(1.0)
    assert law.sample(np.random.default_rng(0).random(1000), first=100).min() >= 100


def test_synthetic_held_out_items_favour_popular_ones():
    # a popularity ranking of the test items beats chance by far: there is signal to learn
    split = prepare_split(Synthetic(num_users=1000, num_items=500, interactions_per_user=10))
    items, counts = split.feature_counts("item")
    popularity = np.zeros(len(split.items))
    popularity[np.searchsorted(split.items, items)] = counts
    held_out = popularity[np.searchsorted(split.items, split.test["item"].to_numpy())]
    beaten = (held_out[:, None] > popularity[None, :]).mean()
    auc = beaten + 0.5 * (held_out[:, None] == popularity[None, :]).mean()
    assert auc > 0.65


def test_synthetic_scales_to_a_billion_items():
    frame = Synthetic(num_users=200, num_items=10**9, interactions_per_user=20).load()
    assert len(frame) == 4000 and (frame.groupby("user")["item"].nunique() == 20).all()
    assert frame["item"].nunique() > 1000  # the tail of a huge catalogue is mostly distinct


def test_synthetic_split_has_every_user():
    split = prepare_split(Synthetic(num_users=150, num_items=90, interactions_per_user=6))
    summary = split.summary()
    assert (summary["users"], summary["validation_rows"], summary["test_rows"]) == (150, 150, 150)
    assert summary["train_rows"] == 150 * 4 and summary["items"] == len(split.items) <= 90


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"num_users": 0}, "num_users"),
        ({"num_items": 0}, "num_items"),
        ({"num_items": 2**63}, "num_items"),
        ({"interactions_per_user": 2}, "interactions_per_user"),
        ({"num_items": 10, "interactions_per_user": 11}, "interactions_per_user"),
        ({"zipf_exponent": -0.5}, "zipf_exponent"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"affinity": -1.0}, "affinity"),
        ({"seed": -1}, "seed"),
        ({"num_users": 2.5}, "num_users"),
        ({"num_users": True}, "num_users"),
    ],
)
def test_synthetic_rejects_bad_parameters_naming_them(params, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        Synthetic(**params)
