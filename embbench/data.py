"""The dataset API, the leave-last-out split protocol and its on-disk cache, and file and download helpers.

A dataset plugin reads raw interactions (``Dataset.load``) and names their content (``Dataset.fingerprint``);
:func:`prepare_split` turns them into a :class:`Split` the way the DHE paper and NCF evaluate: per user, the
last interaction by time is the test item, the second-last the validation item, the rest is training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from embbench.errors import ConfigError, DataNotFound, PluginError
from embbench.schemes import FeatureSpec

# Bump when the split protocol changes: it is part of every cache key, so old caches are never reused.
_PROTOCOL_VERSION = "leave-last-out/v1"
_COLUMNS = ("user", "item", "timestamp")
_FRAMES = ("train", "validation", "test")
_SCHEMA = {column: "int64" for column in _COLUMNS}  # of every cached frame
_DOWNLOAD_TIMEOUT_SECONDS = 60
_LINK_PLACEHOLDER_MAX_BYTES = 1024
_CHUNK_BYTES = 1 << 20
# Extraction bounds, far above what the official archives need (the largest, ml-25m.zip, is 262 MB of CSV
# text, a handful of members): a zip bomb is refused before it fills the disk. Members under a MiB are too
# small for their ratio to matter.
_MAX_EXTRACTED_BYTES = 4 << 30
_MAX_ARCHIVE_MEMBERS = 1_000
_MAX_COMPRESSION_RATIO = 100
_RATIO_EXEMPT_BYTES = 1 << 20

_log = logging.getLogger(__name__)


class Dataset(ABC):
    """Base class of dataset plugins: reads raw interactions."""

    summary: ClassVar[str] = ""

    def __init__(self, data_dir: str | Path | None = None, **params: Any) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self.params = params

    @abstractmethod
    def load(self) -> pd.DataFrame:
        """Columns ``user``, ``item``, ``timestamp`` (int64, raw IDs as in the files), in file order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A key of the content: equal keys mean equal ``load()`` results (it keys the split cache)."""

    def item_side_features(self) -> pd.DataFrame | None:
        """Optional per-item features, indexed by raw item ID; None when the dataset has none."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({params})"


@dataclass
class Split:
    """A leave-last-out split. Frames have int64 columns user, item, timestamp, sorted by user then time."""

    train: pd.DataFrame
    validation: pd.DataFrame  # exactly one row per user
    test: pd.DataFrame  # exactly one row per user
    users: np.ndarray  # sorted unique raw user IDs of all kept users
    items: np.ndarray  # the catalogue: sorted unique raw item IDs anywhere in the kept data
    fingerprint: str  # the split's key: dataset content, protocol version and min_interactions

    def feature_counts(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique IDs of ``column`` ('user' or 'item') in the training frame, and their counts."""
        if column not in ("user", "item"):
            raise ConfigError(f"unknown feature column '{column}'; use 'user' or 'item'")
        ids, counts = np.unique(self.train[column].to_numpy(dtype=np.int64), return_counts=True)
        return ids.astype(np.int64, copy=False), counts.astype(np.int64, copy=False)

    def summary(self) -> dict[str, int]:
        return {
            "users": len(self.users),
            "items": len(self.items),
            "train_rows": len(self.train),
            "validation_rows": len(self.validation),
            "test_rows": len(self.test),
        }


def features_of(split: Split, dim: int, item_side: pd.DataFrame | None = None) -> dict[str, FeatureSpec]:
    """The user and item features of a split; items carry the dataset's side features where it has any
    (rows aligned with the training IDs, zeros for an item the side table lacks)."""
    features = {}
    for name in ("user", "item"):
        ids, counts = split.feature_counts(name)
        side = None
        if name == "item" and item_side is not None and len(item_side.columns):
            side = item_side.reindex(ids).fillna(0.0).to_numpy(dtype=np.float32)
        features[name] = FeatureSpec(name, ids, counts, dim, side)
    return features


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: the argument, else ``$EMBBENCH_DATA_DIR``, else ``~/.cache/embbench/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get("EMBBENCH_DATA_DIR")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "embbench" / "data"


def cache_dir() -> Path:
    """The cache folder: ``$EMBBENCH_CACHE_DIR``, else ``~/.cache/embbench``."""
    from_env = os.environ.get("EMBBENCH_CACHE_DIR")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "embbench"


def _follow_link_placeholder(path: Path, data_dir: Path) -> Path:
    """The file a symlink placeholder names, else ``path`` itself.

    Where git cannot make symlinks (``core.symlinks=false``, some copies and file systems), it checks a
    symlink out as a small text file holding the target path. The target must lie inside the data folder
    (or the placeholder's own folder, should that folder be linked in from elsewhere): a placeholder never
    redirects reads to an arbitrary file.
    """
    if path.is_symlink() or path.stat().st_size > _LINK_PLACEHOLDER_MAX_BYTES:
        return path
    try:
        target = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return path
    if not target or target != target.strip() or "\n" in target or "\0" in target:
        return path
    named = path.parent / target
    try:
        if not named.is_file() or named.resolve() == path.resolve():
            return path
        real = named.resolve()
        inside = real.is_relative_to(Path(data_dir).resolve()) or real.is_relative_to(path.parent.resolve())
    except (OSError, ValueError):
        return path
    if not inside:
        raise DataNotFound(
            f"{path} is a link placeholder naming {real}, outside the data folder {data_dir}; "
            f"replace it with the file itself or point it at a file inside {data_dir}"
        )
    return named


def find_file(data_dir: Path, folders: Sequence[str], names: Sequence[str]) -> Path | None:
    """The first existing ``data_dir/folder/name`` or ``data_dir/folder/name.gz``, folders in order.

    A symlink checked out by git as a text placeholder (see ``_follow_link_placeholder``) is followed when
    it names a file inside the data folder.
    """
    for folder in folders:
        for name in names:
            for candidate in (name, name + ".gz"):
                path = Path(data_dir) / folder / candidate
                if path.is_file():
                    return _follow_link_placeholder(path, Path(data_dir))
    return None


def _is_gzip(path: str | Path) -> bool:
    return str(path).endswith(".gz")


def read_table(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` on a plain or ``.gz`` file (keyword arguments go to pandas)."""
    kwargs.setdefault("compression", "gzip" if _is_gzip(path) else None)
    return pd.read_csv(path, **kwargs)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _merge_into(source: Path, target: Path) -> None:
    """Move what ``source`` holds into ``target``, keeping files already in ``target``."""
    for entry in source.iterdir():
        destination = target / entry.name
        if not destination.exists():
            os.replace(entry, destination)
        elif entry.is_dir() and destination.is_dir():
            _merge_into(entry, destination)


class _ArchiveRejected(Exception):
    """A downloaded archive is not the recorded one, or unpacking it would exceed the extraction bounds."""


def _fetch_verified(url: str, archive: Path, size_bytes: int, sha256: str) -> None:
    """Download ``url`` to ``archive``, reading at most one byte more than expected, and check size and sha256."""
    digest = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as response, open(archive, "wb") as out:
        while received <= size_bytes and (chunk := response.read(min(_CHUNK_BYTES, size_bytes + 1 - received))):
            received += len(chunk)
            digest.update(chunk)
            out.write(chunk)
    if received > size_bytes:
        raise _ArchiveRejected(f"expected {size_bytes:,} bytes, got more")
    got = digest.hexdigest()
    if received != size_bytes or got != sha256.lower():
        raise _ArchiveRejected(
            f"expected {size_bytes:,} bytes with sha256 {sha256.lower()}, got {received:,} bytes with sha256 {got}"
        )


def _member_path(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_relative_to(root) or path == root:
        raise _ArchiveRejected(f"member {name!r} would be written outside the target folder")
    return path


def _extract_bounded(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into ``target``, refusing archives beyond the member, size and ratio bounds."""
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        if len(members) > _MAX_ARCHIVE_MEMBERS:
            raise _ArchiveRejected(f"it has {len(members):,} members, more than {_MAX_ARCHIVE_MEMBERS:,}")
        declared = sum(member.file_size for member in members)
        if declared > _MAX_EXTRACTED_BYTES:
            raise _ArchiveRejected(f"it unpacks to {declared:,} bytes, more than {_MAX_EXTRACTED_BYTES:,}")
        for member in members:
            ratio = member.file_size / max(member.compress_size, 1)
            if member.file_size > _RATIO_EXEMPT_BYTES and ratio > _MAX_COMPRESSION_RATIO:
                raise _ArchiveRejected(
                    f"member {member.filename!r} inflates {ratio:,.0f}-fold, more than {_MAX_COMPRESSION_RATIO}"
                )
        root = target.resolve()
        paths = [_member_path(root, member.filename) for member in members]
        for member, path in zip(members, paths, strict=True):
            if member.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            # zipfile yields at most a member's declared size (and checks its CRC), so the declared total
            # checked above bounds what is written.
            with bundle.open(member) as source, open(path, "xb") as out:
                shutil.copyfileobj(source, out, _CHUNK_BYTES)


def download_archive(url: str, dest: Path, what: str, *, size_bytes: int, sha256: str) -> Path:
    """Download the zip at ``url``, verify its size and SHA-256, and extract it into ``dest``.

    Every failure is one ``DataNotFound`` line. The archive is checked against ``size_bytes`` and ``sha256``
    (those of the official file) before anything is extracted, and extraction is bounded (members, total
    size, compression ratio, paths inside ``dest``). Setting ``$EMBBENCH_OFFLINE`` (to anything but 0)
    refuses every download. Extraction happens in a temporary folder first, so an interrupted download never
    leaves half a file where readers look.
    """
    dest = Path(dest)
    by_hand = f"download it by hand and put the files in {dest}/ (see docs/datasets.md)"

    def failure(reason: object) -> DataNotFound:
        return DataNotFound(f"could not download {what} from {url} ({_one_line(reason)}); {by_hand}")

    if os.environ.get("EMBBENCH_OFFLINE", "0") not in ("", "0"):
        raise failure("downloads are disabled by EMBBENCH_OFFLINE")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as scratch:
            archive = Path(scratch) / "archive.zip"
            extracted = Path(scratch) / "extracted"
            _log.info("downloading %s from %s", what, url)
            _fetch_verified(url, archive, size_bytes, sha256)
            _extract_bounded(archive, extracted)
            _merge_into(extracted, dest)
    except _ArchiveRejected as exc:
        raise DataNotFound(
            f"refused the archive of {what} from {url}: {_one_line(exc)}; nothing was extracted; {by_hand}"
        ) from None
    except urllib.error.HTTPError as exc:
        raise failure(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise failure(exc.reason) from None
    except zipfile.BadZipFile as exc:
        raise failure(f"not a zip archive: {exc}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, disk full, malformed URL
        raise failure(exc) from None
    return dest


def _split_key(dataset_fingerprint: str, min_interactions: int) -> str:
    material = json.dumps([dataset_fingerprint, _PROTOCOL_VERSION, min_interactions])
    return hashlib.sha256(material.encode()).hexdigest()


def _interactions(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frame = dataset.load()
    name = type(dataset).__name__
    missing = [column for column in _COLUMNS if column not in frame.columns]
    if missing:
        raise PluginError(f"dataset {name}: load() returned no column {', '.join(missing)}")
    try:
        return tuple(frame[column].to_numpy(dtype=np.int64) for column in _COLUMNS)  # type: ignore[return-value]
    except (TypeError, ValueError) as exc:
        raise PluginError(f"dataset {name}: load() must give int64 user, item, timestamp ({exc})") from None


def _leave_last_out(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, min_interactions: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    # lexsort is stable: within a user, equal timestamps keep file order.
    order = np.lexsort((timestamps, users))
    users, items, timestamps = users[order], items[order], timestamps[order]
    # Sorted by user then time, the first of each (user, item) pair is its earliest interaction.
    first = ~pd.DataFrame({"user": users, "item": items}).duplicated().to_numpy()
    users, items, timestamps = users[first], items[first], timestamps[first]

    n = len(users)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, n])
    per_row_size = np.repeat(sizes, sizes)
    position = np.arange(n) - np.repeat(starts, sizes)
    from_end = per_row_size - 1 - position  # 0: last interaction, 1: second-last

    keep = per_row_size >= min_interactions

    def frame(mask: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"user": users[mask], "item": items[mask], "timestamp": timestamps[mask]})

    return frame(keep & (from_end >= 2)), frame(keep & (from_end == 1)), frame(keep & (from_end == 0))


def _split_of(train: pd.DataFrame, validation: pd.DataFrame, test: pd.DataFrame, key: str) -> Split:
    items = np.unique(np.concatenate([f["item"].to_numpy(dtype=np.int64) for f in (train, validation, test)]))
    users = test["user"].to_numpy(dtype=np.int64).copy()
    return Split(train, validation, test, users, items, key)


class _CacheInvalid(Exception):
    """A cached split does not match the checksums or the schema its meta.json records."""


def _frame_schema(frame: pd.DataFrame) -> dict[str, str]:
    return {str(column): str(dtype) for column, dtype in frame.dtypes.items()}


def _describe(schema: object) -> str:
    if not isinstance(schema, dict):
        return repr(schema)
    return ", ".join(f"{column} {dtype}" for column, dtype in schema.items()) or "no columns"


def _cached_frames(folder: Path) -> list[pd.DataFrame]:
    """The cached frames, each checked against the sha256 and schema its meta.json records.

    Raises ``_CacheInvalid`` naming what did not match.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
        checksums, schemas = dict(meta["sha256"]), dict(meta["schema"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise _CacheInvalid(f"meta.json records no checksums and schema ({_one_line(exc)})") from None
    frames = []
    for name in _FRAMES:
        file = f"{name}.parquet"
        if schemas.get(name) != _SCHEMA:
            raise _CacheInvalid(f"meta.json records {name} as {_describe(schemas.get(name))}, not {_describe(_SCHEMA)}")
        try:
            content = (folder / file).read_bytes()
        except OSError as exc:
            raise _CacheInvalid(f"{file} is unreadable ({_one_line(exc)})") from None
        if hashlib.sha256(content).hexdigest() != checksums.get(file):
            raise _CacheInvalid(f"the sha256 of {file} is not the one meta.json records")
        try:
            frame = pd.read_parquet(io.BytesIO(content))
        except (OSError, ValueError) as exc:
            raise _CacheInvalid(f"{file} is unreadable ({_one_line(exc)})") from None
        if _frame_schema(frame) != _SCHEMA:
            raise _CacheInvalid(f"{file} holds {_describe(_frame_schema(frame))}, not {_describe(_SCHEMA)}")
        frames.append(frame)
    return frames


def _read_cached(folder: Path, key: str) -> Split | None:
    """The cached split, or None (with a one-line warning when a cache is there but invalid)."""
    if not folder.is_dir():
        return None
    try:
        frames = _cached_frames(folder)
    except _CacheInvalid as exc:
        warnings.warn(f"rebuilding the split cache {folder}: {exc}", stacklevel=3)
        return None
    return _split_of(*frames, key)


def _write_cache(folder: Path, frames: Sequence[pd.DataFrame], meta: dict[str, Any]) -> None:
    """Write into a temporary folder, then rename it into place: a reader sees a whole cache or none.

    The meta.json records each parquet file's sha256 and each frame's schema, so a changed file is noticed.
    An invalid cache already at ``folder`` is moved aside, then replaced.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            checksums, schemas = {}, {}
            for name, frame in zip(_FRAMES, frames, strict=True):
                path = scratch / f"{name}.parquet"
                frame.to_parquet(path, index=False)
                checksums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
                schemas[name] = _frame_schema(frame)
            meta = {**meta, "sha256": checksums, "schema": schemas}
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            stale = scratch.with_name(scratch.name + ".stale")
            if folder.is_dir():
                os.rename(folder, stale)
            os.rename(scratch, folder)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if not folder.is_dir():  # not merely another process winning the rename
                raise
    except OSError as exc:
        warnings.warn(f"could not cache the split in {folder} ({_one_line(exc)})", stacklevel=3)


def prepare_split(dataset: Dataset, min_interactions: int = 3, use_cache: bool = True) -> Split:
    """The leave-last-out split of ``dataset``, from the cache when its content was split before.

    Every interaction counts as positive feedback. Duplicate (user, item) pairs keep their earliest
    interaction; users with fewer than ``min_interactions`` distinct items are dropped. Per user, sorted by
    timestamp (ties keep file order), the last interaction is the test item and the second-last the
    validation item. Cached as parquet under ``cache_dir()/splits/<key>/``, keyed by the dataset's
    fingerprint, the protocol version and ``min_interactions``; a cache whose files do not match the
    checksums and schema its meta.json records is rebuilt, with a warning.
    """
    if isinstance(min_interactions, bool) or not isinstance(min_interactions, int) or min_interactions < 3:
        raise ConfigError(
            f"min_interactions must be an integer >= 3 (train, validation and test need one each), "
            f"got {min_interactions!r}"
        )
    dataset_fingerprint = dataset.fingerprint()
    key = _split_key(dataset_fingerprint, min_interactions)
    folder = cache_dir() / "splits" / key
    if use_cache:
        cached = _read_cached(folder, key)
        if cached is not None:
            return cached
    users, items, timestamps = _interactions(dataset)
    frames = _leave_last_out(users, items, timestamps, min_interactions)
    if len(frames[2]) == 0:
        raise DataNotFound(
            f"{dataset!r} has no user with at least {min_interactions} distinct items "
            f"({len(users):,} interactions read); check its files or parameters"
        )
    if use_cache:
        meta = {
            "dataset": type(dataset).__name__,
            "dataset_fingerprint": dataset_fingerprint,
            "protocol": _PROTOCOL_VERSION,
            "min_interactions": min_interactions,
        }
        _write_cache(folder, frames, meta)
    return _split_of(*frames, key)
