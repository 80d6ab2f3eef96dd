"""`embbench run suite --nnodes 2 --node-rank {0,1} --rdzv-endpoint HOST:PORT`: one cell trained over two torchrun
"nodes" (two launches on localhost, one gloo process each) gives the results of one process; node 0 alone
writes the database, and node 1 never opens or creates the path it was given. Each mistake in the node options
is one `error:` line."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, invoke

from embbench.collection import torchrec_available
from embbench.distributed.launch import Nodes, resolve_nodes, torchrun_command

SUITE = """
name = "two-nodes"
epochs = 2
budgets = ["1/2"]
shardings = ["row-wise"]
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
COLUMNS = "sharding, world_size, status, test_auc, val_auc, test_hr10"


def command(tmp_path: Path, db: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embbench.cli", "run", "suite", str(tmp_path / "suite.toml"), "--db", str(db),
            "--no-progress", *extra]


def environment(cache: Path) -> dict[str, str]:
    # Each "node" has its own dataset cache, as separate machines would; a hung rendezvous fails in 2 minutes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "EMBBENCH_CACHE_DIR": str(cache), "EMBBENCH_DIST_TIMEOUT_S": "120"}


def stored(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(f"select {COLUMNS} from cells order by sharding").fetchall()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not torchrec_available(), reason="sharding needs torchrec")
def test_two_nodes_on_localhost_match_one_process_and_only_node_zero_writes(tmp_path: Path) -> None:
    (tmp_path / "suite.toml").write_text(SUITE)
    port = free_port()
    one = tmp_path / "one.sqlite"
    # On node 1 the path cannot even be created (a file stands where its folder would be): no rank there may try.
    blocker = tmp_path / "node1-has-a-file-here"
    blocker.write_text("not a folder")
    written, elsewhere = tmp_path / "node0" / "r.sqlite", blocker / "r.sqlite"
    node_options = ["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two"]
    launches = [  # the one-process reference runs beside the two nodes: most of each is starting Python
        (command(tmp_path, one), tmp_path / "cache"),
        (command(tmp_path, written, *node_options, "--node-rank", "0"), tmp_path / "cache0"),
        (command(tmp_path, elsewhere, *node_options, "--node-rank", "1"), tmp_path / "cache1"),
    ]
    processes = [subprocess.Popen(argv, env=environment(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for argv, cache in launches]
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "suite two-nodes: 1 cells" in outputs[1][0] and "suite two-nodes" not in outputs[2][0]
    assert blocker.read_text() == "not a folder"  # node 1's ranks never opened nor created its --db

    single_rows, node_rows = stored(one), stored(written)
    assert [row[:3] for row in single_rows] == [("row-wise", 1, "ok")]
    assert [row[:3] for row in node_rows] == [("row-wise", 2, "ok")]
    for alone, spread in zip(single_rows, node_rows, strict=True):
        # As for two processes on one node (tests/test_distributed_runner.py): the same global batches, so the
        # same numbers up to the order of reductions.
        assert spread[3:] == pytest.approx(alone[3:], abs=1e-6)
    assert single_rows[0][3] > 0.6  # the tables learned: not a comparison of two untrained models


def test_torchrun_gets_the_node_options_and_one_node_stays_standalone() -> None:
    nodes = resolve_nodes(3, 2, "node0:29500", "sweep-7")
    assert torchrun_command(2, ["-m", "x"], nodes)[3:] == [
        "--nnodes", "3", "--rdzv-backend", "static", "--rdzv-endpoint", "node0:29500", "--rdzv-id", "sweep-7",
        "--node-rank", "2", "--nproc-per-node", "2", "-m", "x",
    ]
    assert "--node-rank" not in torchrun_command(1, ["x"], resolve_nodes(2, None, "[::1]:29500", None, "c10d"))
    assert torchrun_command(2, ["x"], resolve_nodes())[3:5] == ["--standalone", "--nproc-per-node"]
    assert resolve_nodes(1, 0) == Nodes()


def test_only_the_node_that_may_hold_rank_zero_touches_the_database() -> None:
    assert resolve_nodes(2, 0, "h:1").may_hold_rank_zero and not resolve_nodes(2, 1, "h:1").may_hold_rank_zero
    assert resolve_nodes(2, None, "h:1", None, "c10d").may_hold_rank_zero  # c10d: any node may become rank 0


@pytest.mark.parametrize(("options", "fragments"), [
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29500"], ["--node-rank 2", "0 to 1"]),
    (["--node-rank", "1"], ["--node-rank 1", "--nnodes 1"]),
    (["--nnodes", "2", "--node-rank", "0"], ["--rdzv-endpoint HOST:PORT"]),
    (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "node0"], ["'node0'", "HOST:PORT"]),
    (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "node0:99999"], ["from 1 to 65535"]),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:29500"], ["needs --node-rank", "$SLURM_NODEID"]),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:1", "--rdzv-backend", "c10d"],
     ["--node-rank is not used by --rdzv-backend c10d"]),
    (["--rdzv-endpoint", "node0:29500"], ["--rdzv-endpoint", "several machines"]),
    (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h:1", "--rdzv-id", "a b"], ["--rdzv-id 'a b'"]),
    (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h:1", "--workers", "2"],
     ["--workers 2 cannot be combined with --nnodes 2"]),
])
def test_each_mistake_in_the_node_options_is_one_error_line_and_nothing_is_written(
    tmp_path: Path, options: list[str], fragments: list[str]
) -> None:
    (tmp_path / "suite.toml").write_text(SUITE)
    db = tmp_path / "r.sqlite"
    assert_one_line_error(invoke("run", "suite", str(tmp_path / "suite.toml"), "--db", str(db), *options),
                          *fragments)
    assert not db.exists()
