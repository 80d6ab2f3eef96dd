"""``amazon-reviews``: the Amazon review dumps of McAuley's lab (UCSD): a category's reviews as JSON lines (the
2014 and 2018 releases, strict JSON or the 2014 Python-literal "loose JSON") or its ratings-only CSV.

Every review counts as an implicit positive interaction; reviewer and product IDs (text) become int64 by their
rank in sorted order. Nothing is downloaded: the files are behind the lab's request form (docs/datasets.md).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from embbench import DataNotFound, Dataset, content_sha256, find_file, integer_ids, read_table

#: the review keys read, by the column they become (the same in the 2014 and 2018 releases)
REVIEW_KEYS = {"user": "reviewerID", "item": "asin", "rating": "overall", "timestamp": "unixReviewTime"}
#: the order of the ratings-only CSV's columns: 2014's ratings_<Category>.csv starts with the user, 2018's
#: <Category>.csv with the item
CSV_LAYOUTS = {"user-first": ("user", "item", "rating", "timestamp"),
               "item-first": ("item", "user", "rating", "timestamp")}
CSV_ORDERS = ("auto", *CSV_LAYOUTS)
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_&]*")
_LINES_PER_CHUNK = 200_000
_FORMAT_VERSION = "amazon-reviews/v1"
# A value of a key at the top level of one review (the loose format): the prefix steps over whole quoted strings
# ('...' or "...") and runs of other characters, possessively (no backtracking), so a key's name inside a
# review's text never matches and a line is scanned once.
_QUOTED = r"""'[^'\\]*(?:\\.[^'\\]*)*'""" + "|" + r'"[^"\\]*(?:\\.[^"\\]*)*"'
_TEXT_VALUE = r"""(?:'([^'\\]*(?:\\.[^'\\]*)*)'|"([^"\\]*(?:\\.[^"\\]*)*)")"""
_NUMBER_VALUE = r"(-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"


def _field_pattern(key: str, value: str) -> str:
    """A pattern whose groups hold the value of ``key`` in one line holding one dict."""
    at_key = rf"""[,{{]\s*['"]{key}['"]\s*:"""
    return rf"""^(?:[^'",{{]++|{_QUOTED}|(?!{at_key})[,{{])*+{at_key}\s*{value}"""


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split()) or type(reason).__name__


class AmazonReviews(Dataset):
    """One category of the Amazon reviews (e.g. Musical_Instruments), or the review file at ``path``."""

    summary = "Amazon reviews (McAuley, UCSD; 2014/2018): a category's 5-core JSON lines or ratings-only CSV"

    def __init__(
        self, data_dir: str | Path | None = None, category: str = "", path: str = "", csv_order: str = "auto"
    ) -> None:
        given = {"category": category, "path": path, "csv_order": csv_order}
        super().__init__(data_dir, **{key: value for key, value in given.items() if value not in ("", "auto")})
        if bool(category) == bool(path):
            raise ValueError(
                "give exactly one of 'category' (e.g. \"Musical_Instruments\", found in the data folder) and "
                "'path' (a review file)"
            )
        if category and not _CATEGORY.fullmatch(category):
            raise ValueError(f"category must be a name like \"Musical_Instruments\" (letters, digits, '_'), "
                             f"got {category!r}")
        if csv_order not in CSV_ORDERS:
            raise ValueError(f"csv_order must be one of {', '.join(CSV_ORDERS)}, got {csv_order!r}")
        self.category, self.raw_path, self.csv_order = category, path, csv_order
        self._path: Path | None = None
        self._fingerprint: str | None = None
        #: after ``load``: the text ID (reviewerID, asin) of each int64 ID, by column
        self.id_labels: dict[str, np.ndarray | None] = {}

    # -- the file -----------------------------------------------------------------------------------------------
    def folders(self) -> list[str]:
        kebab = self.category.lower().replace("_", "-").replace("&", "and")
        return [f"amazon-{kebab}-5core", f"amazon-{kebab}", "amazon"]

    def file_names(self) -> list[str]:
        """The file names looked for, in order: 5-core JSON (2014, 2018), full JSON (2018), ratings CSV (2014,
        2018)."""
        c = self.category
        return [f"reviews_{c}_5.json", f"{c}_5.json", f"{c}.json", f"ratings_{c}.csv", f"{c}.csv"]

    def path(self) -> Path:
        """The review file: ``path`` (absolute, or inside the data folder), or the category's file found in the
        data folder (plain or .gz)."""
        if self._path is not None:
            return self._path
        if self.raw_path:
            given = Path(self.raw_path).expanduser()
            resolved = given if given.is_absolute() else self.data_dir / given
            if not self._is_file(resolved):
                raise DataNotFound(
                    f"Amazon review file {resolved} not found (path '{self.raw_path}'"
                    + ("" if given.is_absolute() else f", taken inside the data folder {self.data_dir}")
                    + "); check the dataset's 'path' or --data-dir"
                )
            self._path = resolved
            return resolved
        try:
            found = find_file(self.data_dir, self.folders(), self.file_names())
        except (OSError, ValueError) as exc:  # a category name too long for the file system
            raise DataNotFound(f"Amazon reviews of category '{self.category}' cannot be looked up in "
                               f"{self.data_dir} ({_one_line(exc)}); check 'category'") from None
        if found is None:
            names = ", ".join(f"{name}(.gz)" for name in self.file_names())
            raise DataNotFound(
                f"Amazon reviews of category '{self.category}' not found: put one of {names} in "
                f"{self.data_dir / self.folders()[0]}/ (from https://jmcauley.ucsd.edu/data/amazon/ or "
                "https://nijianmo.github.io/amazon/; see docs/datasets.md), or give 'path'"
            )
        self._path = found
        return found

    @staticmethod
    def _is_file(path: Path) -> bool:
        try:
            return path.is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            raise DataNotFound(f"Amazon review file {path} cannot be looked up ({_one_line(exc)}); "
                               "check the dataset's 'path'") from None

    def _is_csv(self, path: Path) -> bool:
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        return name.lower().endswith(".csv")

    def _unreadable(self, path: Path, reason: object) -> DataNotFound:
        return DataNotFound(
            f"could not read {path} as Amazon reviews ({_one_line(reason)}); replace it with the official file "
            "(see docs/datasets.md)"
        )

    # -- reading ------------------------------------------------------------------------------------------------
    def _csv_layout(self, path: Path) -> tuple[str, ...]:
        if self.csv_order != "auto":
            return CSV_LAYOUTS[self.csv_order]
        return CSV_LAYOUTS["user-first" if path.name.startswith("ratings_") else "item-first"]

    def _read_csv(self, path: Path) -> pd.DataFrame:
        """The ratings-only CSV (no header) as text columns."""
        return read_table(path, header=None, names=list(self._csv_layout(path)), dtype=str, na_filter=False)

    def _first_line(self, path: Path) -> str:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as stream:
            for line in stream:
                if line.strip():
                    return line.strip()
        raise DataNotFound(f"{path} is empty: no review to read")

    def _read_strict_json(self, path: Path) -> pd.DataFrame:
        columns = list(REVIEW_KEYS.values())
        chunks = []
        with pd.read_json(path, lines=True, dtype=False, chunksize=_LINES_PER_CHUNK,
                          compression="gzip" if path.name.endswith(".gz") else None) as reader:
            for chunk in reader:
                chunks.append(chunk.reindex(columns=columns))
        return pd.concat(chunks, ignore_index=True)

    def _read_loose_json(self, path: Path) -> pd.DataFrame:
        """Python-literal dicts, one per line (the 2014 dumps' ``eval`` format), by a pattern per key."""
        patterns = {key: _field_pattern(key, _NUMBER_VALUE if column in ("rating", "timestamp") else _TEXT_VALUE)
                    for column, key in REVIEW_KEYS.items()}
        chunks = []
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as stream:
            while lines := stream.readlines(1 << 26):
                text = pd.Series(lines, dtype=object).str.rstrip("\n")
                text = text[text.str.strip() != ""]
                chunk = {}
                for key, pattern in patterns.items():
                    found = text.str.extract(pattern)
                    chunk[key] = found[0] if found.shape[1] == 1 else found[0].fillna(found[1])
                chunks.append(pd.DataFrame(chunk))
        return pd.concat(chunks, ignore_index=True)

    def _read_json(self, path: Path) -> pd.DataFrame:
        first = self._first_line(path)
        try:
            json.loads(first)
            strict = True
        except ValueError:
            try:
                strict = not isinstance(ast.literal_eval(first), dict)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                strict = True
            if strict:
                raise DataNotFound(
                    f"{path} is not Amazon reviews as JSON lines: its first line is neither JSON nor a Python "
                    f"dict ({first[:80]!r}...); replace it with the official file (see docs/datasets.md)"
                ) from None
        frame = self._read_strict_json(path) if strict else self._read_loose_json(path)
        return frame.rename(columns={key: column for column, key in REVIEW_KEYS.items()})

    def load(self) -> pd.DataFrame:
        """user, item (int64 ranks of the text IDs), timestamp (int64 Unix seconds) and rating (float64), one
        row per review in file order. Reviews without a usable rating or time are skipped with a warning."""
        path = self.path()
        try:
            frame = self._read_csv(path) if self._is_csv(path) else self._read_json(path)
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None
        frame = frame.reset_index(drop=True)
        user, item = (frame[column].astype("object").where(frame[column].notna(), "").astype(str).str.strip()
                      for column in ("user", "item"))
        rating = pd.to_numeric(frame["rating"], errors="coerce").astype(np.float64)
        timestamp = pd.to_numeric(frame["timestamp"], errors="coerce").astype(np.float64)
        usable = ((user != "") & (item != "")).to_numpy() & np.isfinite(rating.to_numpy())
        usable &= np.isfinite(timestamp.to_numpy())
        if not usable.any():
            raise DataNotFound(
                f"{path} holds no review with a reviewer, product, rating and time ({len(frame):,} lines read); "
                "replace it with the official file (see docs/datasets.md)"
            )
        if not usable.all():
            first = int(np.flatnonzero(~usable)[0])
            warnings.warn(
                f"{path}: skipped {int((~usable).sum()):,} of {len(frame):,} reviews lacking a reviewer, product, "
                f"numeric rating or time (the first is review {first + 1})",
                stacklevel=2,
            )
        users, self.id_labels["user"] = integer_ids(user[usable], keep_integers=False)
        items, self.id_labels["item"] = integer_ids(item[usable], keep_integers=False)
        return pd.DataFrame({
            "user": users,
            "item": items,
            "timestamp": np.floor(timestamp.to_numpy()[usable]).astype(np.int64),
            "rating": rating.to_numpy()[usable],
        })

    def fingerprint(self) -> str:
        """sha256 of the file's uncompressed content, its layout and this reader's version."""
        if self._fingerprint is None:
            path = self.path()
            try:
                content = content_sha256(path)
            except (OSError, EOFError) as exc:
                raise self._unreadable(path, exc) from None
            layout = list(self._csv_layout(path)) if self._is_csv(path) else "json"
            material = json.dumps([content, _FORMAT_VERSION, layout])
            self._fingerprint = hashlib.sha256(material.encode()).hexdigest()
        return self._fingerprint

