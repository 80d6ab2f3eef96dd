"""Running a suite's training runs as Ray tasks (``embbench run suite S --executor ray``): the driver claims cells
through the store's leases, submits each training run as one task, and alone writes each result as it returns.

How it is run and what must be where (the data directory on every node): docs/cluster.md.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm.auto import tqdm

from embbench.distributed.launch import launched_by_torchrun
from embbench.errors import ConfigError, EmbbenchError
from embbench.measure.environment import available_memory_bytes, host
from embbench.run.cells import Cell
from embbench.run.execute import base_record, execute, now
from embbench.run.resolve import Run, resolve_runs
from embbench.run.store import DEFAULT_DB, LEASE_SECONDS, ResultStore, new_owner
from embbench.run.suites import find_suite, parse_suite
from embbench.run.sweep import (
    POLL_SECONDS,
    Prepared,
    RunSummary,
    _single_process_group,
    cell_line,
    count_unplannable,
    prepare,
)
from embbench.run.tuning import resolve_each, tuning_rounds

#: how Ray is installed, named in the error when it is not
RAY_EXTRA = "pip install 'embbench[ray]'"

#: times Ray runs a task again whose worker process or node died (an exception raised by the task is not retried)
MAX_RETRIES = 2


@dataclass(frozen=True)
class RunJob:
    """One training run as shipped to a Ray worker: plain data, so that any node can take it. The worker reads the
    suite from its text, prepares it as the driver did and trains run ``run_index`` for the cells ``keys``."""

    suite_text: str
    suite_file: str  # the file's name: its stem names a suite whose file names none
    quick: bool
    data_dir: str | None  # None: each worker's default ($EMBBENCH_DATA_DIR, else ~/.cache/embbench/data)
    threads: int
    run_index: int
    keys: tuple[str, ...]
    #: the run's cells themselves, for runs the suite file alone does not give (a tuned suite's trials and chosen
    #: configurations, made on the driver from stored results): plain dataclasses, resolved again on the worker
    cells: tuple[Cell, ...] = ()


def import_ray() -> ModuleType:
    """The ``ray`` module, or one ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed here; install it: {RAY_EXTRA}") from None
    return ray


# -- the worker side ---------------------------------------------------------------------------------------------

#: the suite this worker process prepared last (its datasets loaded), reused by the next run of the same suite
_prepared: dict[tuple[Any, ...], Prepared] = {}


def _prepared_for(job: RunJob) -> Prepared:
    key = (job.suite_text, job.suite_file, job.quick, job.data_dir, job.threads)
    if key not in _prepared:
        _prepared.clear()  # one suite at a time: its datasets may be large
        folder = Path(tempfile.mkdtemp(prefix="embbench-ray-"))
        try:
            path = folder / job.suite_file
            path.write_text(job.suite_text, encoding="utf-8")
            _prepared[key] = prepare(parse_suite(path, quick=job.quick), job.data_dir)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return _prepared[key]


def train_job(job: RunJob) -> list[dict[str, Any]]:
    """Train one shipped training run here (a Ray worker) and give its records, one per key of ``job``."""
    torch.set_num_threads(job.threads)  # before the cells are made: their identity holds the thread count
    prepared = _prepared_for(job)
    if job.cells:
        runs = resolve_runs(list(job.cells), prepared.task, prepared.data, available_memory_bytes())
        run = runs[0] if len(runs) == 1 else None
    else:
        run = prepared.runs[job.run_index] if job.run_index < len(prepared.runs) else None
    if run is None or not set(job.keys) <= {cell.key for cell in run.cells}:
        raise EmbbenchError(
            f"the cells of training run {job.run_index} differ on Ray node {host()} from the driver's; install the "
            "same embbench, plugins and plugin versions on every node"
        )
    if run.placement is not None and run.placement.sharding is not None:
        _single_process_group()  # as the in-process runner does: a process group of one, per worker process
    return execute(run, prepared.task, prepared.data[run.trained.dataset.label], set(job.keys), None, True)


# -- the driver side ---------------------------------------------------------------------------------------------


def run_suite_on_ray(
    name_or_path: str | Path,
    db: str | Path = DEFAULT_DB,
    data_dir: str | Path | None = None,
    quick: bool = False,
    progress: bool = True,
    rerun: bool = False,
    threads: int | None = None,
    address: str | None = None,
    max_in_flight: int | None = None,
    max_retries: int = MAX_RETRIES,
    lease_seconds: float = LEASE_SECONDS,
) -> RunSummary:
    """Run every unfinished cell of a suite as Ray tasks, one task per training run, into ``db``.

    The suite is validated and resolved here first, exactly as :func:`embbench.run.sweep.run_suite` does, so its
    cells have the same keys. Each run's unfinished cells are claimed in the database (the leases the in-process
    runners use, so both kinds of runner can share a database) just before its task is submitted, at most
    ``max_in_flight`` tasks at a time (default: twice the cells the cluster can train at once); each task asks for
    ``threads`` CPUs (default: this process's torch threads, which train each cell) and one GPU for a cuda cell.
    Records come back to this process, which alone writes them. A task whose worker or node died is run again
    by Ray up to ``max_retries`` times; after that its cells are stored as failed with the reason (a later run
    runs them again). ``address`` is a Ray cluster's; without it, Ray starts here with this machine's cores
    (within a process already connected to Ray, that connection is used).
    """
    ray = import_ray()
    if launched_by_torchrun():
        raise ConfigError("--executor ray cannot be combined with --nproc > 1: each Ray task trains a cell in one "
                          "process; run without --nproc")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, not {threads}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ConfigError(f"max_in_flight must be at least 1, not {max_in_flight}")
    store = ResultStore(db)
    store.check(writable=True)
    path = find_suite(name_or_path)
    text = path.read_text(encoding="utf-8")  # what the workers read: the file as it was when it was checked
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the cells' identity holds the thread count their workers train with
    try:
        suite = parse_suite(path, quick=quick)
        prepared = prepare(suite, data_dir)
    finally:
        torch.set_num_threads(previous_threads)
    shipped = RunJob(text, path.name, quick, None if data_dir is None else str(Path(data_dir).resolve()), threads,
                     run_index=-1, keys=())  # each task's run and keys filled in when it is submitted
    started_here = _connect(ray, address)
    try:
        return _drive(ray, prepared, store, shipped, progress, rerun, max_in_flight, max_retries, lease_seconds)
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Connect to the cluster at ``address``, or start Ray here; True when this call connected (and so must
    disconnect). A process already connected keeps its connection."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        detail = " ".join(str(exc).split())[:300]
        hint = ("start one with `ray start --head` and pass its address as --address HOST:PORT; a cluster with "
                "Ray's token authentication also needs RAY_AUTH_MODE=token and its token (docs/cluster.md)")
        raise ConfigError(f"cannot connect to {where}: {detail}; {hint}") from None
    return True


def _capacity(ray: ModuleType, threads: int) -> tuple[int, bool]:
    """How many cells of ``threads`` CPUs the cluster trains at once, and whether it has GPUs; refuses a thread
    count no node can give."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most = max((int(resources.get("CPU", 0)) for resources in nodes), default=0)
    if threads > most:
        raise ConfigError(
            f"cells train with {threads} torch threads, a Ray task asking for {threads} CPUs, but no node of the Ray "
            f"cluster has more than {most}; run with OMP_NUM_THREADS={max(most, 1)} or fewer"
        )
    slots = sum(int(resources.get("CPU", 0)) // threads for resources in nodes)
    return max(1, slots), any(resources.get("GPU", 0) > 0 for resources in nodes)


def _gpus(run: Run, cluster_has_gpus: bool) -> int:
    """1 for a run that trains on a GPU, when the cluster has one (without, its worker skips it: no CUDA)."""
    return int(cluster_has_gpus and run.trained.device in ("cuda", "auto"))


def _drive(
    ray: ModuleType, prepared: Prepared, store: ResultStore, shipped: RunJob, progress: bool, rerun: bool,
    max_in_flight: int | None, max_retries: int, lease_seconds: float,
) -> RunSummary:
    """Claim, submit, collect and write until every cell of ``prepared`` is finished (here or by other runners);
    for a tuned suite, then its trials round by round and its chosen configurations (cells shipped as data)."""
    started = time.time()  # cells other runners finish from now on are this sweep's too
    slots, cluster_has_gpus = _capacity(ray, shipped.threads)
    limit = max_in_flight or 2 * slots
    summary = RunSummary(prepared.suite.name, store.path, total=0)
    bar = tqdm(total=0, desc=summary.suite, unit="cell", disable=not progress, dynamic_ncols=True)
    remote = ray.remote(train_job)
    owner = new_owner()
    poll_seconds = min(POLL_SECONDS, lease_seconds / 4)
    in_flight: dict[Any, tuple[Run, list[Cell]]] = {}

    def run_batch(batch: list[tuple[Run, RunJob]], done: set[str]) -> None:
        queue: collections.deque[tuple[Run, RunJob, list[Cell]]] = collections.deque()
        for run, job in batch:
            cells = [cell for cell in run.cells if cell.key not in done]
            if cells:
                queue.append((run, job, cells))
        total = sum(len(run.cells) for run, _ in batch)
        summary.total += total
        summary.already_done += total - sum(len(cells) for _, _, cells in queue)
        bar.total = summary.total - summary.already_done
        bar.refresh()
        waiting: list[tuple[Run, RunJob, list[Cell]]] = []  # cells other runners hold: claimed again now and then
        looked = time.monotonic()
        while queue or in_flight or waiting:
            if waiting and (not queue and (not in_flight or time.monotonic() - looked > poll_seconds)):
                if not in_flight:  # every remaining cell is another runner's: wait for its row or lease
                    bar.set_postfix_str(f"waiting for {sum(len(c) for _, _, c in waiting)} cells of other runners")
                    time.sleep(poll_seconds)
                queue.extend(waiting)
                waiting, looked = [], time.monotonic()
            while queue and len(in_flight) < limit:
                run, job, cells = queue.popleft()
                claim = store.claim([cell.key for cell in cells], owner, lease_seconds, started, rerun)
                summary.elsewhere += len(claim.finished)
                bar.update(len(claim.finished))
                if claim.leased:
                    waiting.append((run, job, [cell for cell in cells if cell.key in set(claim.leased)]))
                mine = [cell for cell in cells if cell.key in set(claim.taken)]
                if mine:
                    task = dataclasses.replace(job, keys=tuple(cell.key for cell in mine))
                    options = {"num_cpus": shipped.threads, "num_gpus": _gpus(run, cluster_has_gpus),
                               "max_retries": max_retries, "retry_exceptions": False,
                               "name": f"embbench {run.trained.describe()}"}
                    in_flight[remote.options(**options).remote(task)] = (run, mine)
            if not in_flight:
                continue
            bar.set_postfix_str(f"{len(in_flight)} runs on Ray")
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_seconds)
            for reference in ready:
                run, cells = in_flight.pop(reference)
                records = _records(ray, reference, run, cells, prepared, shipped.threads, max_retries)
                _store(records, cells, store, owner, summary, bar)
                bar.set_postfix_str(cells[0].describe())

    try:
        with store.keep_leases(owner, lease_seconds):
            done = set() if rerun else store.finished_keys()
            run_batch([(run, dataclasses.replace(shipped, run_index=index))
                       for index, run in enumerate(prepared.runs)], done)
            if prepared.suite.tuning is not None:
                for cells in tuning_rounds(prepared.suite, prepared.cells, store.rows, summary.failures):
                    runs, unplannable = resolve_each(cells, prepared.task, prepared.data, available_memory_bytes())
                    finished = set() if rerun else store.finished_keys()
                    for record in unplannable:
                        store.write(record)  # a failed row: never replaces an ok one
                        count_unplannable(summary, record)
                    run_batch([(run, dataclasses.replace(shipped, cells=tuple(run.cells))) for run in runs], finished)
    finally:
        for reference in in_flight:  # interrupted: the cells go back to the database unwritten
            with contextlib.suppress(Exception):  # Ray itself may be what failed
                ray.cancel(reference, force=True)
        bar.close()
    return summary


def _records(
    ray: ModuleType, reference: Any, run: Run, cells: list[Cell], prepared: Prepared, threads: int, max_retries: int,
) -> list[dict[str, Any]]:
    """The records a finished task gave, or failed records saying why it gave none."""
    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as exc:  # the task raised (training failures are records, not this)
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        reason = f"the Ray task training this cell raised {type(cause).__name__}: {cause}"
    except ray.exceptions.RayError as exc:  # the worker or its node died, every try
        detail = " ".join(str(exc).split())[:500]
        reason = (f"the Ray worker training this cell died {max_retries + 1} times ({type(exc).__name__}: {detail}); "
                  "a later run of the suite runs it again")
    features = prepared.data[run.trained.dataset.label].features
    return [
        {**base_record(cell, run, features), "threads": threads, "status": "failed", "error": reason,
         "finished_at": now(), "wall_seconds": 0.0}
        for cell in cells
    ]


def _store(
    records: list[dict[str, Any]], cells: list[Cell], store: ResultStore, owner: str, summary: RunSummary, bar: Any,
) -> None:
    """Write each record (releasing its lease) and count it, as the in-process runner does; without a progress bar,
    one line per finished cell on stderr."""
    for cell, record in zip(cells, records, strict=True):
        if record["cell_key"] != cell.key:
            raise EmbbenchError(f"a Ray worker gave the record of cell {record['cell_key']} for {cell.key}")
        store.write(record, lease_owner=owner)
        status = record["status"]
        setattr(summary, status, getattr(summary, status) + 1)
        if status == "failed":
            last_line = (str(record.get("error") or "").strip().splitlines() or ["?"])[-1]
            summary.failures.append(f"{cell.describe()}: {last_line}")
        bar.update(1)
        if bar.disable:
            done = summary.ok + summary.failed + summary.skipped + summary.elsewhere
            print(cell_line(cell, record, done, summary.total - summary.already_done), file=sys.stderr, flush=True)
