"""``interactions``: your own file of (user, item, timestamp[, rating]) rows: CSV, TSV or Parquet, plain or .gz.

Columns are found by name (a header line in text files) through a mapping; string IDs become int64 by their
rank in sorted order; timestamps are numbers or ISO 8601 dates. See docs/datasets.md, "Your own interactions".
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embbench import BagSource, ConfigError, DataNotFound, Dataset, content_sha256, integer_ids, read_table

#: what a column can be mapped to, and the default column name of each
ROLES = ("user", "item", "timestamp", "rating")
REQUIRED = ("user", "item", "timestamp")
PARQUET_SUFFIXES = (".parquet", ".pq")
TAB_SUFFIXES = (".tsv", ".tab")
BAG_OWNERS = ("user", "item")
BAG_KEYS = ("column", "owner", "separator")
DEFAULT_BAG_SEPARATOR = "|"
_FORMAT_VERSION = "interactions/v1"
_ISO_EXAMPLE = "2014-02-28, 2014-02-28T13:45:00 or 2014-02-28T13:45:00+01:00"


def _closest(name: str, known: list[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


class Interactions(Dataset):
    """Interactions read from one file of yours; every row is one interaction."""

    summary = "your own interactions file (CSV, TSV or Parquet, plain or .gz): user, item, timestamp[, rating]"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        path: str = "",
        columns: dict[str, str] | None = None,
        separator: str | None = None,
        min_rating: float | None = None,
        bag_columns: dict[str, dict[str, str]] | None = None,
    ) -> None:
        given = {"path": path, "columns": columns, "separator": separator, "min_rating": min_rating,
                 "bag_columns": bag_columns}
        super().__init__(data_dir, **{key: value for key, value in given.items() if value is not None})
        if not isinstance(path, str) or not path.strip():
            raise ValueError(
                "parameter 'path' is required: the interactions file, absolute or relative to the data folder "
                "(e.g. params = { path = \"my-shop/interactions.csv\" })"
            )
        self.raw_path = path
        self.columns = self._column_mapping(columns or {})
        self.rating_required = "rating" in (columns or {})
        self.parquet = self._suffix(path) in PARQUET_SUFFIXES
        if separator is not None and (not isinstance(separator, str) or separator == ""):
            raise ValueError(f"separator must be a non-empty string, got {separator!r}")
        if separator is not None and self.parquet:
            raise ValueError(f"separator applies to CSV and TSV files, not to the Parquet file '{path}'; remove it")
        self.separator = separator if separator is not None else self._default_separator(path)
        if min_rating is not None and (isinstance(min_rating, bool) or not isinstance(min_rating, (int, float))
                                       or not math.isfinite(min_rating)):
            raise ValueError(f"min_rating must be a finite number, got {min_rating!r}")
        self.min_rating = None if min_rating is None else float(min_rating)
        self.bag_columns = self._bag_mapping(bag_columns or {})
        self.id_labels: dict[str, np.ndarray | None] = {}
        self._fingerprint: str | None = None
        self._frame: pd.DataFrame | None = None

    # -- parameters ---------------------------------------------------------------------------------------------
    @staticmethod
    def _suffix(path: str) -> str:
        name = Path(path).name.lower()
        name = name[: -len(".gz")] if name.endswith(".gz") else name
        return Path(name).suffix

    @classmethod
    def _default_separator(cls, path: str) -> str:
        return "\t" if cls._suffix(path) in TAB_SUFFIXES else ","

    @staticmethod
    def _column_mapping(columns: dict[str, str]) -> dict[str, str]:
        for key, value in columns.items():
            if key not in ROLES:
                raise ValueError(
                    f"columns has no key '{key}'{_closest(key, list(ROLES))}; map {', '.join(ROLES)} to your "
                    "file's column names (bag columns go in bag_columns)"
                )
            if not isinstance(value, str) or not value:
                raise ValueError(f"columns.{key} must be a column name (a non-empty string), got {value!r}")
        mapping = {role: columns.get(role, role) for role in ROLES}
        named: dict[str, str] = {}
        for role, column in mapping.items():
            if column in named:
                raise ValueError(f"columns maps both {named[column]} and {role} to the column '{column}'")
            named[column] = role
        return mapping

    def _bag_mapping(self, bags: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        """Each bag feature's column, owner and separator, checked; a bag column is no interaction column."""
        mapping = {}
        for name, spec in bags.items():
            where = f"bag_columns.{name}"
            if not isinstance(spec, dict):
                raise ValueError(f"{where} must be a table like {{ column = \"genres\", owner = \"item\" }}, "
                                 f"got {spec!r}")
            for key in spec:
                if key not in BAG_KEYS:
                    raise ValueError(f"{where} has no key '{key}'{_closest(key, list(BAG_KEYS))}; "
                                     f"known keys: {', '.join(BAG_KEYS)}")
            column, owner = spec.get("column"), spec.get("owner", "item")
            separator = spec.get("separator", DEFAULT_BAG_SEPARATOR)
            if not isinstance(column, str) or not column:
                raise ValueError(f"{where}.column must name the file's column holding the bags, got {column!r}")
            if owner not in BAG_OWNERS:
                raise ValueError(f"{where}.owner must be one of {', '.join(BAG_OWNERS)}, got {owner!r}")
            if not isinstance(separator, str) or not separator:
                raise ValueError(f"{where}.separator must be a non-empty string, got {separator!r}")
            if column in self.columns.values():
                raise ValueError(f"{where}.column '{column}' is already the interactions' "
                                 f"{next(r for r, c in self.columns.items() if c == column)} column")
            mapping[name] = {"column": column, "owner": owner, "separator": separator}
        return mapping

    # -- the file -----------------------------------------------------------------------------------------------
    def path(self) -> Path:
        """The file: ``path`` as given when absolute, else inside the data folder; ``path.gz`` when only it exists."""
        given = Path(self.raw_path).expanduser()
        resolved = given if given.is_absolute() else self.data_dir / given
        for candidate in (resolved, resolved.with_name(resolved.name + ".gz")):
            try:
                if candidate.is_file():
                    return candidate
            except (OSError, ValueError) as exc:  # a name too long, a NUL byte
                raise DataNotFound(f"interactions file {resolved} cannot be looked up ({_one_line(exc)}); "
                                   "check the dataset's 'path'") from None
        relative = "" if given.is_absolute() else (
            f", the path '{self.raw_path}' taken inside the data folder {self.data_dir} (set --data-dir or "
            "$EMBBENCH_DATA_DIR, or give an absolute path)"
        )
        raise DataNotFound(f"interactions file {resolved} not found{relative}; check the dataset's 'path'")

    def _unreadable(self, path: Path, reason: object) -> DataNotFound:
        kind = "Parquet" if self.parquet else "delimited text"
        return DataNotFound(f"could not read {path} as {kind} ({_one_line(reason)}); check the file and its 'path'")

    def _parquet_source(self, path: Path) -> Any:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                return io.BytesIO(stream.read())
        return path

    def _file_columns(self, path: Path) -> list[str]:
        """The column names the file has (its header line, or its Parquet schema)."""
        if self.parquet:
            try:
                import pyarrow.parquet as parquet
            except ImportError:
                raise ConfigError(
                    f"reading the Parquet file {path} needs the package pyarrow, which is not installed; "
                    "pip install pyarrow (or give the interactions as CSV)"
                ) from None
            return list(parquet.read_schema(self._parquet_source(path)).names)
        return [str(column) for column in self._read_text(path, nrows=0).columns]

    def _read_text(self, path: Path, **kwargs: Any) -> pd.DataFrame:
        separator = self.separator
        if len(separator) > 1:  # pandas' C parser takes one character; the Python one takes a pattern
            kwargs.update(sep=re.escape(separator), engine="python")
        else:
            kwargs.update(sep=separator)
        return read_table(path, **kwargs)

    def _read(self, path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
        """The mapped columns of the file (text files: every value as text), and the roles it has by column."""
        try:
            available = self._file_columns(path)
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None
        if not available:
            raise DataNotFound(f"{path} is empty: it has no header line naming its columns")
        roles = {role: column for role, column in self.columns.items()
                 if role in REQUIRED or self.rating_required or column in available}
        wanted = {**roles, **{f"bag:{name}": spec["column"] for name, spec in self.bag_columns.items()}}
        for role, column in wanted.items():
            if column in available:
                continue
            shown = ", ".join(available[:30]) + (", ..." if len(available) > 30 else "")
            if role.startswith("bag:"):
                what, fix = f"the bag feature '{role[4:]}'", f"set bag_columns.{role[4:]}.column"
            else:
                what, fix = f"the {role}", f"map yours with columns = {{ {role} = \"...\" }}"
            raise ConfigError(
                f"{path} has no column '{column}' for {what}{_closest(column, available)}; its columns: {shown}; {fix}"
            )
        used = list(dict.fromkeys(wanted.values()))
        try:
            if self.parquet:
                frame = pd.read_parquet(self._parquet_source(path), columns=used)
            else:
                frame = self._read_text(path, usecols=used, dtype=str, na_filter=False)
        except ImportError as exc:
            raise ConfigError(f"reading the Parquet file {path} needs pyarrow ({_one_line(exc)}); "
                              "pip install pyarrow") from None
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None
        return frame, roles

    # -- values -------------------------------------------------------------------------------------------------
    def _row(self, index: int) -> str:
        """Where data row ``index`` (0-based) is: a text file's line (after the header), a Parquet file's row."""
        return f"row {index + 1}" if self.parquet else f"line {index + 2}"

    def _missing(self, values: pd.Series) -> np.ndarray:
        missing = values.isna().to_numpy()
        if not pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_datetime64_any_dtype(values.dtype):
            missing = missing | (values.astype(str).str.strip() == "").to_numpy()
        return missing

    def _require_values(self, values: pd.Series, role: str, path: Path) -> None:
        missing = self._missing(values)
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            raise DataNotFound(
                f"{path}: column '{values.name}' ({role}) is empty in {int(missing.sum()):,} rows, first at "
                f"{self._row(first)}; every interaction needs a {role}"
            )

    def _timestamps(self, values: pd.Series, path: Path) -> np.ndarray:
        """int64 timestamps: numbers as they are (a fractional part dropped, rounding down), dates and ISO 8601
        date strings as Unix seconds (UTC; a date without an offset is taken as UTC)."""
        if pd.api.types.is_datetime64_any_dtype(values.dtype):
            return self._unix_seconds(values)
        if pd.api.types.is_bool_dtype(values.dtype):
            raise DataNotFound(f"{path}: column '{values.name}' (timestamp) holds true/false, not times")
        numbers = pd.to_numeric(values, errors="coerce") if not pd.api.types.is_numeric_dtype(values.dtype) else values
        numbers = numbers.astype(np.float64)
        if np.isfinite(numbers.to_numpy()).all():
            if pd.api.types.is_integer_dtype(values.dtype):
                return values.to_numpy(dtype=np.int64)
            text = values.astype(str).str.strip()
            if text.str.fullmatch(r"-?[0-9]+").all():  # integers in text: exact, even beyond 2^53
                return text.astype(np.int64).to_numpy()
            return np.floor(numbers.to_numpy()).astype(np.int64)
        dates = pd.to_datetime(values.astype(str).str.strip(), format="ISO8601", utc=True, errors="coerce")
        bad = dates.isna().to_numpy()
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataNotFound(
                f"{path}: column '{values.name}' (timestamp) holds {values.iloc[first]!r} at {self._row(first)} "
                f"({int(bad.sum()):,} such rows), neither a number nor an ISO 8601 date; timestamps must be "
                f"numbers (e.g. Unix seconds) or dates like {_ISO_EXAMPLE}"
            )
        return self._unix_seconds(dates)

    @staticmethod
    def _unix_seconds(dates: pd.Series) -> np.ndarray:
        if dates.dt.tz is None:
            dates = dates.dt.tz_localize("UTC")
        return ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)

    def _ratings(self, values: pd.Series, path: Path) -> np.ndarray:
        numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
        bad = ~np.isfinite(numbers.to_numpy())
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataNotFound(
                f"{path}: column '{values.name}' (rating) holds {values.iloc[first]!r} at {self._row(first)} "
                f"({int(bad.sum()):,} such rows), not a number"
            )
        return numbers.to_numpy()

    def _ids(self, values: pd.Series, role: str, path: Path) -> np.ndarray:
        self._require_values(values, role, path)
        if not pd.api.types.is_integer_dtype(values.dtype):
            values = values.astype(str).str.strip()
        ids, labels = integer_ids(values)
        self.id_labels[role] = labels
        return ids

    # -- the Dataset API ----------------------------------------------------------------------------------------
    def _all_rows(self) -> pd.DataFrame:
        """Every row of the file as int64 user, item, timestamp (and float64 rating; and the bag columns as
        read), before ``min_rating``."""
        if self._frame is not None:
            return self._frame
        path = self.path()
        raw, roles = self._read(path)
        if len(raw) == 0:
            raise DataNotFound(f"{path} holds no rows under its header; nothing to split")
        frame = pd.DataFrame({
            "user": self._ids(raw[roles["user"]], "user", path),
            "item": self._ids(raw[roles["item"]], "item", path),
        })
        timestamps = raw[roles["timestamp"]]
        self._require_values(timestamps, "timestamp", path)
        frame["timestamp"] = self._timestamps(timestamps, path)
        if "rating" in roles:
            frame["rating"] = self._ratings(raw[roles["rating"]], path)
        for name, spec in self.bag_columns.items():
            frame[f"bag:{name}"] = raw[spec["column"]].to_numpy()
        self._frame = frame
        return frame

    def load(self) -> pd.DataFrame:
        """user, item, timestamp (int64) and rating (float64, when the file has one), one row per file row in
        file order (duplicates included: the split keeps each (user, item) pair's earliest), after ``min_rating``."""
        frame = self._all_rows()
        frame = frame[[column for column in frame.columns if not column.startswith("bag:")]]
        if self.min_rating is None:
            return frame.reset_index(drop=True)
        if "rating" not in frame.columns:
            raise ConfigError(
                f"min_rating = {self.min_rating:g} needs ratings, and {self.path()} has no column "
                f"'{self.columns['rating']}'; map yours with columns = {{ rating = \"...\" }} or remove min_rating"
            )
        kept = frame[frame["rating"].to_numpy() >= self.min_rating].reset_index(drop=True)
        if len(kept) == 0:
            ratings = frame["rating"]
            raise DataNotFound(
                f"no interaction of {self.path()} has a rating >= {self.min_rating:g} ({len(frame):,} rows, ratings "
                f"{ratings.min():g} to {ratings.max():g}); lower min_rating"
            )
        return kept

    def fingerprint(self) -> str:
        """sha256 of the file's (uncompressed) content and of every parameter that changes what ``load`` gives."""
        if self._fingerprint is None:
            path = self.path()
            try:
                content = content_sha256(path)
            except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
                raise self._unreadable(path, exc) from None
            reading = {"format": _FORMAT_VERSION, "parquet": self.parquet, "columns": self.columns,
                       "rating_required": self.rating_required, "separator": self.separator,
                       "min_rating": self.min_rating}
            material = json.dumps([content, reading], sort_keys=True)
            self._fingerprint = hashlib.sha256(material.encode()).hexdigest()
        return self._fingerprint

    def bag_features(self) -> dict[str, BagSource]:
        """Each ``bag_columns`` entry as a bag feature of its owner: a cell's separated values are the owner's
        bag IDs (text numbered in sorted order like IDs); every row of an owner adds to its bag."""
        if not self.bag_columns:
            return {}
        frame = self._all_rows()
        sources = {}
        for name, spec in self.bag_columns.items():
            cells = pd.Series(frame[f"bag:{name}"].to_numpy(), dtype=object).where(
                lambda column: column.notna(), "").astype(str)
            tokens = cells.str.split(spec["separator"], regex=False).explode().str.strip()
            tokens = tokens[tokens != ""]
            if len(tokens) == 0:
                raise DataNotFound(f"{self.path()}: bag column '{spec['column']}' ({name}) holds no value")
            bag_ids, _ = integer_ids(tokens)
            owners = frame[spec["owner"]].to_numpy(dtype=np.int64)[tokens.index.to_numpy()]
            sources[name] = BagSource.from_pairs(spec["owner"], owners, bag_ids)
        return sources
