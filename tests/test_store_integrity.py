"""The results store refuses what is not its own: random bytes, a truncated or damaged database, another program's
SQLite file, an output folder it cannot write — one `error:` line, exit code 2, nothing written; older databases
are upgraded in one transaction, safely under concurrent writers."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import assert_one_line_error, invoke

from embbench.errors import EmbbenchError
from embbench.report import write_report
from embbench.run.record import COLUMNS
from embbench.run.store import ResultStore

SUITE = """
epochs = 1
budgets = ["1/4"]
latency_batch_sizes = []
[[datasets]]
name = "synthetic"
params = { num_users = 120, num_items = 80, interactions_per_user = 6 }
[[models]]
name = "gmf"
[[schemes]]
name = "hashing-trick"
"""


def row(key: str, **extra: object) -> dict:
    record = {
        "cell_key": key, "suite": "smoke", "dataset": "synthetic", "model": "gmf", "scheme": "hashing-trick",
        "scheme_label": "hashing-trick", "budget": "1/4", "size_bytes": 1000, "full_bytes": 4000, "device": "cpu",
        "seed": 0, "status": "ok", "test_auc": 0.7, "test_hr10": 0.3, "config_json": {"seed": 0},
        "history_json": [{"epoch": 1, "note": "x" * 400}],
    }
    record.update(extra)
    return record


def fingerprint(path: Path) -> tuple[str, list[str]]:
    """The file's bytes and the names beside it (a WAL or journal file would show a write)."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(p.name for p in path.parent.iterdir())


def good_database(path: Path, rows: int = 60) -> Path:
    store = ResultStore(path)
    for index in range(rows):
        store.write(row(f"k{index}", seed=index))
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(os.urandom(8192))
    return path


def truncated(path: Path) -> Path:
    data = good_database(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bit_flipped(path: Path) -> Path:
    data = bytearray(good_database(path).read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    data[page_size] ^= 0xFF  # the b-tree page type of the second page
    path.write_bytes(bytes(data))
    return path


def foreign_cells(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE cells (id INTEGER PRIMARY KEY, organism TEXT, count INTEGER)")
        connection.execute("INSERT INTO cells VALUES (1, 'yeast', 3)")
    return path


def foreign_tables(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    return path


BROKEN = {
    "random bytes": (random_bytes, "not a SQLite file"),
    "truncated": (truncated, "is damaged"),
    "bit-flipped": (bit_flipped, "is damaged"),
    "foreign cells table": (foreign_cells, "not an embbench results database"),
    "foreign tables": (foreign_tables, "not an embbench results database"),
}


@pytest.fixture(params=sorted(BROKEN))
def broken(request, tmp_path: Path) -> tuple[Path, str]:
    make, message = BROKEN[request.param]
    folder = tmp_path / "db"
    folder.mkdir()
    return make(folder / "r.sqlite"), message


def test_results_refuses_a_broken_or_foreign_database(broken: tuple[Path, str]) -> None:
    path, message = broken
    before = fingerprint(path)
    assert_one_line_error(invoke("results", "--db", str(path)), message, str(path), "--db")
    assert_one_line_error(invoke("results", "--db", str(path), "--json"), message)
    assert fingerprint(path) == before


def test_report_refuses_a_broken_or_foreign_database_and_writes_nothing(broken: tuple[Path, str], tmp_path) -> None:
    path, message = broken
    out = tmp_path / "report"
    assert_one_line_error(invoke("report", "--db", str(path), "--out", str(out)), message, str(path))
    assert not out.exists()


def test_run_refuses_a_broken_or_foreign_database_and_leaves_it_untouched(broken: tuple[Path, str], tmp_path) -> None:
    path, message = broken
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE)
    before = fingerprint(path)
    assert_one_line_error(invoke("run", "suite", str(suite), "--db", str(path), "--no-progress"), message)
    assert fingerprint(path) == before


def test_writing_to_a_foreign_database_changes_nothing(tmp_path: Path) -> None:
    path = foreign_cells(tmp_path / "theirs.sqlite")
    before = fingerprint(path)
    with pytest.raises(EmbbenchError, match="not an embbench results database"):
        ResultStore(path).write(row("k"))
    with sqlite3.connect(path) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"cells"}
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
    assert fingerprint(path) == before


def test_an_empty_or_missing_file_becomes_a_results_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    assert ResultStore(empty).frame().empty  # an empty file has no results, and is no error
    for path in (empty, tmp_path / "new" / "r.sqlite"):
        ResultStore(path).write(row("k"))
        assert ResultStore(path).frame()["cell_key"].tolist() == ["k"]


def test_a_database_of_an_older_embbench_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_columns = [name for name in COLUMNS if name not in ("precision", "test_logloss", "world_size")]
    with sqlite3.connect(path) as connection:  # as an embbench before meta and these columns wrote it
        connection.execute(f"CREATE TABLE cells ({', '.join(f'{n} {COLUMNS[n]}' for n in old_columns)})")
        connection.execute(
            "INSERT INTO cells (cell_key, suite, dataset, model, scheme, scheme_label, budget, device, seed, status, "
            "config_json) VALUES ('old', 's', 'd', 'm', 'x', 'x', '1', 'cpu', 0, 'ok', '{}')"
        )
    ResultStore(path).write(row("new", precision="int8"))
    frame = ResultStore(path).frame().set_index("cell_key")
    assert frame.loc["new", "precision"] == "int8" and pd.isna(frame.loc["old", "precision"])
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)


def test_a_database_of_a_newer_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = good_database(tmp_path / "r.sqlite", rows=1)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert_one_line_error(invoke("results", "--db", str(path)), "schema version 99", "upgrade embbench")


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from embbench.run.store import ResultStore
    path, index, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    (go.parent / f"ready-{index}").touch()
    while not go.exists():
        time.sleep(0.01)
    store = ResultStore(path)
    for number in range(int(sys.argv[4])):
        store.write({"cell_key": f"{index}-{number}", "suite": "s", "dataset": "d", "model": "m", "scheme": "x",
                     "scheme_label": "x", "budget": "1", "device": "cpu", "seed": number, "status": "ok",
                     "config_json": {}})
        store = ResultStore(path)  # a fresh store each time: every write opens and checks the file anew
""")


def test_concurrent_writers_upgrade_an_old_database_once_and_lose_no_row(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_columns = ["cell_key", "config_json", *list(COLUMNS)[:20]]
    with sqlite3.connect(path) as connection:
        connection.execute(f"CREATE TABLE cells ({', '.join(f'{n} {COLUMNS[n]}' for n in old_columns)})")
    script, go = tmp_path / "writer.py", tmp_path / "go"
    script.write_text(WRITER)
    writers, rows = 6, 8
    processes = [
        subprocess.Popen([sys.executable, str(script), str(path), str(index), str(go), str(rows)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(writers)
    ]
    while len(list(tmp_path.glob("ready-*"))) < writers and all(p.poll() is None for p in processes):
        pass
    go.touch()  # all start writing (and upgrading) together
    outputs = [process.communicate()[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * writers, "\n".join(outputs)
    frame = ResultStore(path).frame()
    assert len(frame) == writers * rows and set(COLUMNS) <= set(frame.columns)


def test_report_into_a_file_or_under_one_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    db = good_database(tmp_path / "r.sqlite", rows=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "report", blocker):
        assert_one_line_error(invoke("report", "--db", str(db), "--out", str(out)), str(blocker), "is a file")
    assert blocker.read_text() == "not a folder"


def test_report_into_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    db = good_database(tmp_path / "r.sqlite", rows=2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(invoke("report", "--db", str(db), "--out", str(locked / "report")), "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_report_folder_name_too_long_is_one_line(tmp_path: Path) -> None:
    db = good_database(tmp_path / "r.sqlite", rows=2)
    assert_one_line_error(invoke("report", "--db", str(db), "--out", str(tmp_path / ("r" * 300))),
                          "cannot write the report")


def test_a_suite_name_too_long_for_a_file_name_still_gets_its_figures(tmp_path: Path) -> None:
    long_name = "suite-" + "n" * 250
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    for seed, (budget, size) in enumerate([("1/4", 1000), ("1/2", 2000)] * 2):
        store.write(row(f"k{seed}", suite=long_name, budget=budget, size_bytes=size, seed=seed))
    report = write_report(ResultStore(path).frame(), tmp_path / "out")
    figures = list((tmp_path / "out" / "figures").iterdir())
    assert figures and all(len(figure.name.encode()) <= 130 for figure in figures)
    assert all(f"figures/{figure.name}" in report.read_text() for figure in figures)


def test_a_database_switched_to_a_rollback_journal_keeps_it(tmp_path: Path) -> None:
    path = good_database(tmp_path / "shared.sqlite", rows=1)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # a new database: WAL
        assert connection.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    ResultStore(path).write(row("more"))
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert len(ResultStore(path).frame()) == 2
