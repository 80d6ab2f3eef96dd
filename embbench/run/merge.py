"""Merging results databases made on other machines into one: one row per cell (its key), an ok row preferred to
a failed or skipped one, and conflicts (one cell ok in both, with different metrics) reported, never hidden."""

from __future__ import annotations

import math
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embbench.errors import ConfigError, EmbbenchError
from embbench.run.record import COLUMNS
from embbench.run.store import ResultStore
from embbench.tasks import METRIC_COLUMNS

#: how a conflict may be settled: keep the target's row, or take the source's
PREFER = ("target", "source")
#: what two ok rows of one cell must agree on: every metric, and the bytes the embeddings store
COMPARED = (*(f"{split}_{column}" for split in ("test", "val") for column in METRIC_COLUMNS.values()), "size_bytes")
#: what names a cell in a conflict (its key is a hash)
_LABEL = ("suite", "dataset", "model", "scheme_label", "budget", "seed")


@dataclass
class Conflict:
    """One cell ok in both the target (as merged so far) and a source, with different metrics."""

    cell_key: str
    source: Path
    cell: str  # suite / dataset / model / scheme label / budget / seed
    differences: dict[str, tuple[Any, Any]]  # column -> (the target's value, the source's value)
    kept: str  # whose row the target holds now: "target" or "source"


@dataclass
class SourceCounts:
    """What became of one source's rows: each is counted once."""

    path: Path
    imported: int = 0  # a cell the target did not have
    kept: int = 0  # the target's row is as good (ok, or both not ok) and agrees
    replaced: int = 0  # the target's row was failed or skipped, the source's ok
    conflicts: int = 0  # ok in both, metrics differ (settled by ``prefer``; the target's row without it)


@dataclass
class MergeSummary:
    target: Path
    prefer: str | None
    sources: list[SourceCounts] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def imported(self) -> int:
        return sum(source.imported for source in self.sources)

    @property
    def kept(self) -> int:
        return sum(source.kept for source in self.sources)

    @property
    def replaced(self) -> int:
        return sum(source.replaced for source in self.sources)

    @property
    def unresolved(self) -> bool:
        """Conflicts were found and no ``prefer`` said how to settle them (the target's rows were kept)."""
        return bool(self.conflicts) and self.prefer is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.target), "prefer": self.prefer, "imported": self.imported, "kept": self.kept,
            "replaced": self.replaced, "conflicts": [
                {**asdict(conflict), "source": str(conflict.source),
                 "differences": {name: list(pair) for name, pair in conflict.differences.items()}}
                for conflict in self.conflicts
            ],
            "sources": [{**asdict(source), "path": str(source.path)} for source in self.sources],
        }


def merge_databases(
    target: str | Path, sources: list[str | Path], prefer: str | None = None, tolerance: float = 0.0
) -> MergeSummary:
    """Import every cell of ``sources`` (results databases, opened read-only, never changed) into ``target``
    (created if missing), in one transaction: all sources or nothing.

    Per cell key, with the sources taken in order: a cell the target lacks is imported; an ok row replaces a
    failed or skipped one; otherwise the target's row stays. Two ok rows whose metrics (:data:`COMPARED`) differ
    by more than ``tolerance`` (relative) are a conflict: the target's row stays unless ``prefer`` is
    ``"source"``; every conflict is listed in the summary. Every source is read and checked before the target is
    written, so a bad source leaves the target as it was.
    """
    if prefer is not None and prefer not in PREFER:
        raise ConfigError(f"prefer must be one of {', '.join(PREFER)} (or nothing), got '{prefer}'")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise ConfigError(f"tolerance must be a relative difference from 0 to below 1, got {tolerance!r}")
    if not sources:
        raise ConfigError("name at least one source database to merge into the target")
    target = Path(target)
    store = ResultStore(target)
    store.check(writable=True)
    rows_by_source = [(Path(source), _read_cells(Path(source), target)) for source in sources]
    summary = MergeSummary(target, prefer)
    names = list(COLUMNS)
    insert = f"INSERT OR REPLACE INTO cells ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
    with store.transaction() as connection:
        held = {row["cell_key"]: row for row in _rows(connection.execute(f"SELECT {', '.join(names)} FROM cells"))}
        for path, rows in rows_by_source:
            counts = SourceCounts(path)
            summary.sources.append(counts)
            for row in rows:
                take = _decide(held.get(row["cell_key"]), row, path, prefer, tolerance, counts, summary)
                if not take:
                    continue
                # a replaced row keeps nothing of the old one; columns an older source lacks are NULL
                full = {name: row.get(name) for name in names}
                try:
                    connection.execute(insert, tuple(full.values()))
                except sqlite3.IntegrityError as exc:
                    raise EmbbenchError(
                        f"cannot import cell {row['cell_key']} of {path}: {exc}; nothing was merged"
                    ) from None
                held[row["cell_key"]] = full
    return summary


def _decide(
    held: dict[str, Any] | None, row: dict[str, Any], path: Path, prefer: str | None, tolerance: float,
    counts: SourceCounts, summary: MergeSummary,
) -> bool:
    """Whether ``row`` of source ``path`` goes into the target, which holds ``held`` for its key; counted."""
    if held is None:
        counts.imported += 1
        return True
    if held["status"] != "ok" and row["status"] == "ok":
        counts.replaced += 1
        return True
    if held["status"] == "ok" and row["status"] == "ok":
        differences = _differences(held, row, tolerance)
        if differences:
            counts.conflicts += 1
            kept = "source" if prefer == "source" else "target"
            cell = " / ".join(str(row.get(name)) for name in _LABEL)
            summary.conflicts.append(Conflict(row["cell_key"], path, cell, differences, kept))
            return kept == "source"
    counts.kept += 1
    return False


def _differences(held: dict[str, Any], row: dict[str, Any], tolerance: float) -> dict[str, tuple[Any, Any]]:
    """The compared columns on which two ok rows disagree; a column an older source lacks is not compared."""
    found = {}
    for name in COMPARED:
        if name not in row:
            continue
        mine, theirs = held.get(name), row[name]
        if _missing(mine) and _missing(theirs):
            continue
        if _missing(mine) or _missing(theirs) or not math.isclose(mine, theirs, rel_tol=tolerance, abs_tol=0.0):
            found[name] = (mine, theirs)
    return found


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _read_cells(path: Path, target: Path) -> list[dict[str, Any]]:
    """Every row of the source database ``path``, checked and read without changing it."""
    if path.exists() and target.exists() and os.path.samefile(path, target):
        raise ConfigError(f"source {path} is the target database itself; name other databases to merge into it")
    with ResultStore(path).read_only() as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "cells" not in tables:
            return []  # an empty database, or one set up before any cell was written
        rows = _rows(connection.execute("SELECT * FROM cells ORDER BY rowid"))
        present = [column[1] for column in connection.execute("PRAGMA table_info(cells)")]
    unknown = [name for name in present if name not in COLUMNS]
    if unknown:
        raise EmbbenchError(
            f"source {path} has columns this embbench does not know ({', '.join(unknown[:5])}): a newer embbench "
            "wrote it; merge with that version, so that no column is lost"
        )
    return rows
