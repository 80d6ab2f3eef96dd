"""A suite run killed with SIGKILL again and again, at seeded random moments, then finished: every cell is
stored once, ok, and with the same numbers as an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from embbench.run.store import ResultStore

KILLS = 10
BUDGETS = ["1/2", "1/3", "1/4", "1/5", "1/6", "1/7"]
SUITE = (
    "epochs = 1\nlatency_batch_sizes = []\nseeds = [0, 1]\n"
    f"budgets = [{', '.join(repr(b).replace(chr(39), chr(34)) for b in BUDGETS)}]\n"
    '[[datasets]]\nname = "synthetic"\nparams = { num_users = 120, num_items = 80, interactions_per_user = 5 }\n'
    '[[models]]\nname = "gmf"\n[[schemes]]\nname = "hashing-trick"\n'
)
CELLS = 2 * len(BUDGETS)
METRICS = ["test_auc", "test_hr10", "test_ndcg10", "val_auc", "size_bytes"]


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as connection:
            return connection.execute("SELECT count(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_ten_kills_lose_nothing_finished_duplicate_nothing_and_change_no_number(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text(SUITE)
    db = tmp_path / "killed.sqlite"
    command = [sys.executable, "-m", "embbench.cli", "run", "suite", str(path), "--db", str(db), "--no-progress"]
    rng = random.Random(11)
    kills = 0
    while kills < KILLS and stored(db) < CELLS:
        before = stored(db)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Kill at a random moment once this run has started working: after it stored a cell, or at a random
        # time while it imports, builds or trains (half of the kills each).
        deadline = time.time() + 120
        if rng.random() < 0.5:
            while stored(db) <= before and process.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            time.sleep(rng.uniform(0.5, 6.0))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        frame = ResultStore(db).frame() if db.exists() else None
        if frame is not None and len(frame):  # whatever was stored is whole and ok
            assert (frame["status"] == "ok").all() and frame["cell_key"].is_unique
            assert frame[METRICS].notna().all().all()
    assert kills == KILLS
    # The same thread count as the killed runs (it is part of a cell's identity): finish, then run clean.
    clean_db = tmp_path / "clean.sqlite"
    for target in (db, clean_db):
        finish = [*command[:-3], "--db", str(target), "--no-progress"]
        subprocess.run(finish, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = ResultStore(db).frame().sort_values("cell_key", ignore_index=True)
    clean = ResultStore(clean_db).frame().sort_values("cell_key", ignore_index=True)
    assert len(killed) == CELLS and killed["cell_key"].is_unique and (killed["status"] == "ok").all()
    assert killed["cell_key"].tolist() == clean["cell_key"].tolist()
    for column in METRICS:
        assert killed[column].tolist() == clean[column].tolist(), column
