"""The results store: one SQLite database, one row per finished cell, its columns those of the result record
(:mod:`embbench.run.record`), and the leases by which several runners share a suite.

A cell's row is written in a single transaction when the cell ends (ok, failed or skipped), so a run killed
at any moment leaves no half-written cell and loses no finished one. Re-running a suite skips cells whose
key is stored as ok or skipped; failed cells are run again and their row replaced. Rows of quantised tables
(``precision`` other than fp32) are cells of their own; in a database written before precisions existed,
``precision`` is NULL, meaning fp32.

Every command checks the file before it reads or writes: a file that is not SQLite, a damaged database or
another program's database is refused with one line, and only an embbench results database (or a new, empty
or missing file) is ever written to. A runner claims a cell before training it (:meth:`ResultStore.claim`): a
lease row that expires unless renewed, so a killed runner's cells return to the others (at once on its own
host, where a dead process is seen to be dead).
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from embbench.errors import EmbbenchError
from embbench.paths import unwritable_reason
from embbench.run.record import COLUMNS, JSON_COLUMNS

DEFAULT_DB = Path("results") / "embbench.sqlite"
SCHEMA_VERSION = 1
#: seconds a claimed cell stays claimed without renewal; a running runner renews every third of it
LEASE_SECONDS = 120.0
#: the tables embbench itself creates
OWN_TABLES = ("cells", "meta", "leases")
_START_NEW = "pass --db with an embbench results database, or a new path to start one"


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


@dataclass
class Claim:
    """What :meth:`ResultStore.claim` found for each asked key: ``taken`` (now leased to the caller),
    ``finished`` (it needs no run) or ``leased`` (another runner holds a live lease on it)."""

    taken: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    leased: list[str] = field(default_factory=list)


class ResultStore:
    """Cells in a SQLite file; created on first write."""

    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path)
        self._checked: set[bool] = set()  # writable=False/True: found ours (or new) by this instance, for that
        self._set_up = False  # tables and columns are in place

    # -- what the file is -------------------------------------------------------------------------------------

    def check(self, writable: bool = False) -> None:
        """Refuse, with one line, a path that is not an embbench results database (a folder, not SQLite,
        damaged, another program's tables) or, with ``writable``, one that cannot be written or created. A
        missing or empty file is fine. Reads only: nothing is created or changed."""
        path = self.path
        try:
            exists = path.exists()
            if exists and not path.is_file():
                raise EmbbenchError(f"results database {path} is a folder, not a file; {_START_NEW}")
            if not exists:
                if writable:
                    reason = unwritable_reason(path.parent)
                    if reason is not None:
                        raise EmbbenchError(f"cannot create results database {path}: {reason}; pass another --db")
                self._checked.add(writable)
                return
            # Never open() the file itself: closing any descriptor of a database drops the SQLite locks this
            # process holds on it (POSIX advisory locks), which can let a writer corrupt what it reads.
            size = path.stat().st_size
        except OSError as exc:
            raise EmbbenchError(f"cannot read results database {path}: {exc.strerror or exc}; {_START_NEW}") from None
        if writable and not os.access(path, os.W_OK):
            raise EmbbenchError(f"results database {path} is read-only; make it writable or pass another --db")
        if size:
            connection = self._open(path)
            try:
                self._inspect(connection)
            finally:
                connection.close()
        self._checked.add(writable)

    def _inspect(self, connection: sqlite3.Connection) -> None:
        """Raise unless the open database is undamaged and empty or embbench's."""
        try:
            try:
                connection.execute("PRAGMA schema_version").fetchone()
            except sqlite3.DatabaseError as exc:
                if "not a database" not in str(exc):
                    raise
                raise EmbbenchError(
                    f"{self.path} is not an embbench results database (not a SQLite file); {_START_NEW}"
                ) from None
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0] if problems else "quick_check gave no answer")
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            tables = {name for name in tables if not name.startswith("sqlite_")}
            if not tables:
                return  # an empty database: ours to fill
            version = self._schema_version(connection, tables)
            if version is not None and version > SCHEMA_VERSION:
                raise EmbbenchError(
                    f"results database {self.path} has schema version {version}, newer than this embbench's "
                    f"{SCHEMA_VERSION}; upgrade embbench to read it"
                )
            if "cells" not in tables:
                if version is not None:
                    return  # set up by embbench, no cell written yet
                raise EmbbenchError(
                    f"{self.path} is a SQLite database but not an embbench results database (tables "
                    f"{', '.join(sorted(tables))}; no embbench 'cells' table); {_START_NEW}"
                )
            columns = {row[1] for row in connection.execute("PRAGMA table_info(cells)")}
        except sqlite3.DatabaseError as exc:
            detail = " ".join(line for line in str(exc).splitlines() if line.strip() and not line.startswith("***"))
            raise EmbbenchError(
                f"results database {self.path} is damaged ({detail}); restore it from a copy, or move it away or pass "
                "--db with a new path to start a new one"
            ) from None
        missing = {"cell_key", "status"} - columns
        # A newer embbench (schema version stated in meta) may have appended columns; without meta, the
        # columns are all that tell embbench's table from another program's.
        foreign = sorted(columns - set(COLUMNS)) if version is None else []
        if missing or foreign:
            what = f"columns {', '.join(foreign[:5])}" if foreign else f"no {' or '.join(sorted(missing))} column"
            raise EmbbenchError(
                f"{self.path} is a SQLite database but not an embbench results database (its 'cells' table has "
                f"{what}); {_START_NEW}"
            )

    @staticmethod
    def _schema_version(connection: sqlite3.Connection, tables: set[str]) -> int | None:
        """The schema version in embbench's ``meta`` table, or None where there is no such table or row."""
        if "meta" not in tables:
            return None
        try:
            row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None  # another program's meta table
        try:
            return int(row[0]) if row is not None else None
        except (TypeError, ValueError):
            return None

    # -- connections ------------------------------------------------------------------------------------------

    def _open(self, path: Path) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE), never implicitly.
            return sqlite3.connect(path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise EmbbenchError(f"cannot open results database {path}: {exc}") from None

    @contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        if not create and not self.path.exists():
            raise EmbbenchError(f"no results database at {self.path}; run a suite first or pass --db PATH")
        if create not in self._checked and True not in self._checked:
            self.check(writable=create)
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EmbbenchError(
                    f"cannot create results database {self.path}: {exc.strerror or exc}; pass another --db"
                ) from None
        connection = self._open(self.path)
        try:
            if create and not self._set_up:
                self._create_tables(connection)
                self._set_up = True
            yield connection
        except sqlite3.DatabaseError as exc:
            raise EmbbenchError(f"results database {self.path} is unreadable: {exc}") from None
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The database (created, or its tables upgraded, where need be) in one write transaction: everything
        done on the connection is committed together when the block ends, or nothing when it raises."""
        with self._connect(create=True) as connection, _transaction(connection):
            yield connection

    @contextmanager
    def read_only(self) -> Iterator[sqlite3.Connection]:
        """A connection that cannot write to this existing database, checked first as :meth:`check` checks it
        (not SQLite, damaged, another program's, a newer schema): for reading a database made elsewhere
        without changing it or creating anything beside it."""
        path = self.path
        try:
            if not path.is_file():
                what = "is a folder, not a file" if path.exists() else "does not exist"
                raise EmbbenchError(f"results database {path} {what}; pass the path of an embbench results database")
            with path.open("rb") as file:  # this process holds no connection to it, hence no lock to lose
                header = file.read(100)
        except OSError as exc:
            raise EmbbenchError(f"cannot read results database {path}: {exc.strerror or exc}") from None
        # SQLite opens a WAL database read-only by creating -wal and -shm files beside it. Without a WAL file
        # (no writer at work) every row is in the file itself, which is then read as immutable: nothing created.
        wal_mode = len(header) == 100 and header[18] == 2
        quiet = wal_mode and not path.with_name(path.name + "-wal").exists()
        uri = f"{path.resolve().as_uri()}?{'immutable=1' if quiet else 'mode=ro'}"
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise EmbbenchError(f"cannot open results database {path}: {exc}") from None
        try:
            self._inspect(connection)
            yield connection
        except sqlite3.DatabaseError as exc:
            raise EmbbenchError(f"results database {path} is unreadable: {exc}") from None
        finally:
            connection.close()

    @staticmethod
    def _create_tables(connection: sqlite3.Connection) -> None:
        """Tables and columns, created or upgraded in one transaction; another process may be doing the same,
        so what is there is read under the write lock and only what is missing is added."""
        # A new database is put in WAL mode (readers never wait for the writer). One that exists keeps its mode:
        # WAL needs every process on one host, so a database shared by several machines is switched back to a
        # rollback journal by its owner (docs/suites.md), and stays so.
        new = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if new and connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            connection.execute("PRAGMA journal_mode=WAL")
        with _transaction(connection):
            columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
            connection.execute(f"CREATE TABLE IF NOT EXISTS cells ({columns})")
            # A database written by an older embbench lacks newer columns: add them (as NULL).
            present = {row[1] for row in connection.execute("PRAGMA table_info(cells)")}
            for name, kind in COLUMNS.items():
                if name not in present:
                    connection.execute(f"ALTER TABLE cells ADD COLUMN {name} {kind.split(' CHECK')[0]}")
            connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            connection.execute(
                # one row per claimed cell: who claimed it, until when, and when its row was written (NULL: not
                # yet); a finished lease tells runners that started earlier that the cell was run
                "CREATE TABLE IF NOT EXISTS leases (cell_key TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                "expires_at REAL NOT NULL, finished_at REAL)"
            )

    # -- cells ------------------------------------------------------------------------------------------------

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

    def write(self, record: dict[str, Any], lease_owner: str | None = None) -> None:
        """Store one cell atomically, replacing an earlier row with the same key unless that row is ok and this
        one is not; in the same transaction, mark ``lease_owner``'s lease on the cell finished (now)."""
        unknown = set(record) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        row = {k: (_json(v) if k in JSON_COLUMNS and v is not None else v) for k, v in record.items()}
        row = {name: row.get(name) for name in COLUMNS}  # a replaced row keeps nothing of the old one
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "cell_key")
        with self._connect(create=True) as connection, _transaction(connection):
            # A row that is not ok never replaces an ok one (a failed --rerun, a second runner's late failure).
            connection.execute(
                f"INSERT INTO cells ({names}) VALUES ({marks}) ON CONFLICT (cell_key) DO UPDATE SET {updates} "
                "WHERE cells.status != 'ok' OR excluded.status = 'ok'",
                tuple(row.values()),
            )
            if lease_owner is not None:
                connection.execute(
                    "UPDATE leases SET finished_at = ? WHERE cell_key = ? AND owner = ?",
                    (time.time(), row["cell_key"], lease_owner),
                )

    def rows(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored rows of ``keys`` (those that have one), by key, as plain values (JSON columns as text)."""
        if not keys or not self.path.exists():
            return {}
        found: dict[str, dict[str, Any]] = {}
        with self._connect() as connection:
            connection.row_factory = sqlite3.Row
            for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
                chunk = list(keys[start:start + 500])
                marks = ", ".join("?" for _ in chunk)
                try:
                    rows = connection.execute(f"SELECT * FROM cells WHERE cell_key IN ({marks})", chunk).fetchall()
                except sqlite3.OperationalError:
                    return {}
                found.update({row["cell_key"]: dict(row) for row in rows})
        return found

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

    # -- leases -----------------------------------------------------------------------------------------------

    def claim(
        self, keys: Sequence[str], owner: str, seconds: float = LEASE_SECONDS, since: float | None = None,
        rerun: bool = False,
    ) -> Claim:
        """Lease to ``owner`` for ``seconds`` each of ``keys`` that needs a run and on which no other runner holds
        a live lease, in one transaction.

        A cell needs no run when its row is ok or skipped (unless ``rerun``), or when a runner finished it at or
        after ``since`` (a ``time.time()``: the caller's start), whatever its status: another runner of the same
        sweep ran it.
        """
        claim = Claim()
        if not keys:
            return claim
        marks = ", ".join("?" for _ in keys)
        with self._connect(create=True) as connection, _transaction(connection):
            statuses = dict(connection.execute(
                f"SELECT cell_key, status FROM cells WHERE cell_key IN ({marks})", tuple(keys)
            ).fetchall())
            leases = {row[0]: row[1:] for row in connection.execute(
                f"SELECT cell_key, owner, expires_at, finished_at FROM leases WHERE cell_key IN ({marks})", tuple(keys)
            )}
            now = time.time()
            for key in keys:
                holder, expires, finished = leases.get(key, (owner, 0.0, None))
                if (not rerun and statuses.get(key) in ("ok", "skipped")) or (
                    finished is not None and since is not None and finished >= since
                ):
                    claim.finished.append(key)
                elif finished is None and holder != owner and expires > now and _alive(holder):
                    claim.leased.append(key)
                else:
                    claim.taken.append(key)
            connection.executemany(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, NULL)",
                [(key, owner, now + seconds) for key in claim.taken],
            )
        return claim

    def renew(self, owner: str, seconds: float = LEASE_SECONDS) -> None:
        """Extend every live lease ``owner`` holds to ``seconds`` from now."""
        with self._connect(create=True) as connection, _transaction(connection):
            connection.execute(
                "UPDATE leases SET expires_at = ? WHERE owner = ? AND finished_at IS NULL",
                (time.time() + seconds, owner),
            )

    def release(self, owner: str) -> None:
        """Give back every lease ``owner`` holds on a cell it has not written (free for other runners at once)."""
        with self._connect(create=True) as connection, _transaction(connection):
            connection.execute("DELETE FROM leases WHERE owner = ? AND finished_at IS NULL", (owner,))

    @contextmanager
    def keep_leases(self, owner: str, seconds: float = LEASE_SECONDS) -> Iterator[None]:
        """Renew ``owner``'s leases every third of ``seconds`` from a background thread while the block runs,
        and release them when it ends (by error too); a killed process renews nothing, so its leases expire."""
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(seconds / 3):
                try:
                    self.renew(owner, seconds)
                except EmbbenchError:
                    pass  # a busy or briefly unreadable database: the next renewal tries again

        thread = threading.Thread(target=renew_until_stopped, name="embbench-leases", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(owner)


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, holding the write lock from its start (BEGIN IMMEDIATE)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def new_owner() -> str:
    """A runner's name in the leases it holds: ``host:pid:random``."""
    return f"{platform.node()}:{os.getpid()}:{secrets.token_hex(4)}"


def _alive(owner: str) -> bool:
    """False when ``owner`` is a process of this host that has ended (its leases need not wait to expire);
    True for a live process, and for any runner of another host (only expiry tells of those)."""
    name, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if name != platform.node() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # a process that exists but is not ours to signal
    return True
