"""`embbench run suite --nproc 2`: the same suite file, trained over two torchrun processes (gloo), gives the
results of one process for the same seed; the sharding type and optimizers are recorded."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from embbench.collection import torchrec_available

pytestmark = pytest.mark.skipif(not torchrec_available(), reason="sharding needs torchrec")

SUITE = """
name = "sharded"
epochs = 2
budgets = ["1/2"]
shardings = ["table-wise", "row-wise"]
embedding_optimizers = ["adagrad"]
embedding_learning_rate = 0.05
latency_batch_sizes = []
[[datasets]]
name = "synthetic"
params = { num_users = 300, num_items = 200, interactions_per_user = 8 }
[[models]]
name = "gmf"
[[schemes]]
name = "hashing-trick"
"""
COLUMNS = "sharding, world_size, embedding_optimizer, dense_optimizer, status, test_auc, val_auc, test_hr10"


def run(tmp_path: Path, db: str, *extra: str) -> list[tuple]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBBENCH_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "embbench.cli", "run", "suite", str(tmp_path / "suite.toml"),
               "--db", str(tmp_path / db), "--no-progress", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(tmp_path / db) as connection:
        return connection.execute(f"select {COLUMNS} from cells order by sharding").fetchall()


def test_two_processes_match_one_process_for_table_wise_and_row_wise(tmp_path):
    (tmp_path / "suite.toml").write_text(SUITE)
    one = run(tmp_path, "one.sqlite")
    two = run(tmp_path, "two.sqlite", "--nproc", "2")
    assert [row[:5] for row in one] == [
        ("row-wise", 1, "adagrad", "adam", "ok"), ("table-wise", 1, "adagrad", "adam", "ok")
    ]
    assert [row[:5] for row in two] == [
        ("row-wise", 2, "adagrad", "adam", "ok"), ("table-wise", 2, "adagrad", "adam", "ok")
    ]
    for single, double in zip(one, two, strict=True):
        # Measured: identical to the last digit here; the stated tolerance allows for reduction order.
        assert double[5:] == pytest.approx(single[5:], abs=1e-6)
    assert one[0][5] > 0.6  # the tables learned: not a comparison of two untrained models
