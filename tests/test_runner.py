"""The runner and store: failures are recorded and the sweep goes on, resume skips finished cells, a killed
run loses nothing finished and leaves nothing half-written, unavailable devices are skipped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from embbench import registry
from embbench.run.store import ResultStore
from embbench.run.sweep import run_suite

DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 150, num_items = 90, interactions_per_user = 6 }\n'
MODEL = '[[models]]\nname = "gmf"\n'


def suite_file(tmp_path, body: str, name: str = "suite.toml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_same_seed_gives_identical_results(tmp_path):
    scheme = '[[schemes]]\nname = "dhe"\nparams = { num_hashes = 16 }\n'
    body = 'epochs = 2\nbudgets = ["1/4"]\n' + DATA + MODEL + scheme
    for db in ("a.sqlite", "b.sqlite"):
        run_suite(str(suite_file(tmp_path, body)), db=tmp_path / db, progress=False)
    first, second = (ResultStore(tmp_path / db).frame() for db in ("a.sqlite", "b.sqlite"))
    for column in ("test_auc", "test_hr10", "val_auc", "size_bytes"):
        assert first[column].tolist() == second[column].tolist()


def test_failing_cell_is_stored_with_traceback_and_the_sweep_goes_on(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "failing_scheme-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: failing-scheme\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[embbench.schemes]\nexplodes = failing_scheme:Explodes\n")
    (site / "failing_scheme.py").write_text(
        "from embbench_plugins.schemes.hashing_trick import HashingTrick\n"
        "class Explodes(HashingTrick):\n"
        "    def build(self, feature, plan, seed):\n"
        "        raise RuntimeError('kaboom in build')\n"
    )
    monkeypatch.syspath_prepend(str(site))
    registry.discover("schemes", refresh=True)
    try:
        body = 'epochs = 1\nbudgets = ["1/4"]\n' + DATA + MODEL + (
            '[[schemes]]\nname = "explodes"\n[[schemes]]\nname = "hashing-trick"\n'
        )
        summary = run_suite(str(suite_file(tmp_path, body)), db=tmp_path / "r.sqlite", progress=False)
    finally:
        registry.discover("schemes", refresh=True)
    assert (summary.ok, summary.failed) == (1, 1)
    frame = ResultStore(tmp_path / "r.sqlite").frame().set_index("scheme")
    assert frame.loc["explodes", "status"] == "failed"
    assert "Traceback" in frame.loc["explodes", "error"] and "kaboom in build" in frame.loc["explodes", "error"]
    assert frame.loc["hashing-trick", "status"] == "ok"


def test_rerun_skips_finished_cells(tmp_path):
    body = 'epochs = 1\nbudgets = ["1/4", "1/8"]\n' + DATA + MODEL + '[[schemes]]\nname = "hashing-trick"\n'
    path = suite_file(tmp_path, body)
    first = run_suite(str(path), db=tmp_path / "r.sqlite", progress=False)
    stamps = ResultStore(tmp_path / "r.sqlite").frame()["finished_at"].tolist()
    second = run_suite(str(path), db=tmp_path / "r.sqlite", progress=False)
    assert (first.ok, second.already_done, second.ok) == (2, 2, 0)
    assert ResultStore(tmp_path / "r.sqlite").frame()["finished_at"].tolist() == stamps


def test_cuda_cells_are_skipped_with_a_reason_where_cuda_is_absent(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    body = 'epochs = 1\ndevices = ["cpu", "cuda"]\nbudgets = ["1/4"]\n' + DATA + MODEL + (
        '[[schemes]]\nname = "hashing-trick"\n'
    )
    summary = run_suite(str(suite_file(tmp_path, body)), db=tmp_path / "r.sqlite", progress=False)
    assert (summary.ok, summary.skipped, summary.failed) == (1, 1, 0)
    frame = ResultStore(tmp_path / "r.sqlite").frame().set_index("device")
    assert frame.loc["cuda", "status"] == "skipped" and "CUDA is not available" in frame.loc["cuda", "error"]


def test_killed_run_keeps_finished_cells_whole_and_resumes(tmp_path):
    budgets = ", ".join(f'"{b}"' for b in ["1/2", "1/3", "1/4", "1/5", "1/6", "1/7", "1/8", "1/9"])
    body = f'epochs = 2\nbudgets = [{budgets}]\n' + DATA + MODEL + '[[schemes]]\nname = "hashing-trick"\n'
    path, db = suite_file(tmp_path, body), tmp_path / "r.sqlite"
    command = [sys.executable, "-m", "embbench.cli", "run", "suite", str(path), "--db", str(db), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rows() -> int:
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(db) as connection:
                return connection.execute("SELECT count(*) FROM cells").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    deadline = time.time() + 300
    while rows() < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    frame = ResultStore(db).frame()
    finished = len(frame)
    assert 2 <= finished < 8, "the run should have been killed midway"
    assert (frame["status"] == "ok").all()
    assert frame[["test_auc", "test_hr10", "size_bytes", "history_json"]].notna().all().all()
    summary = run_suite(str(path), db=db, progress=False)
    assert summary.already_done == finished and summary.ok == 8 - finished
    assert len(ResultStore(db).frame()) == 8


def test_item_features_carry_side_features_aligned_with_their_ids():
    import numpy as np
    import pandas as pd

    from embbench.data import features_of, prepare_split
    from embbench.registry import create_dataset

    split = prepare_split(create_dataset("synthetic", num_users=50, num_items=40, interactions_per_user=5))
    item_ids, _ = split.feature_counts("item")
    side = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}, index=[int(item_ids[1]), int(item_ids[0])])
    features = features_of(split, 8, side)
    assert features["user"].side is None
    item = features["item"]
    assert item.side.shape == (item.num_ids, 2) and item.side.dtype == np.float32
    assert item.side[0].tolist() == [2.0, 4.0] and item.side[1].tolist() == [1.0, 3.0]
    assert not item.side[2:].any()  # items the side table lacks get zeros


def test_a_new_plugin_version_or_thread_count_runs_a_finished_cell_again_and_rerun_forces_it(tmp_path, monkeypatch):
    import torch

    body = 'epochs = 1\nbudgets = ["1/4"]\nlatency_batch_sizes = []\n' + DATA + MODEL + (
        '[[schemes]]\nname = "hashing-trick"\n'
    )
    path, db = suite_file(tmp_path, body), tmp_path / "r.sqlite"
    assert run_suite(str(path), db=db, progress=False).ok == 1
    assert run_suite(str(path), db=db, progress=False).already_done == 1
    stored = ResultStore(db).frame()
    provenance = json.loads(stored["provenance_json"].iloc[0])
    assert provenance["scheme"] == registry.provenance("schemes", "hashing-trick")
    assert provenance["scheme"]["distribution"] == "embbench"

    real = registry.provenance

    def upgraded(kind, name):
        origin = real(kind, name)
        return {**origin, "version": "99.0"} if name == "hashing-trick" else origin

    monkeypatch.setattr(registry, "provenance", upgraded)
    again = run_suite(str(path), db=db, progress=False)
    assert (again.already_done, again.ok) == (0, 1)  # the changed plugin's cell is not "the same" any more
    monkeypatch.setattr(registry, "provenance", real)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert run_suite(str(path), db=db, progress=False).ok == 1  # another thread count: another cell
    finally:
        torch.set_num_threads(threads)
    assert run_suite(str(path), db=db, progress=False).already_done == 1
    forced = run_suite(str(path), db=db, progress=False, rerun=True)
    assert (forced.already_done, forced.ok) == (0, 1)
    assert len(ResultStore(db).frame()) == 3  # one row per identity: the first, the new version, the thread count
