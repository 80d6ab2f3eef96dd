"""The dataset API, the leave-last-out split protocol and its on-disk cache, and file and download helpers.

A dataset plugin reads raw interactions (``Dataset.load``) and names their content (``Dataset.fingerprint``);
:func:`prepare_split` turns them into a :class:`Split` the way the DHE paper and NCF evaluate: per user, the
last interaction by time is the test item, the second-last the validation item, the rest is training.
"""

from __future__ import annotations

import hashlib
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
_DOWNLOAD_TIMEOUT_SECONDS = 60
_LINK_PLACEHOLDER_MAX_BYTES = 1024

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


def _follow_link_placeholder(path: Path) -> Path:
    """The file a symlink placeholder names, else ``path`` itself.

    Where git cannot make symlinks (``core.symlinks=false``, some copies and file systems), it checks a
    symlink out as a small text file holding the target path.
    """
    if path.is_symlink() or path.stat().st_size > _LINK_PLACEHOLDER_MAX_BYTES:
        return path
    try:
        target = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return path
    if not target or target != target.strip() or "\n" in target or "\0" in target:
        return path
    resolved = path.parent / target
    try:
        return resolved if resolved.is_file() and resolved.resolve() != path.resolve() else path
    except (OSError, ValueError):
        return path


def find_file(data_dir: Path, folders: Sequence[str], names: Sequence[str]) -> Path | None:
    """The first existing ``data_dir/folder/name`` or ``data_dir/folder/name.gz``, folders in order.

    A symlink checked out by git as a text placeholder (see ``_follow_link_placeholder``) is followed.
    """
    for folder in folders:
        for name in names:
            for candidate in (name, name + ".gz"):
                path = Path(data_dir) / folder / candidate
                if path.is_file():
                    return _follow_link_placeholder(path)
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


def download_archive(url: str, dest: Path, what: str) -> Path:
    """Download the zip at ``url`` and extract it into ``dest``; DataNotFound in one line when that fails.

    Setting ``$EMBBENCH_OFFLINE`` (to anything but 0) refuses every download. Extraction happens in a
    temporary folder first, so an interrupted download never leaves half a file where readers look.
    """
    dest = Path(dest)

    def failure(reason: object) -> DataNotFound:
        return DataNotFound(
            f"could not download {what} from {url} ({_one_line(reason)}); "
            f"put the files in {dest}/ (see docs/datasets.md)"
        )

    if os.environ.get("EMBBENCH_OFFLINE", "0") not in ("", "0"):
        raise failure("downloads are disabled by EMBBENCH_OFFLINE")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as scratch:
            archive = Path(scratch) / "archive.zip"
            _log.info("downloading %s from %s", what, url)
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as response:
                with open(archive, "wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
            extracted = Path(scratch) / "extracted"
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(extracted)  # zipfile drops absolute paths and '..' from member names
            _merge_into(extracted, dest)
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


def _read_cached(folder: Path, key: str) -> Split | None:
    if not folder.is_dir():
        return None
    try:
        frames = [pd.read_parquet(folder / f"{name}.parquet") for name in _FRAMES]
    except (OSError, ValueError) as exc:  # unreadable: rebuild it
        warnings.warn(f"ignoring unreadable split cache {folder} ({_one_line(exc)})", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return _split_of(*frames, key)


def _write_cache(folder: Path, frames: Sequence[pd.DataFrame], meta: dict[str, Any]) -> None:
    """Write into a temporary folder, then rename it: a killed process never leaves half a cache."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for name, frame in zip(_FRAMES, frames, strict=True):
                frame.to_parquet(scratch / f"{name}.parquet", index=False)
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.rename(scratch, folder)
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
    fingerprint, the protocol version and ``min_interactions``.
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
