"""Data integrity: verified downloads, bounded extraction, a checked split cache, placeholders kept inside."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from test_data import SMALL, FrameDataset

from embbench import data
from embbench.data import download_archive, find_file, prepare_split
from embbench.errors import DataNotFound


def make_zip(
    tmp_path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED
) -> tuple[str, int, str]:
    """A local archive of ``members``: its URL, size and sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    archive = tmp_path / "archive.zip"
    archive.write_bytes(buffer.getvalue())
    return archive.as_uri(), len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest()


def refused(url: str, dest: Path, size_bytes: int, sha256: str) -> str:
    with pytest.raises(DataNotFound) as caught:
        download_archive(url, dest, "Test data", size_bytes=size_bytes, sha256=sha256)
    message = str(caught.value)
    assert "\n" not in message and url in message and f"put the files in {dest}/" in message
    assert list(dest.iterdir()) == []  # nothing extracted, no scratch left
    return message


# Downloads


def test_an_archive_with_the_recorded_size_and_sha256_is_extracted(tmp_path):
    url, size, sha256 = make_zip(tmp_path, {"ml-test/ratings.dat": b"1::2::3::4\n"})
    download_archive(url, tmp_path / "data", "Test data", size_bytes=size, sha256=sha256.upper())
    assert (tmp_path / "data" / "ml-test" / "ratings.dat").read_bytes() == b"1::2::3::4\n"


def test_a_wrong_sha256_is_one_line_and_nothing_is_extracted(tmp_path):
    url, size, sha256 = make_zip(tmp_path, {"ml-test/ratings.dat": b"1::2::3::4\n"})
    expected = "ab" * 32
    message = refused(url, tmp_path / "data", size, expected)
    assert message.startswith(f"refused the archive of Test data from {url}: ")
    assert f"expected {size:,} bytes with sha256 {expected}, got {size:,} bytes with sha256 {sha256}" in message


def test_a_wrong_size_is_refused(tmp_path):
    url, size, sha256 = make_zip(tmp_path, {"ml-test/ratings.dat": b"1::2::3::4\n"})
    message = refused(url, tmp_path / "data", size + 1, sha256)
    assert f"expected {size + 1:,} bytes" in message and f"got {size:,} bytes" in message


def test_a_download_longer_than_recorded_stops_reading(tmp_path, monkeypatch):
    class Endless(io.RawIOBase):
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            buffer[:] = b"\0" * len(buffer)
            Endless.served += len(buffer)
            return len(buffer)

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BufferedReader(Endless()))
    message = refused("https://example.invalid/x.zip", tmp_path / "data", 1000, "0" * 64)
    assert "expected 1,000 bytes, got more" in message
    assert Endless.served <= 1000 + io.DEFAULT_BUFFER_SIZE


def test_a_zip_bomb_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_RATIO_EXEMPT_BYTES", 1024)
    url, size, sha256 = make_zip(tmp_path, {"bomb/zeros.dat": b"\0" * (1 << 20)})
    message = refused(url, tmp_path / "data", size, sha256)
    assert "member 'bomb/zeros.dat' inflates" in message and "more than 100" in message


def test_an_archive_beyond_the_size_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_MAX_EXTRACTED_BYTES", 1000)
    members = {"a.dat": os.urandom(600), "b.dat": os.urandom(600)}
    url, size, sha256 = make_zip(tmp_path, members, zipfile.ZIP_STORED)
    assert "it unpacks to 1,200 bytes, more than 1,000" in refused(url, tmp_path / "data", size, sha256)


def test_an_archive_with_too_many_members_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_MAX_ARCHIVE_MEMBERS", 3)
    url, size, sha256 = make_zip(tmp_path, {f"m{i}.dat": b"x" for i in range(4)})
    assert "it has 4 members, more than 3" in refused(url, tmp_path / "data", size, sha256)


@pytest.mark.parametrize("name", ["../escape.dat", "/tmp/escape.dat", "ok/../../escape.dat"])
def test_a_member_outside_the_target_folder_is_refused(tmp_path, name):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr(zipfile.ZipInfo("ok/fine.dat"), b"fine")
        bundle.writestr(zipfile.ZipInfo(name), b"escaped")  # ZipInfo keeps the name as given
    archive = tmp_path / "archive.zip"
    archive.write_bytes(buffer.getvalue())
    size, sha256 = len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest()
    (tmp_path / "data").mkdir()
    message = refused(archive.as_uri(), tmp_path / "data", size, sha256)
    assert "would be written outside the target folder" in message
    assert not (tmp_path / "escape.dat").exists()


# The split cache


def cached(isolated_cache: Path, split_key: str, file: str) -> Path:
    return isolated_cache / "splits" / split_key / file


def assert_same_split(split, fresh) -> None:
    assert split.fingerprint == fresh.fingerprint
    for name in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(getattr(split, name), getattr(fresh, name))
    assert list(split.items) == list(fresh.items) and list(split.users) == list(fresh.users)


def rebuilt(dataset: FrameDataset, match: str):
    with pytest.warns(UserWarning, match=match) as caught:
        split = prepare_split(dataset)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    return split


def test_the_cache_records_the_sha256_and_schema_of_each_frame(isolated_cache):
    key = prepare_split(FrameDataset(SMALL)).fingerprint
    meta = json.loads(cached(isolated_cache, key, "meta.json").read_text())
    for name in ("train", "validation", "test"):
        content = cached(isolated_cache, key, f"{name}.parquet").read_bytes()
        assert meta["sha256"][f"{name}.parquet"] == hashlib.sha256(content).hexdigest()
        assert meta["schema"][name] == {"user": "int64", "item": "int64", "timestamp": "int64"}


def test_a_tampered_cache_is_rebuilt_with_a_warning(isolated_cache):
    dataset = FrameDataset(SMALL)
    fresh = prepare_split(dataset)
    path = cached(isolated_cache, fresh.fingerprint, "test.parquet")
    tampered = pd.read_parquet(path)
    tampered["item"] = tampered["item"] + 1
    tampered.to_parquet(path, index=False)
    split = rebuilt(dataset, rf"rebuilding the split cache .*{fresh.fingerprint}: the sha256 of test.parquet")
    assert dataset.loads == 2
    assert_same_split(split, fresh)
    assert_same_split(prepare_split(dataset), fresh)  # the rebuilt cache is valid again
    assert dataset.loads == 2


def test_a_cache_missing_a_column_is_rebuilt(isolated_cache):
    dataset = FrameDataset(SMALL)
    fresh = prepare_split(dataset)
    path = cached(isolated_cache, fresh.fingerprint, "train.parquet")
    pd.read_parquet(path).drop(columns=["timestamp"]).to_parquet(path, index=False)
    assert_same_split(rebuilt(dataset, "the sha256 of train.parquet"), fresh)


def test_a_cache_whose_columns_differ_from_its_schema_is_rebuilt_even_with_a_matching_checksum(isolated_cache):
    dataset = FrameDataset(SMALL)
    fresh = prepare_split(dataset)
    path = cached(isolated_cache, fresh.fingerprint, "validation.parquet")
    pd.read_parquet(path).drop(columns=["item"]).to_parquet(path, index=False)
    meta_path = cached(isolated_cache, fresh.fingerprint, "meta.json")
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["validation.parquet"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    split = rebuilt(dataset, "validation.parquet holds user int64, timestamp int64, not user int64, item int64")
    assert_same_split(split, fresh)


def test_a_cache_with_corrupt_bytes_is_rebuilt(isolated_cache):
    dataset = FrameDataset(SMALL)
    fresh = prepare_split(dataset)
    path = cached(isolated_cache, fresh.fingerprint, "train.parquet")
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    assert_same_split(rebuilt(dataset, "the sha256 of train.parquet"), fresh)


def test_a_cache_without_recorded_checksums_is_rebuilt(isolated_cache):
    dataset = FrameDataset(SMALL)
    fresh = prepare_split(dataset)
    meta_path = cached(isolated_cache, fresh.fingerprint, "meta.json")
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta))
    assert_same_split(rebuilt(dataset, "meta.json records no checksums and schema"), fresh)
    assert "sha256" in json.loads(meta_path.read_text())
    assert sorted(p.name for p in (isolated_cache / "splits").iterdir()) == [fresh.fingerprint]


# Link placeholders


def test_a_placeholder_naming_a_file_outside_the_data_folder_is_refused(tmp_path):
    (tmp_path / "secret.dat").write_text("1::2::3::4\n")
    (tmp_path / "data" / "d").mkdir(parents=True)
    (tmp_path / "data" / "d" / "ratings.dat").write_text("../../secret.dat")
    with pytest.raises(DataNotFound) as caught:
        find_file(tmp_path / "data", ["d"], ["ratings.dat"])
    message = str(caught.value)
    assert "\n" not in message and "link placeholder" in message
    assert f"outside the data folder {tmp_path / 'data'}" in message


def test_a_placeholder_with_an_absolute_target_outside_is_refused(tmp_path):
    (tmp_path / "secret.dat").write_text("1::2::3::4\n")
    (tmp_path / "data" / "d").mkdir(parents=True)
    (tmp_path / "data" / "d" / "ratings.dat").write_text(str(tmp_path / "secret.dat"))
    with pytest.raises(DataNotFound, match="outside the data folder"):
        find_file(tmp_path / "data", ["d"], ["ratings.dat"])


def test_a_placeholder_naming_a_file_elsewhere_in_the_data_folder_is_followed(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "ratings.head.dat").write_text("1::2::3::4\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ratings.dat").write_text("../shared/ratings.head.dat")
    assert find_file(tmp_path, ["d"], ["ratings.dat"]).resolve() == (tmp_path / "shared" / "ratings.head.dat")


def test_a_placeholder_in_a_folder_linked_into_the_data_folder_may_name_its_neighbour(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "ratings.head.dat").write_text("1::2::3::4\n")
    (tmp_path / "elsewhere" / "ratings.dat").write_text("ratings.head.dat")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d").symlink_to(tmp_path / "elsewhere")
    assert find_file(tmp_path / "data", ["d"], ["ratings.dat"]) == tmp_path / "data" / "d" / "ratings.head.dat"
