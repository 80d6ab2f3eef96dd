"""The dataset API, the split protocols and their on-disk cache, and file, ID and download helpers.

A dataset plugin reads raw interactions (``Dataset.load``) and names their content (``Dataset.fingerprint``);
:func:`prepare_split` turns them into a :class:`Split` by a :class:`SplitProtocol`: leave-last-out (the DHE
paper's and NCF's, the default) or global-temporal (one cut-off time for every user).
"""

from __future__ import annotations

import gzip
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

from embbench.bags import BagSource
from embbench.errors import ConfigError, DataNotFound, PluginError
from embbench.schemes import FeatureSpec

# Bump when the split protocol changes: it is part of every cache key, so old caches are never reused.
_PROTOCOL_VERSION = "leave-last-out/v1"
_GLOBAL_TEMPORAL_VERSION = "global-temporal/v1"
LEAVE_LAST_OUT = "leave-last-out"
GLOBAL_TEMPORAL = "global-temporal"
#: the split protocols, the default first
SPLIT_PROTOCOLS = (LEAVE_LAST_OUT, GLOBAL_TEMPORAL)
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

    def bag_features(self) -> dict[str, BagSource]:
        """Optional bag (multivalent) features by name: for each user or item, a list of IDs (e.g. an item's
        genres; :class:`embbench.bags.BagSource`). A suite's ``bags`` setting names those a cell embeds."""
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({params})"


@dataclass(frozen=True)
class SplitProtocol:
    """How :func:`prepare_split` holds interactions out.

    ``leave-last-out`` (the default): per user, the last interaction by time is the test item and the
    second-last the validation item. ``global-temporal``: one cut-off time for every user, so that nothing
    trained on is later than anything evaluated: the last ``test_fraction`` of the interactions by time are
    the test period, the ``validation_fraction`` before them the validation period (the fractions are used
    by global-temporal only).
    """

    kind: str = LEAVE_LAST_OUT
    validation_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_PROTOCOLS:
            raise ConfigError(f"unknown split '{self.kind}'; use one of {', '.join(SPLIT_PROTOCOLS)}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"{name} must be a number between 0 and 1 (exclusive), got {value!r}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"validation_fraction + test_fraction must be below 1 to leave interactions to train on, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )


@dataclass
class Split:
    """A split of interactions. Frames have int64 columns user, item, timestamp; train is sorted by user then
    time, validation and test by user.

    Under leave-last-out every user has exactly one validation and one test row. Under global-temporal a user
    has at most one of each (the first interaction of the period), and users or items first seen after the
    training period are kept: they are unseen IDs of the training frame.
    """

    train: pd.DataFrame
    validation: pd.DataFrame  # at most one row per user (leave-last-out: exactly one)
    test: pd.DataFrame  # at most one row per user (leave-last-out: exactly one)
    users: np.ndarray  # sorted unique raw user IDs of all kept users
    items: np.ndarray  # the catalogue: sorted unique raw item IDs anywhere in the kept data
    fingerprint: str  # the split's key: dataset content, protocol (version, parameters) and min_interactions
    protocol: SplitProtocol = SplitProtocol()

    @property
    def sampling_items(self) -> np.ndarray:
        """The items training may draw negatives from: the catalogue under leave-last-out; under global-temporal
        the items of the training frame (an item first seen after the cut-off is unknown while training)."""
        if self.protocol.kind == LEAVE_LAST_OUT:
            return self.items
        return np.unique(self.train["item"].to_numpy(dtype=np.int64))

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


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's uncompressed bytes (a ``.gz`` file is decompressed), so a file and its .gz agree."""
    digest = hashlib.sha256()
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def integer_ids(values: pd.Series, keep_integers: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 IDs of a column of raw IDs (no missing values), and the text each ID stands for.

    An integer column, and (with ``keep_integers``) a text column whose every value is a plain decimal integer
    within int64 (an optional '-', no '+', no leading zeros), keeps its values; the labels are then None.
    Any other column is text: its distinct values, sorted by code point, are numbered 0, 1, 2, ... and
    ``labels[i]`` is the text of ID ``i``, so the same set of values always gives the same IDs.
    """
    if keep_integers and pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(dtype=np.int64), None
    text = values.astype(str)
    if keep_integers and text.str.fullmatch(r"0|-?[1-9][0-9]{0,18}").all():
        try:
            return text.astype(np.int64).to_numpy(dtype=np.int64), None
        except (OverflowError, ValueError):  # 19 digits beyond int64: text after all
            pass
    codes, labels = pd.factorize(text, sort=True)
    return codes.astype(np.int64, copy=False), np.asarray(labels, dtype=object)


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


def _split_key(dataset_fingerprint: str, min_interactions: int, protocol: SplitProtocol) -> str:
    material: list[Any] = [dataset_fingerprint, _PROTOCOL_VERSION, min_interactions]
    if protocol.kind == GLOBAL_TEMPORAL:  # leave-last-out keys stay as they were before the protocols
        material = [dataset_fingerprint, _GLOBAL_TEMPORAL_VERSION, min_interactions,
                    protocol.validation_fraction, protocol.test_fraction]
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


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


def _by_user_then_time(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The interactions sorted by user then time, each (user, item) pair's earliest only; with each row's
    position within its user and its user's number of rows."""
    # lexsort is stable: within a user, equal timestamps keep file order.
    order = np.lexsort((timestamps, users))
    users, items, timestamps = users[order], items[order], timestamps[order]
    # Sorted by user then time, the first of each (user, item) pair is its earliest interaction.
    first = ~pd.DataFrame({"user": users, "item": items}).duplicated().to_numpy()
    users, items, timestamps = users[first], items[first], timestamps[first]

    n = len(users)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, n])
    position = np.arange(n) - np.repeat(starts, sizes)
    return users, items, timestamps, position, np.repeat(sizes, sizes)


def _frame(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, mask: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"user": users[mask], "item": items[mask], "timestamp": timestamps[mask]})


def _leave_last_out(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, min_interactions: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    users, items, timestamps, position, per_row_size = _by_user_then_time(users, items, timestamps)
    from_end = per_row_size - 1 - position  # 0: last interaction, 1: second-last
    keep = per_row_size >= min_interactions
    rows = (users, items, timestamps)
    train, validation, test = keep & (from_end >= 2), keep & (from_end == 1), keep & (from_end == 0)
    return _frame(*rows, train), _frame(*rows, validation), _frame(*rows, test)


def _cut_offs(timestamps: np.ndarray, protocol: SplitProtocol) -> tuple[int, int]:
    """(t_val, t_test): the times at the 1 - validation - test and 1 - test quantiles of the interactions
    (the earliest time at or after that share of them). Ties at a cut-off fall after it, so the training and
    validation shares are at most their nominal fractions."""
    ordered = np.sort(timestamps)
    n = len(ordered)
    train_share = 1.0 - protocol.validation_fraction - protocol.test_fraction
    # the small epsilon keeps exact shares exact: 20 * (1 - 0.2 - 0.2) is 11.999999999999998 in floating point
    at_val = min(int(np.floor(n * train_share + 1e-9)), n - 1)
    at_test = min(int(np.floor(n * (1.0 - protocol.test_fraction) + 1e-9)), n - 1)
    return int(ordered[at_val]), int(ordered[at_test])


def _global_temporal(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, min_interactions: int, protocol: SplitProtocol
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[int, int]]:
    """Train: interactions before t_val; validation: each user's first interaction in [t_val, t_test); test:
    each user's first at or after t_test. A user's later interactions in a held-out period are dropped."""
    users, items, timestamps, _, per_row_size = _by_user_then_time(users, items, timestamps)
    keep = per_row_size >= min_interactions
    users, items, timestamps = users[keep], items[keep], timestamps[keep]
    if len(users) == 0:
        empty = _frame(users, items, timestamps, np.zeros(0, dtype=bool))
        return empty, empty, empty, (0, 0)
    t_val, t_test = _cut_offs(timestamps, protocol)
    rows = (users, items, timestamps)

    def first_per_user(period: np.ndarray) -> np.ndarray:
        # rows are sorted by user then time: the first row of a user within the period is its first interaction
        first = np.zeros(len(users), dtype=bool)
        where = np.flatnonzero(period)
        if len(where):
            period_users = users[where]
            first[where[np.r_[True, period_users[1:] != period_users[:-1]]]] = True
        return first

    validation = first_per_user((timestamps >= t_val) & (timestamps < t_test))
    test = first_per_user(timestamps >= t_test)
    return _frame(*rows, timestamps < t_val), _frame(*rows, validation), _frame(*rows, test), (t_val, t_test)


def _split_of(
    train: pd.DataFrame, validation: pd.DataFrame, test: pd.DataFrame, key: str, protocol: SplitProtocol
) -> Split:
    frames = (train, validation, test)
    items = np.unique(np.concatenate([f["item"].to_numpy(dtype=np.int64) for f in frames]))
    if protocol.kind == LEAVE_LAST_OUT:  # every kept user has exactly one test row, in user order
        users = test["user"].to_numpy(dtype=np.int64).copy()
    else:
        users = np.unique(np.concatenate([f["user"].to_numpy(dtype=np.int64) for f in frames]))
    return Split(train, validation, test, users, items, key, protocol)


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


def _read_cached(folder: Path, key: str, protocol: SplitProtocol) -> Split | None:
    """The cached split, or None (with a one-line warning when a cache is there but invalid)."""
    if not folder.is_dir():
        return None
    try:
        frames = _cached_frames(folder)
    except _CacheInvalid as exc:
        warnings.warn(f"rebuilding the split cache {folder}: {exc}", stacklevel=3)
        return None
    return _split_of(*frames, key, protocol)


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


def prepare_split(
    dataset: Dataset, min_interactions: int = 3, use_cache: bool = True, protocol: SplitProtocol | None = None
) -> Split:
    """The split of ``dataset`` by ``protocol`` (default: leave-last-out), from the cache when its content was
    split so before.

    Every interaction counts as positive feedback. Duplicate (user, item) pairs keep their earliest
    interaction; users with fewer than ``min_interactions`` distinct items are dropped (under both protocols,
    so both see the same interactions). Leave-last-out: per user, sorted by timestamp (ties keep file order),
    the last interaction is the test item and the second-last the validation item. Global-temporal: see
    :class:`SplitProtocol` and ``_global_temporal``. Cached as parquet under ``cache_dir()/splits/<key>/``,
    keyed by the dataset's fingerprint, the protocol (version and parameters) and ``min_interactions``; a
    cache whose files do not match the checksums and schema its meta.json records is rebuilt, with a warning.
    """
    if isinstance(min_interactions, bool) or not isinstance(min_interactions, int) or min_interactions < 3:
        raise ConfigError(
            f"min_interactions must be an integer >= 3 (train, validation and test need one each), "
            f"got {min_interactions!r}"
        )
    protocol = SplitProtocol() if protocol is None else protocol
    dataset_fingerprint = dataset.fingerprint()
    key = _split_key(dataset_fingerprint, min_interactions, protocol)
    folder = cache_dir() / "splits" / key
    if use_cache:
        cached = _read_cached(folder, key, protocol)
        if cached is not None:
            return cached
    users, items, timestamps = _interactions(dataset)
    meta: dict[str, Any] = {
        "dataset": type(dataset).__name__,
        "dataset_fingerprint": dataset_fingerprint,
        "protocol": _PROTOCOL_VERSION,
        "min_interactions": min_interactions,
    }
    if protocol.kind == LEAVE_LAST_OUT:
        frames = _leave_last_out(users, items, timestamps, min_interactions)
    else:
        *frames, cut_offs = _global_temporal(users, items, timestamps, min_interactions, protocol)
        meta.update(protocol=_GLOBAL_TEMPORAL_VERSION, validation_fraction=protocol.validation_fraction,
                    test_fraction=protocol.test_fraction, validation_from=cut_offs[0], test_from=cut_offs[1])
    if len(frames[2]) == 0:
        raise DataNotFound(
            f"{dataset!r} has no user with at least {min_interactions} distinct items "
            f"({len(users):,} interactions read); check its files or parameters"
        )
    if protocol.kind == GLOBAL_TEMPORAL:
        _check_periods(dataset, frames, cut_offs, protocol)
    if use_cache:
        _write_cache(folder, frames, meta)
    return _split_of(*frames, key, protocol)


def _check_periods(
    dataset: Dataset, frames: Sequence[pd.DataFrame], cut_offs: tuple[int, int], protocol: SplitProtocol
) -> None:
    """A global-temporal split whose training or validation period is empty (timestamps tie at a cut-off) is
    one clear error."""
    t_val, t_test = cut_offs
    fractions = f"validation_fraction = {protocol.validation_fraction}, test_fraction = {protocol.test_fraction}"
    if len(frames[0]) == 0:
        raise ConfigError(
            f"{dataset!r}: the global-temporal split has nothing to train on: no interaction is earlier than the "
            f"validation cut-off {t_val} ({fractions}; timestamps tie there); lower the fractions"
        )
    if len(frames[1]) == 0:
        raise ConfigError(
            f"{dataset!r}: the global-temporal split has an empty validation period: both cut-offs fall on "
            f"timestamp {t_test} ({fractions}; timestamps tie there); raise validation_fraction"
        )
