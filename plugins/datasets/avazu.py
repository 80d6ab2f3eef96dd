"""Avazu click-through logs (Kaggle "Click-Through Rate Prediction", 2014): the official train file or a sample.

Each row is the CSV ``id,click,hour,C1,banner_pos,site_id,...,C21`` (24 columns). Every column but ``id`` and
``click`` is a categorical field, the int64 :func:`embbench.hash_strings` of its string value, field by
field; ``hour`` (YYMMDDHH) becomes two fields, ``hour_of_day`` (the string "00".."23") and ``weekday`` (the
date's English day name), so there are 23 fields (21 columns plus these two) and no dense features.

Where the files are found, in the data folder, first match wins:

* ``avazu/train.gz`` (the Kaggle download), ``avazu/train.csv`` or ``avazu/train.csv.gz``, without a
  ``dev.csv`` and ``test.csv`` beside it: the official file, 40,428,967 rows over 10 days (2014-10-21 to 30)
  in time order. Split by time: the rows of the last day are held out, the first half of them (the odd row
  to it) by row order is the validation split and the second half the test split; every other row is
  training.
* ``avazu/`` or ``avazu-sample/`` holding ``train.csv``, ``dev.csv`` and ``test.csv``: used as the train,
  validation and test splits as they are. A file whose first line starts with ``id,`` has a header.

``max_rows`` reads only the first rows of the training file (the official file is then split by the last
day among the rows read). As for Criteo, a first pass computes the fingerprint and counts the rows, which are
then parsed in chunks into arrays allocated once; in a file in time order the three splits are views of them,
so the peak memory is the result plus one chunk. Nothing is downloaded: the Kaggle rules must be accepted by
hand.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from embbench_plugins.datasets.criteo import (
    CHUNK_ROWS,
    Chunk,
    check_max_rows,
    fill_frame,
    hash_values,
    labels_of,
    one_line,
    rows_of,
    scan,
)

from embbench import CTRData, CTRDataset, CTRFrame, DataNotFound, find_file, hash_strings, read_table

# Bump when the arrays read from the same files change: it is part of the fingerprint.
READER_VERSION = "avazu/v1"

COLUMNS = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
_CATEGORICAL = COLUMNS[3:]
FIELDS = ("hour_of_day", "weekday", *_CATEGORICAL)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_HOUR_IDS = hash_strings([f"{hour:02d}" for hour in range(24)])
_WEEKDAY_IDS = hash_strings(list(_WEEKDAYS))
_FOLDERS = ("avazu", "avazu-sample")
_OFFICIAL_FOLDER = "avazu"
_SAMPLE_FILES = ("train.csv", "dev.csv", "test.csv")
_DOCS = "docs/datasets-ctr.md"
_OFFICIAL_URL = "https://www.kaggle.com/c/avazu-ctr-prediction"


def weekdays(yymmdd: np.ndarray) -> np.ndarray:
    """Day of the week (Monday 0 .. Sunday 6) of dates 20YY-MM-DD given as integers YYMMDD."""
    years = (yymmdd // 10_000 + 2000 - 1970).astype("datetime64[Y]")
    months = years.astype("datetime64[M]") + (yymmdd // 100 % 100 - 1).astype("timedelta64[M]")
    days = months.astype("datetime64[D]") + (yymmdd % 100 - 1).astype("timedelta64[D]")
    return (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday


def _has_header(path: Path) -> bool:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        return stream.readline().startswith(b"id,")


class Avazu(CTRDataset):
    """Avazu CTR: 23 categorical fields (hour split into hour of day and weekday), a click label."""

    summary = "Avazu CTR (Kaggle 2014): 23 categorical fields; official train file split by day, or a sample"

    def __init__(self, max_rows: int | None = None, data_dir: str | Path | None = None) -> None:
        check_max_rows(max_rows, 2)
        super().__init__(data_dir, max_rows=None if max_rows is None else int(max_rows))
        self.max_rows: int | None = self.params["max_rows"]
        self._files: tuple[str, tuple[Path, ...]] | None = None
        self._scans: list[tuple[str, int, bool]] | None = None
        self._fingerprint: str | None = None

    def files(self) -> tuple[str, tuple[Path, ...]]:
        """The layout found ("kaggle": one train file split by day; "sample": train, dev, test) and its files."""
        if self._files is None:
            for folder in _FOLDERS:
                sample = [find_file(self.data_dir, [folder], [name]) for name in _SAMPLE_FILES]
                if all(path is not None for path in sample):
                    self._files = ("sample", tuple(sample))  # type: ignore[arg-type]
                    break
                if folder == _OFFICIAL_FOLDER:
                    official = find_file(self.data_dir, [folder], ["train.csv", "train"])
                    if official is not None:
                        self._files = ("kaggle", (official,))
                        break
            else:
                raise DataNotFound(
                    f"no Avazu data in {self.data_dir}: put the Kaggle train.gz (or train.csv) in "
                    f"{self.data_dir / 'avazu'}/, or a sample's train.csv, dev.csv and test.csv in "
                    f"{self.data_dir / 'avazu-sample'}/; the competition rules need accepting by hand at "
                    f"{_OFFICIAL_URL} (see {_DOCS})"
                )
        return self._files

    def scans(self) -> list[tuple[str, int, bool]]:
        """Each file's (sha256, data rows, has a header), the training file's up to ``max_rows`` rows; computed
        once."""
        if self._scans is None:
            self._scans = []
            for index, path in enumerate(self.files()[1]):
                try:
                    header = _has_header(path)
                    limit = self.max_rows + header if index == 0 and self.max_rows is not None else None
                    sha, lines = scan(path, limit)
                except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
                    raise self._unreadable(path, exc) from None
                self._scans.append((sha, lines - header, header))
        return self._scans

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            layout, paths = self.files()
            shas = [sha for sha, _, _ in self.scans()]
            contents = {path.name.removesuffix(".gz"): sha for path, sha in zip(paths, shas, strict=True)}
            material = {"reader": READER_VERSION, "layout": layout, "params": self.params, "files": contents}
            self._fingerprint = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def load_ctr(self) -> CTRData:
        layout, paths = self.files()
        days: list[np.ndarray] = []
        frames = [
            fill_frame(self._chunks(path, rows, header, days), rows, (len(FIELDS), 0), path)
            for path, (_, rows, header) in zip(paths, self.scans(), strict=True)
        ]
        if layout == "kaggle":
            frames = self._split_by_day(frames[0], np.concatenate(days), paths[0])
        return CTRData(FIELDS, (), *frames, self.fingerprint())

    @staticmethod
    def _split_by_day(frame: CTRFrame, day: np.ndarray, path: Path) -> list[CTRFrame]:
        """The last day's rows, first half (the odd row to it) validation, second half test; the rest train.

        A file in time order (the official one) holds the last day at its end: the splits are then views."""
        rows = len(day)
        held_out = np.flatnonzero(day == day.max())
        if len(held_out) == rows or len(held_out) < 2:
            where = f"all of them on 20{day[0]:06d}" if len(held_out) == rows else f"one on 20{day.max():06d}"
            raise DataNotFound(
                f"{path} gives {rows} rows, {where}; the time split needs rows of two days or more, the last day "
                f"twice at least (raise max_rows; see {_DOCS})"
            )
        middle = held_out[len(held_out) - len(held_out) // 2]
        if held_out[0] == rows - len(held_out):  # contiguous at the end
            bounds = ((0, held_out[0]), (held_out[0], middle), (middle, rows))
            return [rows_of(frame, start, stop) for start, stop in bounds]
        split = np.zeros(rows, dtype=np.int8)
        split[held_out] = 2
        split[held_out[: len(held_out) - len(held_out) // 2]] = 1
        return [CTRFrame(frame.sparse[split == which], frame.dense[split == which], frame.labels[split == which])
                for which in range(3)]

    def _chunks(self, path: Path, max_rows: int, header: bool, days: list[np.ndarray]) -> Iterator[Chunk]:
        """The file's first ``max_rows`` rows as arrays, CHUNK_ROWS at a time; each row's date (YYMMDD) is
        appended to ``days``."""
        try:
            reader = read_table(
                path,
                header=None,
                skiprows=int(header),
                names=list(COLUMNS),
                usecols=list(COLUMNS[1:]),
                dtype={"click": np.float64, "hour": np.int64, **dict.fromkeys(_CATEGORICAL, object)},
                keep_default_na=False,
                na_values={"click": [""]},
                quoting=csv.QUOTE_NONE,
                chunksize=CHUNK_ROWS,
                nrows=max_rows,
            )
            with reader:
                for frame in reader:
                    yield self._arrays(frame, path, days)
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None

    @staticmethod
    def _arrays(frame: pd.DataFrame, path: Path, days: list[np.ndarray]) -> Chunk:
        hours, inverse = np.unique(frame["hour"].to_numpy(dtype=np.int64), return_inverse=True)
        date, hour = hours // 100, hours % 100
        month, day = date // 100 % 100, date % 100
        if ((hour > 23) | (month < 1) | (month > 12) | (day < 1) | (day > 31) | (hours < 0)).any():
            raise DataNotFound(f"could not read {path}: an hour is not YYMMDDHH; check the file (see {_DOCS})")
        sparse = np.empty((len(frame), len(FIELDS)), dtype=np.int64)
        sparse[:, 0] = _HOUR_IDS[hour][inverse]
        sparse[:, 1] = _WEEKDAY_IDS[weekdays(date)][inverse]
        for index, name in enumerate(_CATEGORICAL, start=2):
            sparse[:, index] = hash_values(frame[name])
        days.append(date.astype(np.int32)[inverse])
        return sparse, np.zeros((len(frame), 0), dtype=np.float32), labels_of(frame["click"], path)

    @staticmethod
    def _unreadable(path: Path, reason: Exception) -> DataNotFound:
        return DataNotFound(
            f"could not read {path} as Avazu rows (id,click,hour,C1,...,C21; 24 columns) ({one_line(reason)}); "
            f"replace it with the official file (see {_DOCS})"
        )
