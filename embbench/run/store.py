"""The results store: one SQLite database, one row per finished cell, its columns those of the result record
(:mod:`embbench.run.record`).

A cell's row is written in a single transaction when the cell ends (ok, failed or skipped), so a run killed
at any moment leaves no half-written cell and loses no finished one. Re-running a suite skips cells whose
key is stored as ok or skipped; failed cells are run again and their row replaced. Rows of quantised tables
(``precision`` other than fp32) are cells of their own; in a database written before precisions existed,
``precision`` is NULL, meaning fp32.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from embbench.errors import EmbbenchError
from embbench.run.record import COLUMNS, JSON_COLUMNS

DEFAULT_DB = Path("results") / "embbench.sqlite"
SCHEMA_VERSION = 1


def _json(value: Any) -> str:
    """Strict JSON of a column's value: a NaN or infinity (which JSON has no word for) is stored as null."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(inner) for inner in item]
        return item

    return json.dumps(finite(value), default=str, allow_nan=False)


class ResultStore:
    """Cells in a SQLite file; created on first write."""

    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path)

    @contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        if not create and not self.path.exists():
            raise EmbbenchError(f"no results database at {self.path}; run a suite first or pass --db PATH")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as exc:
            raise EmbbenchError(f"cannot open results database {self.path}: {exc}") from None
        try:
            if create:
                connection.execute("PRAGMA journal_mode=WAL")
                columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
                connection.execute(f"CREATE TABLE IF NOT EXISTS cells ({columns})")
                # A database written by an older embbench lacks newer columns: add them (as NULL).
                present = {row[1] for row in connection.execute("PRAGMA table_info(cells)")}
                for name, kind in COLUMNS.items():
                    if name not in present:
                        connection.execute(f"ALTER TABLE cells ADD COLUMN {name} {kind.split(' CHECK')[0]}")
                connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                connection.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
                connection.commit()
            yield connection
        except sqlite3.DatabaseError as exc:
            raise EmbbenchError(f"results database {self.path} is unreadable: {exc}") from None
        finally:
            connection.close()

    def finished_keys(self) -> set[str]:
        """Keys of cells that need not run again (ok or skipped)."""
        if not self.path.exists():
            return set()
        with self._connect() as connection:
            try:
                rows = connection.execute("SELECT cell_key FROM cells WHERE status IN ('ok', 'skipped')")
            except sqlite3.OperationalError:
                return set()
            return {row[0] for row in rows}

    def write(self, record: dict[str, Any]) -> None:
        """Store one cell atomically, replacing an earlier row with the same key unless that row is ok and this
        one is not."""
        unknown = set(record) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        row = {k: (_json(v) if k in JSON_COLUMNS and v is not None else v) for k, v in record.items()}
        row = {name: row.get(name) for name in COLUMNS}  # a replaced row keeps nothing of the old one
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "cell_key")
        with self._connect(create=True) as connection, connection:
            # A row that is not ok never replaces an ok one (a failed --rerun, a second runner's late failure).
            connection.execute(
                f"INSERT INTO cells ({names}) VALUES ({marks}) ON CONFLICT (cell_key) DO UPDATE SET {updates} "
                "WHERE cells.status != 'ok' OR excluded.status = 'ok'",
                tuple(row.values()),
            )

    def frame(self, suite: str | None = None) -> pd.DataFrame:
        """All stored cells (optionally of one suite) as a DataFrame, oldest first."""
        with self._connect() as connection:
            query, args = "SELECT * FROM cells", ()
            if suite is not None:
                query, args = query + " WHERE suite = ?", (suite,)
            try:
                frame = pd.read_sql_query(query + " ORDER BY finished_at, rowid", connection, params=args)
            except (pd.errors.DatabaseError, sqlite3.OperationalError):
                frame = pd.DataFrame(columns=list(COLUMNS))
        return frame
