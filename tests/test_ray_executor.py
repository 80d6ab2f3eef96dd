"""`embbench run suite S --executor ray`: the cells of a suite as Ray tasks, the driver alone writing the database.
It stores what the in-process runner stores; a killed worker's cell is run again, a killed driver's run resumes,
and nothing is lost or stored twice. One Ray instance (2 CPUs) serves the whole module."""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, invoke

from embbench import registry
from embbench.run.store import ResultStore
from embbench.run.sweep import RunSummary, run_suite

METRICS = ["test_auc", "test_hr10", "test_ndcg10", "val_auc", "size_bytes", "epochs_run"]

#: the hashing trick, logging "feature seed budget pid" for every table it builds (each training run builds one per
#: feature); it hangs instead while the file named by EMBBENCH_TEST_HANG exists
PLUGIN = """
import os, time
from embbench_plugins.schemes.hashing_trick import HashingTrick

class Counted(HashingTrick):
    def build(self, feature, plan, seed):
        with open(os.environ["EMBBENCH_TEST_BUILDS"], "a") as log:
            log.write(f"{feature.name} {seed} {plan.budget_bytes} {os.getpid()}\\n")
        hang = os.environ["EMBBENCH_TEST_HANG"]
        while os.path.exists(hang):
            time.sleep(0.05)
        return super().build(feature, plan, seed)
"""


def suite_file(folder: Path, scheme: str) -> Path:
    """Six cells: three budgets x two seeds, one epoch on a small synthetic dataset."""
    path = folder / f"{scheme}.toml"
    path.write_text(
        'epochs = 1\nbudgets = ["1/2", "1/3", "1/4"]\nseeds = [0, 1]\nlatency_batch_sizes = []\n'
        '[[datasets]]\nname = "synthetic"\nparams = { num_users = 120, num_items = 80, interactions_per_user = 5 }\n'
        f'[[models]]\nname = "gmf"\n[[schemes]]\nname = "{scheme}"\n'
    )
    return path


@dataclass
class Cluster:
    address: str
    builds: Path  # the counted scheme's log
    hang: Path  # while this file exists, the counted scheme hangs in build


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray instance of 2 CPUs whose workers (and child processes of the tests) can load the `counted` scheme."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'embbench[ray]')")
    folder = tmp_path_factory.mktemp("ray")
    site = folder / "site"
    info = site / "ray_counted_scheme-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ray-counted-scheme\nVersion: 1.0\n")
    # a module name of its own: test_runners.py's `counted` plugin is another module (sys.modules keeps this one)
    (info / "entry_points.txt").write_text("[embbench.schemes]\ncounted = ray_counted_scheme:Counted\n")
    (site / "ray_counted_scheme.py").write_text(PLUGIN)
    builds, hang = folder / "builds.log", folder / "hang"
    builds.touch()
    variables = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                 "EMBBENCH_TEST_BUILDS": str(builds), "EMBBENCH_TEST_HANG": str(hang), "OMP_NUM_THREADS": "1"}
    saved = {name: os.environ.get(name) for name in [*variables, "RAY_AUTH_MODE"]}  # ray.init sets the last
    os.environ.update(variables)  # before Ray starts: its workers inherit them
    sys.path.insert(0, str(site))
    registry.discover("schemes", refresh=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)  # never another's
    try:
        yield Cluster(ray.get_runtime_context().gcs_address, builds, hang)
    finally:
        ray.shutdown()
        sys.path.remove(str(site))
        sys.modules.pop("ray_counted_scheme", None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        registry.discover("schemes", refresh=True)


def trainings(builds: Path) -> collections.Counter:
    """How often each (seed, budget) finished building its tables: its item table built."""
    lines = [line.split() for line in builds.read_text().splitlines()]
    return collections.Counter((seed, budget) for feature, seed, budget, _ in lines if feature == "item")


def rows(db: Path):
    return ResultStore(db).frame().sort_values("cell_key", ignore_index=True)


def assert_every_cell_ok_once(db: Path, cells: int = 6) -> None:
    frame = rows(db)
    assert len(frame) == cells and frame["cell_key"].is_unique, frame[["cell_key", "status"]]
    assert (frame["status"] == "ok").all(), frame["error"].dropna().tolist()


def test_ray_stores_the_cells_and_metrics_the_in_process_runner_stores(tmp_path: Path, cluster: Cluster) -> None:
    suite = suite_file(tmp_path, "hashing-trick")
    here = run_suite(suite, db=tmp_path / "here.sqlite", progress=False, threads=1)
    on_ray = run_suite(suite, db=tmp_path / "ray.sqlite", progress=False, threads=1, executor="ray")
    assert (here.ok, on_ray.ok, on_ray.failed, on_ray.already_done) == (6, 6, 0, 0)
    expected, got = rows(tmp_path / "here.sqlite"), rows(tmp_path / "ray.sqlite")
    assert got["cell_key"].tolist() == expected["cell_key"].tolist()
    assert (got["threads"] == 1).all()
    for column in METRICS:
        assert got[column].tolist() == expected[column].tolist(), column
    again = run_suite(suite, db=tmp_path / "ray.sqlite", progress=False, threads=1, executor="ray")
    assert (again.ok, again.already_done) == (0, 6)  # a finished suite submits nothing


def test_a_tuned_suite_on_ray_stores_the_trials_and_tuned_cells_the_in_process_runner_stores(
    tmp_path: Path, cluster: Cluster
) -> None:
    suite = tmp_path / "tuned.toml"
    suite.write_text(
        'epochs = 1\nbudgets = ["1/4"]\nseeds = [0, 1]\nlatency_batch_sizes = []\n'
        '[tuning]\ntrials = 2\nspace = { learning_rate = { low = 1e-4, high = 1e-1, log = true } }\n'
        '[[datasets]]\nname = "synthetic"\nparams = { num_users = 120, num_items = 80, interactions_per_user = 5 }\n'
        '[[models]]\nname = "gmf"\n[[schemes]]\nname = "hashing-trick"\n'
    )
    here = run_suite(suite, db=tmp_path / "here.sqlite", progress=False, threads=1)
    on_ray = run_suite(suite, db=tmp_path / "ray.sqlite", progress=False, threads=1, executor="ray")
    assert (here.ok, on_ray.ok, on_ray.failed) == (6, 6, 0)  # 2 untuned, 2 trials, 2 tuned
    expected, got = rows(tmp_path / "here.sqlite"), rows(tmp_path / "ray.sqlite")
    assert got["cell_key"].tolist() == expected["cell_key"].tolist()
    assert got["tuning"].tolist() == expected["tuning"].tolist()
    for column in METRICS:  # a trial has no test metrics (NaN): compared as equal
        assert got[column].fillna(-1.0).tolist() == expected[column].fillna(-1.0).tolist(), column


def test_a_worker_killed_mid_cell_has_its_cell_run_again_and_nothing_is_lost(tmp_path: Path, cluster: Cluster) -> None:
    suite = suite_file(tmp_path, "counted")
    cluster.builds.write_text("")
    cluster.hang.touch()
    outcome: list[RunSummary | BaseException] = []

    def drive() -> None:
        try:
            outcome.append(run_suite(suite, db=tmp_path / "r.sqlite", progress=False, threads=1, executor="ray"))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        deadline = time.time() + 600  # generous: a loaded 2-core machine starts Ray workers slowly
        while not cluster.builds.read_text() and time.time() < deadline:
            time.sleep(0.05)
        victim = int(cluster.builds.read_text().split()[3])  # a Ray worker hanging in its first build
        os.kill(victim, signal.SIGKILL)
    finally:
        cluster.hang.unlink()
        driver.join(timeout=300)
    summary = outcome[0]
    assert isinstance(summary, RunSummary), summary
    assert (summary.ok, summary.failed) == (6, 0)
    assert_every_cell_ok_once(tmp_path / "r.sqlite")
    counts = trainings(cluster.builds)
    assert len(counts) == 6 and set(counts.values()) == {1}, counts  # the killed cell trained once, after its retry
    pids = [line.split()[3] for line in cluster.builds.read_text().splitlines()]
    assert pids.count(str(victim)) == 1  # the killed worker got no further than its first build


def stored(db: Path) -> dict[str, tuple]:
    """Each stored cell's key: its status and when it started and finished."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=30) as connection:
            query = "SELECT cell_key, status, started_at, finished_at, wall_seconds FROM cells"
            return {row[0]: row[1:] for row in connection.execute(query)}
    except sqlite3.OperationalError:
        return {}


def test_a_killed_driver_restarted_resumes_without_running_a_finished_cell_again(
    tmp_path: Path, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    suite, db = suite_file(tmp_path, "counted"), tmp_path / "r.sqlite"
    cluster.builds.write_text("")
    command = [sys.executable, "-m", "embbench.cli", "run", "suite", str(suite), "--db", str(db), "--no-progress",
               "--executor", "ray", "--address", cluster.address]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: under load the first cell takes minutes to be stored
    while not stored(db) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert driver.poll() is None, "the driver ended before it could be killed"
    assert stored(db), "no cell was stored within 600 s (the machine is too loaded for this test)"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = stored(db)
    assert 1 <= len(before) < 6

    capsys.readouterr()
    resumed = run_suite(suite, db=db, progress=False, threads=1, executor="ray")  # a new driver, same cluster
    assert (resumed.already_done, resumed.ok, resumed.failed) == (len(before), 6 - len(before), 0)
    after = stored(db)
    assert {key: after[key] for key in before} == before  # finished rows untouched: not run again
    assert_every_cell_ok_once(db)
    # Trainings: one per cell, plus at most the killed driver's tasks in flight (twice the 2 CPUs), unwritten.
    assert 6 <= sum(trainings(cluster.builds).values()) <= 6 + 4
    lines = [line for line in capsys.readouterr().err.splitlines() if re.match(r"\[\d+/\d+\] ok ", line)]
    assert len(lines) == 6 - len(before), lines  # one line per cell this driver stored


def test_a_run_whose_worker_died_every_try_is_stored_failed_with_the_reason_and_runs_again(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'embbench[ray]')")
    from embbench.run.ray_executor import _records, _store
    from embbench.run.sweep import prepare

    prepared = prepare(suite_file(tmp_path, "hashing-trick"))
    run = prepared.runs[0]

    def died(reference: object) -> None:
        raise ray.exceptions.WorkerCrashedError()

    cluster = type("Ray", (), {"get": staticmethod(died), "exceptions": ray.exceptions})
    records = _records(cluster, None, run, list(run.cells), prepared, 1, max_retries=2)
    store = ResultStore(tmp_path / "r.sqlite")
    summary = RunSummary(prepared.suite.name, store.path, total=len(prepared.cells))
    _store(records, list(run.cells), store, "driver", summary, type("Bar", (), {"update": print, "disable": False}))
    frame = rows(tmp_path / "r.sqlite")
    assert frame["status"].tolist() == ["failed"] and summary.failed == 1
    assert "died 3 times" in frame["error"][0] and "WorkerCrashedError" in frame["error"][0]
    assert frame["cell_key"][0] == run.cells[0].key and frame["threads"][0] == 1
    assert store.finished_keys() == set()  # not finished: the next run of the suite trains it


def test_without_ray_the_executor_is_one_error_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite_file(tmp_path, "hashing-trick")), "--db", str(db), "--executor", "ray")
    assert_one_line_error(result, "embbench[ray]")
    assert not db.exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [(["--address", "127.0.0.1:6379"], "--executor ray"), (["--executor", "ray", "--nproc", "2"], "--nproc 2"),
     (["--executor", "ray", "--workers", "2"], "--workers 2")],
)
def test_options_ray_cannot_take_are_one_error_line(tmp_path: Path, options: list[str], fragment: str) -> None:
    db = tmp_path / "r.sqlite"
    result = invoke("run", "suite", str(suite_file(tmp_path, "hashing-trick")), "--db", str(db), *options)
    assert_one_line_error(result, fragment)
    assert not db.exists()
