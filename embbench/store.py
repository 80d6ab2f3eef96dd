"""The results store: one SQLite database, one row per finished cell.

A cell's row is written in a single transaction when the cell ends (ok, failed or skipped), so a run killed
at any moment leaves no half-written cell and loses no finished one. Re-running a suite skips cells whose
key is stored as ok or skipped; failed cells are run again and their row replaced. Rows of quantised tables
(``precision`` other than fp32) are cells of their own; in a database written before precisions existed,
``precision`` is NULL, meaning fp32.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from embbench.errors import EmbbenchError

DEFAULT_DB = Path("results") / "embbench.sqlite"
SCHEMA_VERSION = 1

COLUMNS: dict[str, str] = {
    "cell_key": "TEXT PRIMARY KEY",
    "suite": "TEXT NOT NULL",
    "task": "TEXT",
    "dataset": "TEXT NOT NULL",
    "model": "TEXT NOT NULL",
    "scheme": "TEXT NOT NULL",
    "scheme_label": "TEXT NOT NULL",
    "precision": "TEXT",
    "budget": "TEXT NOT NULL",
    "device": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "status": "TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'skipped'))",
    "size_bytes": "INTEGER",
    "budget_bytes": "INTEGER",
    "full_bytes": "INTEGER",
    "dense_bytes": "INTEGER",
    "test_auc": "REAL",
    "test_hr10": "REAL",
    "test_ndcg10": "REAL",
    "val_auc": "REAL",
    "val_hr10": "REAL",
    "val_ndcg10": "REAL",
    "test_logloss": "REAL",
    "val_logloss": "REAL",
    "train_seconds": "REAL",
    "eval_seconds": "REAL",
    "wall_seconds": "REAL",
    "epochs_run": "INTEGER",
    "best_epoch": "INTEGER",
    "embedding_latency_ms": "REAL",
    "model_latency_ms": "REAL",
    "train_examples_per_second": "REAL",
    "peak_memory_bytes": "INTEGER",
    "peak_rss_bytes": "INTEGER",
    "sharding": "TEXT",
    "world_size": "INTEGER",
    "embedding_optimizer": "TEXT",
    "dense_optimizer": "TEXT",
    "sharding_json": "TEXT",
    "device_name": "TEXT",
    "table_backend": "TEXT",
    "threads": "INTEGER",
    "config_json": "TEXT NOT NULL",
    "plan_json": "TEXT",
    "history_json": "TEXT",
    "latency_json": "TEXT",
    "environment_json": "TEXT",
    "git_commit": "TEXT",
    "host": "TEXT",
    "error": "TEXT",
    "started_at": "TEXT",
    "finished_at": "TEXT",
}
JSON_COLUMNS = ("config_json", "plan_json", "history_json", "environment_json", "latency_json", "sharding_json")


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
        """Store one cell atomically, replacing an earlier row with the same key."""
        unknown = set(record) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        row = {k: (json.dumps(v, default=str) if k in JSON_COLUMNS and v is not None else v) for k, v in record.items()}
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect(create=True) as connection, connection:
            connection.execute(f"INSERT OR REPLACE INTO cells ({names}) VALUES ({marks})", tuple(row.values()))

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
