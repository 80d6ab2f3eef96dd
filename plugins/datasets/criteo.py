"""Criteo Display Advertising Challenge click logs: the official Kaggle ``train.txt`` or a train/dev/test sample.

Each row is ``label, I1..I13, C1..C26``, tab-separated, no header, an empty field is a missing value. The 13
integer features become dense features log(1 + max(x, 0)) (missing: 0), float32; each of the 26 categorical
values (8 hex characters, or empty) becomes the int64 :func:`embbench.hash_strings` of its string, field
by field; the empty string is a value like any other.

Where the files are found, in the data folder, first match wins:

* ``criteo/train.txt`` or ``criteo-kaggle/train.txt`` (plain or ``.gz``): the official Kaggle file, 45,840,617
  rows over 7 days in time order. It is split by row order as DLRM does: the last ``n // 7`` rows (the
  seventh day) are held out, their first half (the odd row to it) is the validation split and the second
  half the test split (DLRM's code takes the halves the other way round; here the test rows are the
  latest); the first ``n - n // 7`` rows are training.
* ``criteo-sample/`` or ``criteo/`` holding ``train.csv``, ``dev.csv`` and ``test.csv`` (the same row format;
  tab-separated despite the name): used as the train, validation and test splits as they are.

``max_rows`` reads only the first rows of the training file (``train.txt``, split afterwards the same way, or
``train.csv``). A first pass over the bytes computes the fingerprint and counts the rows; the rows are then
parsed in chunks straight into arrays allocated once (the three splits of ``train.txt`` are views of one
array), so the peak memory is the result plus one chunk. Criteo's terms ask for manual acceptance, so nothing
is downloaded.

The helpers here (:func:`scan`, :func:`fill_frame`, :func:`hash_values`) also serve the Avazu reader.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from embbench import CTRData, CTRDataset, CTRFrame, DataNotFound, find_file, read_table

# Bump when the arrays read from the same files change: it is part of the fingerprint.
READER_VERSION = "criteo/v1"

CHUNK_ROWS = 1 << 16
_HASH_CHUNK_BYTES = 1 << 20
_NEWLINE = 10

DENSE = tuple(f"I{i}" for i in range(1, 14))
FIELDS = tuple(f"C{i}" for i in range(1, 27))
_COLUMNS = ("label", *DENSE, *FIELDS)
_OFFICIAL_FOLDERS = ("criteo", "criteo-kaggle")
_SAMPLE_FOLDERS = ("criteo-sample", "criteo")
_SAMPLE_FILES = ("train.csv", "dev.csv", "test.csv")
_MIN_OFFICIAL_ROWS = 14  # the held-out seventh, split in half, needs two rows
_DOCS = "docs/datasets-ctr.md"
_OFFICIAL_URL = "https://ailab.criteo.com/ressources/"

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # sparse int64 [n, F], dense float32 [n, D], labels float32 [n]


def one_line(text: object) -> str:
    return " ".join(str(text).split()) or type(text).__name__


def check_max_rows(value: object, low: int) -> None:
    """``max_rows`` is None (every row) or an integer >= ``low``; ValueError otherwise."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"max_rows must be None (every row) or an integer >= {low}, got {value!r}")


def scan(path: Path, max_lines: int | None = None) -> tuple[str, int]:
    """sha256 of the uncompressed bytes (a file and its .gz agree) and their number of lines; with ``max_lines``,
    of the first ``max_lines`` lines only. A last line without a newline counts."""
    digest = hashlib.sha256()
    opener = gzip.open if path.name.endswith(".gz") else open
    lines, last = 0, b"\n"
    with opener(path, "rb") as stream:
        for block in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            ends = block.count(b"\n")
            if max_lines is not None and lines + ends >= max_lines:
                cut = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == _NEWLINE)[max_lines - lines - 1] + 1
                digest.update(block[:cut])
                return digest.hexdigest(), max_lines
            digest.update(block)
            lines, last = lines + ends, block[-1:]
    return digest.hexdigest(), lines + (last != b"\n")


def hash_values(values: np.ndarray | pd.Series) -> np.ndarray:
    """int64 IDs of string values, equal to :func:`embbench.hash_strings` (the same fixed-key SipHash).

    ``hash_strings`` first factorises the values, which is several times slower than hashing them directly on
    columns of mostly distinct strings (Criteo's largest fields); the IDs are the same either way.
    """
    values = np.array(values, dtype=object)
    missing = pd.isna(values)
    if missing.any():  # a short row's absent fields: missing, the empty string
        values[missing] = ""
    return pd.util.hash_array(values, categorize=False).view(np.int64)


def fill_frame(chunks: Iterable[Chunk], rows: int, widths: tuple[int, int], path: Path) -> CTRFrame:
    """One frame of at most ``rows`` rows (the file's line count), written chunk by chunk into arrays allocated
    once: the peak memory is the result plus one chunk. Fewer rows (blank lines) give views of the first ones."""
    frame = CTRFrame(
        np.empty((rows, widths[0]), dtype=np.int64),
        np.empty((rows, widths[1]), dtype=np.float32),
        np.empty(rows, dtype=np.float32),
    )
    filled = 0
    for sparse, dense, labels in chunks:
        end = filled + len(labels)
        if end > rows:
            raise DataNotFound(f"could not read {path}: it parses to more rows than its {rows} lines ({_DOCS})")
        frame.sparse[filled:end], frame.dense[filled:end], frame.labels[filled:end] = sparse, dense, labels
        filled = end
    if filled == 0:
        raise DataNotFound(f"{path} holds no rows; replace it (see {_DOCS})")
    return frame if filled == rows else rows_of(frame, 0, filled)


def rows_of(frame: CTRFrame, start: int, stop: int) -> CTRFrame:
    """Rows start..stop-1 of a frame, as views (no copy)."""
    return CTRFrame(frame.sparse[start:stop], frame.dense[start:stop], frame.labels[start:stop])


def labels_of(values: pd.Series, path: Path) -> np.ndarray:
    """float32 0/1 labels; DataNotFound naming the file when one is missing or not 0/1."""
    labels = values.to_numpy(dtype=np.float64)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DataNotFound(f"could not read {path}: a label is missing or not 0/1; check the file (see {_DOCS})")
    return labels.astype(np.float32)


def dense_transform(values: np.ndarray) -> np.ndarray:
    """log(1 + max(x, 0)) as float32, missing (NaN) -> 0."""
    values = np.where(np.isnan(values), 0.0, values)
    return np.log1p(np.maximum(values, 0.0)).astype(np.float32)


class Criteo(CTRDataset):
    """Criteo Display Advertising Challenge: 13 dense and 26 categorical fields, a click label (see module doc)."""

    summary = "Criteo Display Advertising Challenge clicks (Kaggle train.txt split by time like DLRM, or a sample)"

    def __init__(self, max_rows: int | None = None, data_dir: str | Path | None = None) -> None:
        check_max_rows(max_rows, _MIN_OFFICIAL_ROWS)
        super().__init__(data_dir, max_rows=None if max_rows is None else int(max_rows))
        self.max_rows: int | None = self.params["max_rows"]
        self._files: tuple[str, tuple[Path, ...]] | None = None
        self._scans: list[tuple[str, int]] | None = None
        self._fingerprint: str | None = None

    def files(self) -> tuple[str, tuple[Path, ...]]:
        """The layout found ("kaggle": one train.txt; "sample": train, dev, test) and its files."""
        if self._files is None:
            for folder in dict.fromkeys((*_OFFICIAL_FOLDERS, *_SAMPLE_FOLDERS)):
                if folder in _OFFICIAL_FOLDERS:
                    official = find_file(self.data_dir, [folder], ["train.txt"])
                    if official is not None:
                        self._files = ("kaggle", (official,))
                        break
                if folder in _SAMPLE_FOLDERS:
                    sample = [find_file(self.data_dir, [folder], [name]) for name in _SAMPLE_FILES]
                    if all(path is not None for path in sample):
                        self._files = ("sample", tuple(sample))  # type: ignore[arg-type]
                        break
            else:
                raise DataNotFound(
                    f"no Criteo data in {self.data_dir}: put the Kaggle train.txt (plain or .gz) in "
                    f"{self.data_dir / 'criteo'}/, or a sample's train.csv, dev.csv and test.csv in "
                    f"{self.data_dir / 'criteo-sample'}/; the terms need accepting by hand at {_OFFICIAL_URL} "
                    f"or kaggle.com/c/criteo-display-ad-challenge (see {_DOCS})"
                )
        return self._files

    def scans(self) -> list[tuple[str, int]]:
        """Each file's (sha256, line count), the training file's up to ``max_rows`` lines; computed once."""
        if self._scans is None:
            paths = self.files()[1]
            self._scans = [self._scan(path, self.max_rows if index == 0 else None) for index, path in enumerate(paths)]
        return self._scans

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            layout, paths = self.files()
            contents = {path.name.removesuffix(".gz"): sha for path, (sha, _) in zip(paths, self.scans(), strict=True)}
            material = {"reader": READER_VERSION, "layout": layout, "params": self.params, "files": contents}
            self._fingerprint = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def load_ctr(self) -> CTRData:
        layout, paths = self.files()
        frames = [
            fill_frame(self._chunks(path, lines), lines, (len(FIELDS), len(DENSE)), path)
            for path, (_, lines) in zip(paths, self.scans(), strict=True)
        ]
        if layout == "kaggle":
            rows = len(frames[0])
            if rows < _MIN_OFFICIAL_ROWS:
                raise DataNotFound(
                    f"{paths[0]} holds {rows} rows; the time split needs at least {_MIN_OFFICIAL_ROWS} (see {_DOCS})"
                )
            held_out = rows // 7  # DLRM: the seventh day
            train_end, validation_end = rows - held_out, rows - held_out // 2
            frames = [rows_of(frames[0], *bounds) for bounds in ((0, train_end), (train_end, validation_end),
                                                                 (validation_end, rows))]
        return CTRData(FIELDS, DENSE, *frames, self.fingerprint())

    def _scan(self, path: Path, max_lines: int | None) -> tuple[str, int]:
        try:
            return scan(path, max_lines)
        except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
            raise self._unreadable(path, exc) from None

    def _chunks(self, path: Path, max_rows: int) -> Iterator[Chunk]:
        """The file's first ``max_rows`` rows as arrays, CHUNK_ROWS at a time."""
        try:
            reader = read_table(
                path,
                sep="\t",
                header=None,
                names=list(_COLUMNS),
                dtype={"label": np.float64, **dict.fromkeys(DENSE, np.float64), **dict.fromkeys(FIELDS, object)},
                keep_default_na=False,
                na_values=dict.fromkeys(("label", *DENSE), [""]),
                quoting=csv.QUOTE_NONE,
                chunksize=CHUNK_ROWS,
                nrows=max_rows,
            )
            with reader:
                for frame in reader:
                    yield self._arrays(frame, path)
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None

    @staticmethod
    def _arrays(frame: pd.DataFrame, path: Path) -> Chunk:
        sparse = np.empty((len(frame), len(FIELDS)), dtype=np.int64)
        for index, name in enumerate(FIELDS):
            sparse[:, index] = hash_values(frame[name])
        dense = dense_transform(frame[list(DENSE)].to_numpy(dtype=np.float64))
        return sparse, dense, labels_of(frame["label"], path)

    @staticmethod
    def _unreadable(path: Path, reason: Exception) -> DataNotFound:
        return DataNotFound(
            f"could not read {path} as Criteo rows (label, I1..I13, C1..C26, tab-separated) ({one_line(reason)}); "
            f"replace it with the official file (see {_DOCS})"
        )
