"""The ``amazon-reviews`` dataset: the 2014 and 2018 review dumps as strict or loose JSON lines and the
ratings-only CSVs, found by category; and the real Musical Instruments 5-core through the ranking task."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from cli_checks import assert_one_line_error, invoke
from conftest import SHARED_DATA
from embbench_plugins.datasets.amazon import AmazonReviews
from files import write

from embbench import registry
from embbench.data import prepare_split
from embbench.errors import ConfigError, DataNotFound
from embbench.run.store import ResultStore
from embbench.run.sweep import run_suite

INSTRUMENTS = SHARED_DATA / "amazon-musical-instruments-5core"
FOLDER = "amazon-musical-instruments-5core"

# (reviewer, product, stars, time): the product IDs are text even when all digits
REVIEWS = [("A2IBPI20UZIR0U", "1384719342", 5.0, 1393545600), ("A14VAT5EAX3D9S", "B000068NW5", 4.0, 1363392000),
           ("A2IBPI20UZIR0U", "B000068NW5", 1.0, 1395000000), ("A195EZSQDW3E21", "0001713353", 3.0, 1377648000)]
USERS = [2, 0, 2, 1]  # A14... is 0, A19... 1, A2I... 2: sorted order
ITEMS = [1, 2, 2, 0]  # 0001713353, 1384719342, B000068NW5


def review_2014(user: str, item: str, stars: float, when: int) -> dict:
    return {"reviewerID": user, "asin": item, "reviewerName": "J. \"Jo\" O'Neil", "helpful": [0, 1],
            "reviewText": "Says 'overall': 1.0, \"asin\": \"X\" and {'unixReviewTime': 5} in its text.",
            "overall": stars, "summary": "ok, fine", "unixReviewTime": when, "reviewTime": "02 28, 2014"}


def review_2018(user: str, item: str, stars: float, when: int) -> dict:
    return {"overall": stars, "vote": "2", "verified": True, "reviewTime": "02 28, 2014", "reviewerID": user,
            "asin": item, "style": {"Format:": " Paperback"}, "reviewerName": "Jo",
            "reviewText": "unixReviewTime, overall", "summary": "fine", "unixReviewTime": when}


def assert_reviews(frame) -> None:
    assert list(frame.columns) == ["user", "item", "timestamp", "rating"]
    assert frame["user"].tolist() == USERS and frame["item"].tolist() == ITEMS
    assert frame["timestamp"].tolist() == [when for *_, when in REVIEWS]
    assert frame["rating"].tolist() == [stars for _, _, stars, _ in REVIEWS]
    assert all(frame[column].dtype == np.int64 for column in ("user", "item", "timestamp"))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["reviews_Musical_Instruments_5.json", "Musical_Instruments.json"])
def test_strict_json_lines_of_2014_are_found_by_category(tmp_path, packed, name):
    write(tmp_path / FOLDER / name, "".join(json.dumps(review_2014(*r)) + "\n" for r in REVIEWS), packed)
    assert_reviews(AmazonReviews(tmp_path, category="Musical_Instruments").load())


def test_the_2018_release_with_its_keys_in_another_order(tmp_path):
    write(tmp_path / "amazon-books-5core" / "Books_5.json", "".join(json.dumps(review_2018(*r)) + "\n"
                                                                    for r in REVIEWS), packed=True)
    assert_reviews(AmazonReviews(tmp_path, category="Books").load())


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gz"])
def test_loose_json_python_literal_dicts(tmp_path, packed):
    text = "".join(repr(review_2014(*r)) + "\n" for r in REVIEWS) + "\n"  # a trailing blank line too
    write(tmp_path / FOLDER / "reviews_Musical_Instruments_5.json", text, packed)
    assert_reviews(AmazonReviews(tmp_path, category="Musical_Instruments").load())


def test_loose_and_strict_json_of_the_same_reviews_give_the_same_frame(tmp_path):
    write(tmp_path / "strict.json", "".join(json.dumps(review_2018(*r)) + "\n" for r in REVIEWS))
    write(tmp_path / "loose.json", "".join(repr(review_2018(*r)) + "\n" for r in REVIEWS))
    strict, loose = (AmazonReviews(tmp_path, path=name).load() for name in ("strict.json", "loose.json"))
    assert strict.equals(loose)


def test_the_2014_ratings_csv_starts_with_the_user(tmp_path):
    text = "".join(f"{u},{i},{s},{t}\n" for u, i, s, t in REVIEWS)
    write(tmp_path / FOLDER / "ratings_Musical_Instruments.csv", text)
    assert_reviews(AmazonReviews(tmp_path, category="Musical_Instruments").load())


def test_the_2018_ratings_csv_starts_with_the_item(tmp_path):
    text = "".join(f"{i},{u},{s},{t}\n" for u, i, s, t in REVIEWS)
    write(tmp_path / "amazon-musical-instruments" / "Musical_Instruments.csv", text, packed=True)
    assert_reviews(AmazonReviews(tmp_path, category="Musical_Instruments").load())


def test_csv_order_overrides_the_file_name(tmp_path):
    write(tmp_path / "mine.csv", "".join(f"{u},{i},{s},{t}\n" for u, i, s, t in REVIEWS))
    assert_reviews(AmazonReviews(tmp_path, path="mine.csv", csv_order="user-first").load())
    assert AmazonReviews(tmp_path, path="mine.csv").load()["user"].tolist() != USERS  # item-first by default


def test_the_5core_json_is_preferred_to_the_ratings_csv(tmp_path):
    write(tmp_path / FOLDER / "ratings_Musical_Instruments.csv", "A,B,5.0,1\n")
    write(tmp_path / FOLDER / "reviews_Musical_Instruments_5.json", json.dumps(review_2014(*REVIEWS[0])) + "\n")
    assert AmazonReviews(tmp_path, category="Musical_Instruments").path().suffix == ".json"


def test_reviews_without_a_rating_or_time_are_skipped_with_a_warning(tmp_path):
    broken = {**review_2014(*REVIEWS[0]), "unixReviewTime": "soon"}
    lines = [json.dumps(review_2014(*r)) for r in REVIEWS] + [json.dumps(broken)]
    write(tmp_path / "r.json", "\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 of 5 reviews.*the first is review 5"):
        assert_reviews(AmazonReviews(tmp_path, path="r.json").load())


def test_the_fingerprint_is_of_the_uncompressed_content_and_the_layout(tmp_path):
    text = "".join(f"{u},{i},{s},{t}\n" for u, i, s, t in REVIEWS)
    write(tmp_path / "a" / "x.csv", text)
    write(tmp_path / "b" / "x.csv", text, packed=True)
    plain, packed = AmazonReviews(tmp_path, path="a/x.csv"), AmazonReviews(tmp_path, path="b/x.csv.gz")
    assert plain.fingerprint() == packed.fingerprint()
    assert AmazonReviews(tmp_path, path="a/x.csv", csv_order="user-first").fingerprint() != plain.fingerprint()


def test_a_missing_category_says_which_files_to_put_where(tmp_path):
    with pytest.raises(DataNotFound, match=f"'Baby' not found: put one of reviews_Baby_5.json\\(.gz\\).*"
                                           f"ratings_Baby.csv\\(.gz\\).* in {tmp_path / 'amazon-baby-5core'}/"):
        AmazonReviews(tmp_path, category="Baby").load()


def test_a_file_that_is_not_json_lines_is_one_error(tmp_path):
    write(tmp_path / "r.json", "<html>not reviews</html>\n")
    with pytest.raises(DataNotFound, match="is not Amazon reviews as JSON lines"):
        AmazonReviews(tmp_path, path="r.json").load()


@pytest.mark.parametrize("params, message", [
    ({}, "give exactly one of 'category'"),
    ({"category": "Books", "path": "x.json"}, "give exactly one of 'category'"),
    ({"category": "../Books"}, "category must be a name like"),
    ({"category": "Books", "csv_order": "user"}, "csv_order must be one of auto, user-first, item-first"),
])
def test_bad_parameters_are_one_config_error(tmp_path, params, message):
    with pytest.raises(ConfigError, match=message):
        registry.create("datasets", "amazon-reviews", data_dir=tmp_path, **params)


def test_the_command_line_prints_a_missing_category_as_one_line(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('[[datasets]]\nname = "amazon-reviews"\nparams = { category = "Books" }\n'
                     '[[models]]\nname = "gmf"\n[[schemes]]\nname = "full"\n')
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite), "--db", str(db), "--data-dir", str(tmp_path))
    assert_one_line_error(result, "datasets[0]", "'Books' not found", "amazon-books-5core")
    assert not db.exists()


# -- the real data: ../shared/data/amazon-musical-instruments-5core ---------------------------------------------
real = pytest.mark.skipif(not INSTRUMENTS.is_dir(),
                          reason=f"the Amazon Musical Instruments 5-core is not at {INSTRUMENTS}")


@real
def test_real_musical_instruments_has_the_published_5core_counts():
    frame = AmazonReviews(SHARED_DATA, category="Musical_Instruments").load()
    assert (len(frame), frame["user"].nunique(), frame["item"].nunique()) == (10_261, 1_429, 900)
    split = prepare_split(AmazonReviews(SHARED_DATA, category="Musical_Instruments"))
    assert split.summary()["users"] == 1_429 and split.summary()["validation_rows"] == 1_429


@real
def test_real_musical_instruments_trains_one_epoch_of_ranking(tmp_path):
    suite = tmp_path / "amazon.toml"
    suite.write_text(
        'epochs = 1\ndim = 8\nlatency_batch_sizes = []\n[[datasets]]\nname = "amazon-reviews"\n'
        'params = { category = "Musical_Instruments" }\n[[models]]\nname = "gmf"\n'
        '[[schemes]]\nname = "hashing-trick"\nbudgets = ["1/4"]\n'
    )
    started = time.perf_counter()
    summary = run_suite(str(suite), db=tmp_path / "r.sqlite", data_dir=SHARED_DATA, progress=False)
    assert summary.ok == 1, summary.failures
    row = ResultStore(tmp_path / "r.sqlite").frame().iloc[0]
    assert 0.0 <= row["test_hr10"] <= 1.0 and 0.3 < row["test_auc"] < 1.0
    assert time.perf_counter() - started < 120
