"""Several runners on one database share a suite: each cell is claimed (leased) before it trains, so every cell
is trained once; a killed runner's claims return to the others; `--workers N` is N such runners on this machine."""

from __future__ import annotations

import collections
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from embbench import registry
from embbench.cli import main
from embbench.run.store import ResultStore, new_owner
from embbench.run.sweep import run_suite

DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 150, num_items = 90, interactions_per_user = 6 }\n'
MODEL = '[[models]]\nname = "gmf"\n'
SCHEME = '[[schemes]]\nname = "counted"\n'

#: the hashing trick, writing a line for each table it builds (every training start builds one per feature);
#: it hangs instead while the file named by EMBBENCH_TEST_HANG exists
PLUGIN = """
import os, time
from embbench_plugins.schemes.hashing_trick import HashingTrick

class Counted(HashingTrick):
    def build(self, feature, plan, seed):
        with open(os.environ["EMBBENCH_TEST_BUILDS"], "a") as log:
            log.write(f"{feature.name} {seed} {plan.budget_bytes} {os.getpid()}\\n")
        hang = os.environ.get("EMBBENCH_TEST_HANG")
        while hang and os.path.exists(hang):
            time.sleep(0.1)
        return super().build(feature, plan, seed)
"""


def suite_file(tmp_path: Path, budgets: int, seeds: int) -> Path:
    values = ", ".join(f'"1/{2 + index}"' for index in range(budgets))
    body = (f"epochs = 1\nbudgets = [{values}]\nseeds = {list(range(seeds))}\nlatency_batch_sizes = []\n"
            + DATA + MODEL + SCHEME)
    path = tmp_path / "suite.toml"
    path.write_text(body)
    return path


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The `counted` scheme installed (here and for child processes); yields the file its builds are logged in."""
    site = tmp_path / "site"
    info = site / "counted_scheme-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: counted-scheme\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[embbench.schemes]\ncounted = counted_scheme:Counted\n")
    (site / "counted_scheme.py").write_text(PLUGIN)
    builds = tmp_path / "builds.log"
    builds.touch()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("EMBBENCH_TEST_BUILDS", str(builds))
    registry.discover("schemes", refresh=True)
    yield builds
    registry.discover("schemes", refresh=True)


def trainings(builds: Path) -> collections.Counter:
    """How often each (seed, budget) was trained: its item table built."""
    lines = [line.split() for line in builds.read_text().splitlines()]
    return collections.Counter((seed, budget) for feature, seed, budget, _ in lines if feature == "item")


def runner(suite: Path, db: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "embbench.cli", "run", "suite", str(suite), "--db", str(db), "--no-progress"]
    return subprocess.Popen([*command, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def ok_count(output: str) -> int:
    match = re.search(r"(\d+) ok", output)
    assert match, output
    return int(match.group(1))


def test_three_runners_on_one_database_train_every_cell_exactly_once(tmp_path: Path, counted: Path) -> None:
    suite, db = suite_file(tmp_path, budgets=4, seeds=3), tmp_path / "shared.sqlite"
    processes = [runner(suite, db) for _ in range(3)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], "\n".join(outputs)
    frame = ResultStore(db).frame()
    assert len(frame) == 12 and (frame["status"] == "ok").all()
    counts = trainings(counted)
    assert len(counts) == 12 and set(counts.values()) == {1}, counts
    assert sum(ok_count(output) for output in outputs) == 12, outputs


def test_a_killed_runners_cell_is_taken_by_the_next_runner(tmp_path: Path, counted: Path) -> None:
    suite, db = suite_file(tmp_path, budgets=1, seeds=1), tmp_path / "shared.sqlite"
    hang = tmp_path / "hang"
    hang.touch()
    process = runner(suite, db, env={"EMBBENCH_TEST_HANG": str(hang)})

    def held_leases() -> list[tuple[str]]:
        try:
            with sqlite3.connect(db) as connection:
                return connection.execute("SELECT owner FROM leases WHERE finished_at IS NULL").fetchall()
        except sqlite3.OperationalError:
            return []

    while not held_leases() and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[0]
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    hang.unlink()
    assert held_leases()[0][0].split(":")[1] == str(process.pid)  # the dead runner's claim is still there

    summary = run_suite(str(suite), db=db, progress=False)
    assert (summary.ok, summary.elsewhere) == (1, 0)
    assert (ResultStore(db).frame()["status"] == "ok").all()
    assert held_leases() == []


def test_a_claim_of_a_runner_on_another_machine_is_taken_once_it_expires(tmp_path: Path, counted: Path) -> None:
    suite, db = suite_file(tmp_path, budgets=1, seeds=1), tmp_path / "shared.sqlite"
    store = ResultStore(db)
    key = run_suite_keys(suite)[0]
    store.claim([key], "other-machine:4242:dead", seconds=1.5)  # its runner died: the lease is never renewed
    summary = run_suite(str(suite), db=db, progress=False, lease_seconds=2.0)  # waits for the lease to expire
    assert (summary.ok, summary.elsewhere) == (1, 0)
    assert sum(trainings(counted).values()) == 1


def run_suite_keys(suite: Path) -> list[str]:
    from embbench.run.sweep import prepare

    return [cell.key for cell in prepare(str(suite)).cells]


def test_a_live_claim_is_respected_and_a_finished_cell_is_not_claimed(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    started = time.time()
    mine, theirs, gone = new_owner(), "other-machine:1:live", "other-machine:2:expired"
    assert store.claim(["a"], theirs, seconds=3600).taken == ["a"]
    assert store.claim(["b"], gone, seconds=-1).taken == ["b"]
    claim = store.claim(["a", "b"], mine, since=started)
    assert (claim.taken, claim.leased, claim.finished) == (["b"], ["a"], [])
    store.write({"cell_key": "b", "suite": "s", "dataset": "d", "model": "m", "scheme": "x", "scheme_label": "x",
                 "budget": "1", "device": "cpu", "seed": 0, "status": "failed", "config_json": {}}, lease_owner=mine)
    # a failed row written during this sweep is this sweep's result: not trained again by its other runners
    assert store.claim(["b"], new_owner(), since=started).finished == ["b"]
    # a later sweep runs it again
    assert store.claim(["b"], new_owner(), since=time.time() + 1).taken == ["b"]


def test_workers_share_a_suite_with_each_cell_once_and_a_share_of_the_threads(tmp_path: Path, counted: Path) -> None:
    suite, db = suite_file(tmp_path, budgets=2, seeds=3), tmp_path / "r.sqlite"
    process = runner(suite, db, "--workers", "2")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert ok_count(output) == 6
    counts = trainings(counted)
    assert len(counts) == 6 and set(counts.values()) == {1}, counts
    frame = ResultStore(db).frame()
    assert len(frame) == 6 and (frame["threads"] == max(1, torch.get_num_threads() // 2)).all()
    builders = {line.split()[3] for line in counted.read_text().splitlines()}
    assert str(process.pid) not in builders  # the workers trained, not the process that started them


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_workers_stop_when_the_process_that_started_them_is_terminated_or_killed(
    tmp_path: Path, counted: Path, signum: int
) -> None:
    suite, db = suite_file(tmp_path, budgets=2, seeds=1), tmp_path / "r.sqlite"
    hang = tmp_path / "hang"
    hang.touch()
    process = runner(suite, db, "--workers", "2", env={"EMBBENCH_TEST_HANG": str(hang)})
    deadline = time.monotonic() + 300
    while len({line.split()[3] for line in counted.read_text().splitlines()}) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.1)
    workers = {int(line.split()[3]) for line in counted.read_text().splitlines()}
    assert len(workers) == 2 and all(alive(pid) for pid in workers)  # both hang in a cell
    os.kill(process.pid, signum)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == -signum if signum == signal.SIGKILL else process.returncode != 0, output
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    hang.unlink()
    assert not any(alive(pid) for pid in workers), "a worker kept running after its parent was stopped"
    summary = run_suite(str(suite), db=db, progress=False)  # the stopped workers' cells are taken by the next run
    assert summary.ok == 2 and (ResultStore(db).frame()["status"] == "ok").all()


def test_workers_with_several_processes_per_cell_is_one_line(tmp_path: Path) -> None:
    suite = suite_file(tmp_path, budgets=1, seeds=1)
    result = CliRunner().invoke(main, ["run", "suite", str(suite), "--workers", "2", "--nproc", "2",
                                       "--db", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--workers" in lines[0] and "--nproc" in lines[0]
    assert not (tmp_path / "r.sqlite").exists()
