"""`embbench merge TARGET SOURCE...`: cells of databases made on other machines imported in one transaction, one
row per cell key, ok preferred to failed or skipped, conflicts reported (exit 1) unless --prefer settles them;
sources never changed; a bad source is one `error:` line with the target untouched."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import assert_one_line_error, invoke

from embbench.run.merge import merge_databases
from embbench.run.record import COLUMNS
from embbench.run.store import ResultStore


def row(key: str, status: str = "ok", **extra: object) -> dict:
    record = {
        "cell_key": key, "suite": "merged", "dataset": "synthetic", "model": "gmf", "scheme": "hashing-trick",
        "scheme_label": "hashing-trick", "budget": "1/4", "size_bytes": 1000, "full_bytes": 4000, "device": "cpu",
        "seed": 0, "status": status, "config_json": {"seed": 0},
        "test_auc": 0.7 if status == "ok" else None, "test_hr10": 0.3 if status == "ok" else None,
        "error": None if status == "ok" else f"{status}: on purpose",
    }
    record.update(extra)
    return record


def database(path: Path, *rows: dict) -> Path:
    store = ResultStore(path)
    for record in rows:
        store.write(record)
    return path


def cells(path: Path) -> dict[str, dict]:
    return {r["cell_key"]: r for r in ResultStore(path).frame().to_dict("records")}


def fingerprint(path: Path) -> tuple[str, list[str]]:
    """The file's bytes and the names beside it (a -wal, -shm or journal file would show a write)."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(p.name for p in path.parent.iterdir())


def test_overlapping_databases_keep_one_row_per_cell_and_prefer_ok(tmp_path: Path) -> None:
    target = database(tmp_path / "t" / "r.sqlite", row("a", test_auc=0.71), row("b", "failed"), row("c", "skipped"))
    source = database(tmp_path / "s" / "r.sqlite", row("a", "failed"), row("b", test_auc=0.65),
                      row("c", "failed"), row("d", "skipped"))
    summary = merge_databases(target, [source])
    assert (summary.imported, summary.kept, summary.replaced, summary.conflicts) == (1, 2, 1, [])
    merged = cells(target)
    assert sorted(merged) == ["a", "b", "c", "d"]
    assert {key: r["status"] for key, r in merged.items()} == {"a": "ok", "b": "ok", "c": "skipped", "d": "skipped"}
    assert merged["a"]["test_auc"] == 0.71  # the target's ok row, not the source's failure
    assert merged["b"]["test_auc"] == 0.65 and pd.isna(merged["b"]["error"])  # nothing kept of the failed row


def test_the_same_ok_cell_with_other_metrics_is_a_conflict_the_target_row_stays_and_the_exit_code_is_1(
    tmp_path: Path,
) -> None:
    target = database(tmp_path / "t.sqlite", row("same", test_auc=0.70), row("clash", test_auc=0.70))
    source = database(tmp_path / "s.sqlite", row("same", test_auc=0.70), row("clash", test_auc=0.69),
                      row("new"))
    result = invoke("merge", str(target), str(source))
    assert result.exit_code == 1, result.output
    assert "1 imported, 1 kept, 0 replaced, 1 conflicts" in result.output
    conflict_lines = [line for line in result.output.splitlines() if "conflict:" in line]
    assert len(conflict_lines) == 1 and "clash" in conflict_lines[0] and "test_auc 0.7 (target) vs 0.69" in \
        conflict_lines[0]
    assert "--prefer" in result.output
    merged = cells(target)
    assert merged["clash"]["test_auc"] == 0.70 and "new" in merged  # the rest is imported all the same


@pytest.mark.parametrize(("prefer", "expected"), [("target", 0.70), ("source", 0.69)])
def test_prefer_settles_conflicts_and_lists_them(tmp_path: Path, prefer: str, expected: float) -> None:
    target = database(tmp_path / "t.sqlite", row("clash", test_auc=0.70))
    source = database(tmp_path / "s.sqlite", row("clash", test_auc=0.69, size_bytes=999))
    result = invoke("merge", str(target), str(source), "--prefer", prefer, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["conflicts"] == [{
        "cell_key": "clash", "source": str(source), "cell": "merged / synthetic / gmf / hashing-trick / 1/4 / 0",
        "differences": {"test_auc": [0.70, 0.69], "size_bytes": [1000, 999]}, "kept": prefer,
    }]
    assert cells(target)["clash"]["test_auc"] == expected


def test_metrics_within_the_tolerance_agree(tmp_path: Path) -> None:
    target = database(tmp_path / "t.sqlite", row("k", test_auc=0.7))
    source = database(tmp_path / "s.sqlite", row("k", test_auc=0.7 * (1 + 1e-9)))
    assert len(merge_databases(target, [source]).conflicts) == 1
    assert merge_databases(target, [source], tolerance=1e-6).conflicts == []


def test_disjoint_databases_are_united_into_a_new_target_and_the_sources_are_not_changed(tmp_path: Path) -> None:
    first = database(tmp_path / "node0" / "r.sqlite", row("a"), row("b", "failed"))
    second = database(tmp_path / "node1" / "r.sqlite", row("c", seed=1))
    before = [fingerprint(first), fingerprint(second)]
    target = tmp_path / "all" / "merged.sqlite"
    result = invoke("merge", str(target), str(first), str(second), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["imported"], report["kept"], report["replaced"], report["conflicts"]) == (3, 0, 0, [])
    assert [s["imported"] for s in report["sources"]] == [2, 1]
    assert sorted(cells(target)) == ["a", "b", "c"]
    assert [fingerprint(first), fingerprint(second)] == before  # no byte changed, no -wal or -shm made beside them


def test_merging_the_same_source_twice_changes_nothing_more(tmp_path: Path) -> None:
    source = database(tmp_path / "s.sqlite", row("a"), row("b", "failed"))
    target = tmp_path / "t.sqlite"
    merge_databases(target, [source])
    again = merge_databases(target, [source])
    assert (again.imported, again.kept, again.replaced, again.conflicts) == (0, 2, 0, [])
    assert sorted(cells(target)) == ["a", "b"]


def test_an_empty_source_file_has_no_cells_to_import(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    target = database(tmp_path / "t.sqlite", row("t"))
    summary = merge_databases(target, [empty])
    assert (summary.imported, summary.kept, summary.replaced) == (0, 0, 0)
    assert empty.read_bytes() == b"" and sorted(cells(target)) == ["t"]


def not_sqlite(path: Path) -> None:
    path.write_bytes(b"these are not the rows you are looking for\n" * 200)


def damaged(path: Path) -> None:
    database(path, *(row(f"k{index}", seed=index, history_json=["x" * 400]) for index in range(60)))
    data = bytearray(path.read_bytes())
    data[int.from_bytes(data[16:18], "big")] ^= 0xFF  # the b-tree page type of the second page
    path.write_bytes(bytes(data))


def foreign(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")


def newer_schema(path: Path) -> None:
    database(path, row("k"))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")


@pytest.mark.parametrize(("make", "message"), [
    (not_sqlite, "not a SQLite file"), (damaged, "is damaged"), (foreign, "not an embbench results database"),
    (newer_schema, "schema version 99"),
])
def test_a_bad_source_is_one_error_line_and_the_target_is_unchanged(tmp_path: Path, make, message: str) -> None:
    good = database(tmp_path / "good.sqlite", row("g"))
    bad = tmp_path / "bad.sqlite"
    make(bad)
    target = database(tmp_path / "t" / "r.sqlite", row("t"))
    before = fingerprint(target)
    assert_one_line_error(invoke("merge", str(target), str(good), str(bad)), message, str(bad))
    assert fingerprint(target) == before
    missing = tmp_path / "new" / "r.sqlite"
    assert_one_line_error(invoke("merge", str(missing), str(good), str(bad)), message)
    assert not missing.parent.exists()  # not created when a source is refused


def test_a_missing_source_or_the_target_itself_is_one_error_line(tmp_path: Path) -> None:
    target = database(tmp_path / "t.sqlite", row("t"))
    assert_one_line_error(invoke("merge", str(target), str(tmp_path / "nope.sqlite")), "does not exist")
    assert_one_line_error(invoke("merge", str(target), str(target)), "is the target database itself")


def test_a_failing_import_writes_nothing(tmp_path: Path) -> None:
    target = database(tmp_path / "t.sqlite", row("t"))
    good = database(tmp_path / "good.sqlite", row("g"))
    bad = database(tmp_path / "bad.sqlite", row("b"))
    with sqlite3.connect(bad) as connection:  # a row the target's schema refuses (as a hand-edited file could have)
        connection.execute("CREATE TABLE old AS SELECT * FROM cells")
        connection.execute("DROP TABLE cells")
        connection.execute("CREATE TABLE cells AS SELECT * FROM old")  # the same columns, no constraints
        connection.execute("DROP TABLE old")
        connection.execute("UPDATE cells SET suite = NULL")
    before = fingerprint(target)
    assert_one_line_error(invoke("merge", str(target), str(good), str(bad)), "cannot import cell b",
                          "nothing was merged")
    assert fingerprint(target) == before  # the good source's row was rolled back with it


def test_a_source_of_an_older_schema_is_imported_with_its_missing_columns_empty(tmp_path: Path) -> None:
    old = tmp_path / "old.sqlite"
    old_columns = [name for name in COLUMNS if name not in ("precision", "test_logloss", "world_size")]
    with sqlite3.connect(old) as connection:  # as an embbench before meta and these columns wrote it
        connection.execute(f"CREATE TABLE cells ({', '.join(f'{n} {COLUMNS[n]}' for n in old_columns)})")
        connection.execute(
            "INSERT INTO cells (cell_key, suite, dataset, model, scheme, scheme_label, budget, device, seed, status, "
            "test_auc, config_json) VALUES ('old', 's', 'd', 'm', 'x', 'x', '1', 'cpu', 0, 'ok', 0.75, '{}')"
        )
    target = database(tmp_path / "t.sqlite", row("new", precision="int8"))
    summary = merge_databases(target, [old])
    assert summary.imported == 1
    merged = cells(target)
    assert merged["old"]["test_auc"] == 0.75 and pd.isna(merged["old"]["precision"])
    assert merged["new"]["precision"] == "int8"


def test_the_report_reads_a_merged_database(tmp_path: Path) -> None:
    first = database(tmp_path / "a.sqlite", *(row(f"a{seed}", budget="1/4", seed=seed) for seed in range(2)))
    second = database(tmp_path / "b.sqlite", *(row(f"b{seed}", budget="1/2", size_bytes=2000, seed=seed,
                                                    test_auc=0.8) for seed in range(2)))
    target = tmp_path / "merged.sqlite"
    assert invoke("merge", str(target), str(first), str(second)).exit_code == 0
    out = tmp_path / "report"
    result = invoke("report", "--db", str(target), "--out", str(out))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "1/4" in text and "1/2" in text and "0.8" in text  # both machines' cells are in the one report
