"""The cost of `--executor ray` on one machine: a synthetic suite run by the in-process runner and by Ray started
locally, one torch thread per cell in both (so their cells are the same cells); prints wall times, their ratio and
the slot-seconds per cell not spent training. A script, not an asv benchmark (it starts Ray):

    python benchmarks/ray_overhead.py [--cells 12]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def suite_text(cells: int) -> str:
    budgets = ", ".join(f'"1/{2 + index}"' for index in range(cells // 2))
    return (
        f"epochs = 2\nbudgets = [{budgets}]\nseeds = [0, 1]\nlatency_batch_sizes = []\n"
        '[[datasets]]\nname = "synthetic"\nparams = { num_users = 600, num_items = 300, interactions_per_user = 10 }\n'
        '[[models]]\nname = "gmf"\n[[schemes]]\nname = "hashing-trick"\n'
    )


def timed_run(suite: Path, db: Path, *options: str) -> float:
    command = [sys.executable, "-m", "embbench.cli", "run", "suite", str(suite), "--db", str(db), "--no-progress",
               *options]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def cells_of(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as connection:
        return dict(connection.execute("SELECT cell_key, wall_seconds FROM cells WHERE status = 'ok'").fetchall())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12, help="cells of the suite (even)")
    cells = parser.parse_args().cells
    slots = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="embbench-ray-bench-") as folder:
        suite = Path(folder) / "bench.toml"
        suite.write_text(suite_text(cells))
        here_db, ray_db = Path(folder) / "here.sqlite", Path(folder) / "ray.sqlite"
        here_wall = timed_run(suite, here_db)
        ray_wall = timed_run(suite, ray_db, "--executor", "ray")
        here, on_ray = cells_of(here_db), cells_of(ray_db)
    assert set(here) == set(on_ray) and len(here) == cells, "the two runs stored different cells"
    load = os.getloadavg()
    print(f"{cells} cells, {slots} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"in-process: {here_wall:.1f} s wall, cells trained {sum(here.values()):.1f} s "
          f"({(here_wall - sum(here.values())) / cells:.2f} s per cell besides training)")
    print(f"ray:        {ray_wall:.1f} s wall, cells trained {sum(on_ray.values()):.1f} s "
          f"({(slots * ray_wall - sum(on_ray.values())) / cells:.2f} CPU-slot s per cell besides training)")
    print(f"wall-time ratio ray / in-process: {ray_wall / here_wall:.2f}")


if __name__ == "__main__":
    main()
