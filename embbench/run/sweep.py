"""The sweep: validate and resolve a whole suite up front (:func:`prepare`), then run each unfinished training
run into the results store (:func:`run_suite`).

Everything that can be checked before training is checked before the database is touched: the schema, plugin
names and parameters, the data files, every scheme's plan at every budget and every placement. A run that
raises is stored as failed with its traceback and the sweep goes on; a run this machine cannot hold (memory,
a missing GPU or library) is stored as skipped with the reason.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from embbench import registry
from embbench.bags import attach_bags
from embbench.data import LEAVE_LAST_OUT
from embbench.distributed import barrier, init_from_env
from embbench.distributed.launch import launched_by_torchrun
from embbench.errors import ConfigError, EmbbenchError
from embbench.measure.environment import available_memory_bytes
from embbench.models import RESERVED_ARGUMENTS
from embbench.run.cells import Cell
from embbench.run.execute import execute
from embbench.run.resolve import MEMORY_HEADROOM, Run, resolve_runs
from embbench.run.settings import split_protocol
from embbench.run.store import DEFAULT_DB, LEASE_SECONDS, ResultStore, new_owner
from embbench.run.suites import Entry, Suite, find_suite, parse_suite
from embbench.run.tuning import check_suite_tuning, resolve_each, tuning_rounds
from embbench.tasks import Task, TaskData
from embbench.training import DEFAULT_MONITOR, NO_EARLY_STOPPING


@dataclass
class Prepared:
    """A validated suite: its task, each dataset prepared for it (by label), and every training run resolved."""

    suite: Suite
    task: Task
    data: dict[str, TaskData]
    runs: list[Run]

    @property
    def cells(self) -> list[Any]:
        return [cell for run in self.runs for cell in run.cells]


@dataclass
class RunSummary:
    suite: str
    db: Path
    total: int = 0
    already_done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    elsewhere: int = 0  # finished by other runners sharing the database while this one ran
    failures: list[str] = field(default_factory=list)


def load_suite(name_or_path: str | Path, quick: bool = False) -> Suite:
    """A shipped suite by name, or a suite file by path, read and validated (schema only)."""
    return parse_suite(find_suite(name_or_path), quick=quick)


#: most seconds a runner waits before looking again at cells other runners are training
POLL_SECONDS = 5.0

#: where cells run: in this process (or ``workers`` processes here), or as tasks of a Ray cluster
EXECUTORS = ("in-process", "ray")

#: fp32 copies of every dense parameter while training with Adam: weights, gradients, two moments
DENSE_TRAINING_COPIES = 4


def _check_model_entry(entry: Entry, task: Task, dim: int) -> None:
    reserved = set(entry.params) & set(RESERVED_ARGUMENTS)
    if reserved:
        raise ConfigError(f"{entry.where}: '{sorted(reserved)[0]}' is set by embbench and cannot be a model parameter")
    model_class = registry.get_plugin("models", entry.name)
    if not (isinstance(model_class, type) and issubclass(model_class, task.model_api)):
        raise ConfigError(
            f"{entry.where}: model '{entry.name}' is not a {task.model_api.__name__}, which task "
            f"'{type(task).__name__}' trains; see `embbench list models`"
        )
    registry.check_params("models", entry.name, entry.params, entry.where)
    try:  # built on the meta device: parameters are checked and counted, nothing is allocated
        with torch.device("meta"):
            probe = task.probe_model(model_class, dim, dict(entry.params))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{entry.where}: {exc}") from None
    except Exception:  # a model whose constructor needs real tensors: built for real
        try:
            probe = task.probe_model(model_class, dim, dict(entry.params))
        except (TypeError, ValueError, RuntimeError, MemoryError) as exc:
            raise ConfigError(f"{entry.where}: model '{entry.name}' cannot be built: {exc}") from None
    dense = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    available = available_memory_bytes()
    training = DENSE_TRAINING_COPIES * dense  # weights, gradients and Adam's two moments
    if available is not None and training > MEMORY_HEADROOM * available:
        raise ConfigError(
            f"{entry.where}: model '{entry.name}' has {dense:,} bytes of dense parameters, about {training:,} "
            f"while training with Adam, more than {MEMORY_HEADROOM:.0%} of the {available:,} bytes this machine "
            "has available; use smaller layers"
        )


def _provenance(suite: Suite) -> dict[str, Any]:
    """Distribution and version of every plugin the suite uses, keyed "kind:name"."""
    used = [("tasks", suite.settings["task"])]
    used += [("datasets", e.name) for e in suite.datasets] + [("models", e.name) for e in suite.models]
    used += [("schemes", e.name) for e in suite.schemes]
    return {f"{kind[:-1]}:{name}": registry.provenance(kind, name) for kind, name in used}


def prepare(
    suite: Suite | str | Path, data_dir: str | Path | None = None, quick: bool = False, world_size: int = 1
) -> Prepared:
    """Validate every name and parameter of ``suite`` (a Suite, or a shipped suite's name or a file's path, read
    with its ``[quick]`` profile when ``quick``), load and split its datasets, and resolve every training run
    (plans, placements, refusals) for a run over ``world_size`` processes."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite, quick)
    settings = suite.settings
    where = f"{suite.path}: task"
    task: Task = registry.create("tasks", settings["task"], where=where)
    if settings["early_stopping"] not in (*task.early_stopping, NO_EARLY_STOPPING):
        raise ConfigError(
            f"{suite.path}: early_stopping '{settings['early_stopping']}' is not a metric of task "
            f"'{settings['task']}'; use one of {', '.join(task.early_stopping)}, or {NO_EARLY_STOPPING}"
        )
    if settings["early_stopping"] == NO_EARLY_STOPPING and DEFAULT_MONITOR not in task.metrics:
        raise ConfigError(
            f"{suite.path}: early_stopping 'none' watches {DEFAULT_MONITOR} for lr_schedule and target_val_metric, "
            f"which task '{settings['task']}' does not measure; use one of {', '.join(task.early_stopping)}"
        )
    protocol = split_protocol(settings, str(suite.path))
    if protocol.kind not in task.splits:
        raise ConfigError(
            f"{suite.path}: split '{protocol.kind}' is not one task '{settings['task']}' holds data out by; use "
            f"{' or '.join(task.splits)}"
        )
    split_argument = {} if protocol.kind == LEAVE_LAST_OUT else {"split": protocol}
    for entry in suite.schemes:
        registry.create("schemes", entry.name, where=entry.where, **entry.params)
    for entry in suite.models:
        _check_model_entry(entry, task, settings["dim"])
    data = {}
    # every bag feature a cell embeds is attached once; each run plans and builds only its own (select_bags)
    bags = list(dict.fromkeys([*settings["bags"], *(bag for entry in suite.schemes for bag in entry.bags or ())]))
    for entry in suite.datasets:
        registry.check_params("datasets", entry.name, entry.params, entry.where)
        dataset = registry.create("datasets", entry.name, where=entry.where, data_dir=data_dir, **entry.params)
        try:
            prepared = task.prepare(dataset, settings["dim"], **split_argument)
            data[entry.label] = attach_bags(task, dataset, prepared, bags)
        except EmbbenchError as exc:
            raise type(exc)(f"{entry.where}: {exc}") from None
    check_suite_tuning(suite)
    cells = suite.cells(world_size, _provenance(suite), torch.get_num_threads())
    runs = resolve_runs(cells, task, data, available_memory_bytes())
    return Prepared(suite, task, data, runs)


def run_suite(
    name_or_path: str | Path,
    db: str | Path = DEFAULT_DB,
    data_dir: str | Path | None = None,
    quick: bool = False,
    progress: bool = True,
    rerun: bool = False,
    workers: int = 1,
    threads: int | None = None,
    lease_seconds: float = LEASE_SECONDS,
    executor: str = "in-process",
    address: str | None = None,
) -> RunSummary:
    """Run every cell of a suite that is not already finished in ``db`` (every cell, with ``rerun``: its
    stored row is replaced).

    Each cell is claimed in the database before it trains (a lease of ``lease_seconds``, renewed while this
    runner lives), so any number of runners on one database — processes on this machine, or machines sharing
    the file — split the suite and train each cell once; each returns when every cell is finished, taking
    over the cells of a runner whose leases expired. ``workers`` > 1 starts that many runner processes here,
    each with its share of the torch threads (``threads`` sets this runner's).

    Under torchrun (``embbench run suite --nproc N``) every rank runs this: all ranks train each cell together
    and rank 0 alone claims cells and writes the results. A sharded cell in a single process runs in a process
    group of one, the same code path.

    ``executor="ray"`` runs the cells as Ray tasks instead, on the cluster at ``address`` or on a Ray started
    here (:func:`embbench.run.ray_executor.run_suite_on_ray`; docs/cluster.md).
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor '{executor}' is not one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        if workers > 1:
            raise ConfigError(f"--workers {workers} cannot be combined with --executor ray, which trains as many "
                              "cells at once as the Ray cluster has CPUs for; run without --workers")
        from embbench.run.ray_executor import run_suite_on_ray

        return run_suite_on_ray(name_or_path, db, data_dir, quick, progress, rerun, threads, address,
                                lease_seconds=lease_seconds)
    if address is not None:
        raise ConfigError("--address names a Ray cluster, which only --executor ray uses; add --executor ray")
    store = ResultStore(db)
    if not launched_by_torchrun():  # under torchrun, rank 0 alone checks it (_sweep): other nodes may lack the path
        store.check(writable=True)  # a damaged or foreign file is refused before anything is loaded or trained
    if workers > 1:
        return _run_workers(name_or_path, db, data_dir, quick, rerun, workers, lease_seconds)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # before the cells are made: their identity holds the thread count
    try:
        return _sweep(name_or_path, store, data_dir, quick, progress, rerun, lease_seconds)
    finally:
        torch.set_num_threads(previous_threads)


def _sweep(
    name_or_path: str | Path, store: ResultStore, data_dir: str | Path | None, quick: bool, progress: bool,
    rerun: bool, lease_seconds: float,
) -> RunSummary:
    started = time.time()  # cells other runners finish from now on are this sweep's too
    suite = load_suite(name_or_path, quick)
    devices = suite.settings["devices"]
    on_gpu = torch.cuda.is_available() and ("cuda" in devices or "auto" in devices)
    rank, world = init_from_env("cuda" if on_gpu else "cpu")  # nccl for GPU runs, gloo otherwise
    main = rank == 0
    if launched_by_torchrun():
        # Rank 0 alone opens the database (on another node its path may not exist) and tells every rank what it
        # found, so that all of them stop alike.
        refusal = _from_main(_refusal(store) if main else None, world)
        if refusal is not None:
            raise EmbbenchError(refusal)
    prepared = prepare(suite, data_dir, world_size=world)
    done = set() if rerun else _from_main(store.finished_keys() if main else None, world)
    barrier()  # every rank has the same finished cells before rank 0 writes new ones
    if world == 1 and any(run.placement is not None and run.placement.sharding for run in prepared.runs):
        _single_process_group()
    summary = RunSummary(suite.name, store.path, total=0)
    bar = tqdm(total=0, desc=suite.name, unit="cell", disable=not (progress and main), dynamic_ncols=True)
    owner = new_owner()
    poll_seconds = min(POLL_SECONDS, lease_seconds / 4)

    def run_batch(runs: list[Run], done: set[str]) -> None:
        """Train the unfinished cells of ``runs``, sharing them with other runners through the leases."""
        total = sum(len(run.cells) for run in runs)
        pending = [(run, [c for c in run.cells if c.key not in done]) for run in runs]
        pending = [(run, cells) for run, cells in pending if cells]
        summary.total += total
        summary.already_done += total - sum(len(cells) for _, cells in pending)
        bar.total = summary.total - summary.already_done
        bar.refresh()
        while pending:
            waiting = []
            trained_any = False
            for run, cells in pending:
                keys = [c.key for c in cells]
                claim = _from_main(store.claim(keys, owner, lease_seconds, started, rerun) if main else None, world)
                summary.elsewhere += len(claim.finished)
                bar.update(len(claim.finished))
                leased, taken = set(claim.leased), set(claim.taken)
                if leased:
                    waiting.append((run, [c for c in cells if c.key in leased]))
                mine = [c for c in cells if c.key in taken]
                if mine:
                    trained_any = True
                    _train(run, mine, prepared, store, owner if main else None, summary, bar)
            pending = waiting
            if pending and not trained_any:
                # Every remaining cell is another runner's: wait for its row, or for its lease to expire.
                bar.set_postfix_str(f"waiting for {sum(len(c) for _, c in pending)} cells of other runners")
                time.sleep(poll_seconds)

    with store.keep_leases(owner, lease_seconds) if main else nullcontext():
        run_batch(prepared.runs, done)
        if suite.tuning is not None:
            # Trials, one round at a time (trial t of every point), then the chosen configurations.
            def stored(keys: list[str]) -> dict[str, dict[str, Any]]:
                return _from_main(store.rows(keys) if main else None, world)

            for cells in tuning_rounds(suite, prepared.cells, stored, summary.failures):
                runs, unplannable = resolve_each(cells, prepared.task, prepared.data, available_memory_bytes())
                finished = set() if rerun else _from_main(store.finished_keys() if main else None, world)
                for record in unplannable:
                    if main:
                        store.write(record)
                    count_unplannable(summary, record)
                run_batch(runs, finished)
    bar.close()
    barrier()
    return summary


def count_unplannable(summary: RunSummary, record: dict[str, Any]) -> None:
    """Count a searched configuration that cannot run (a failed trial, stored as such) in the sweep's summary."""
    summary.total += 1
    summary.failed += 1
    trial = f"{record['scheme_label']} [trial {record.get('trial')}]"
    cell = f"{record['dataset']}/{record['model']}/{trial}@{record['budget']}"
    summary.failures.append(f"{cell}: {record['error'].splitlines()[0][:200]}")


def _train(
    run: Run, cells: list[Cell], prepared: Prepared, store: ResultStore, owner: str | None, summary: RunSummary,
    bar: Any,
) -> None:
    """Train ``run`` for ``cells`` (claimed by ``owner``, which writes their rows: the main rank) and count them;
    without a progress bar, the main rank logs one line per finished cell on stderr (:func:`cell_line`)."""
    trained = run.trained
    bar.set_postfix_str(trained.describe())

    def show(epoch: dict[str, float], text: str = trained.describe()) -> None:
        bar.set_postfix_str(f"{text} epoch {epoch['epoch']} val_auc {epoch.get('val_auc', 0):.4f}")

    records = execute(
        run, prepared.task, prepared.data[trained.dataset.label], {c.key for c in cells}, show, owner is not None
    )
    for cell, record in zip(cells, records, strict=True):
        if owner is not None:
            store.write(record, lease_owner=owner)
        status = record["status"]
        setattr(summary, status, getattr(summary, status) + 1)
        if status == "failed":
            last_line = record["error"].strip().splitlines()[-1]
            summary.failures.append(f"{cell.describe()}: {last_line}")
        bar.update(1)
        if bar.disable and owner is not None:  # --no-progress (or a worker process): a line a log keeps
            done = summary.ok + summary.failed + summary.skipped + summary.elsewhere
            print(cell_line(cell, record, done, summary.total - summary.already_done), file=sys.stderr, flush=True)


def cell_line(cell: Cell, record: dict[str, Any], done: int, total: int) -> str:
    """One line for a finished cell, e.g. ``[3/12] ok ml-1m/gmf/cce@1/4/cpu/seed0 val_auc 0.8123 test_auc
    0.8101 41.2 s``; a failed or skipped cell's line ends with the last line of its error."""
    line = f"[{done}/{total}] {record['status']} {cell.describe()}"
    if record["status"] == "ok":
        for name in ("val_auc", "test_auc"):
            value = record.get(name)
            line += f" {name} {value:.4f}" if value is not None else ""
    else:
        lines = str(record.get("error") or "").strip().splitlines()
        line += f": {lines[-1]}" if lines else ""
    seconds = record.get("wall_seconds")
    return line + (f" {seconds:.1f} s" if seconds is not None else "")


def _refusal(store: ResultStore) -> str | None:
    """Why ``store`` cannot be written (its one-line error), or None when it can."""
    try:
        store.check(writable=True)
    except EmbbenchError as exc:
        return str(exc)
    return None


def _from_main(value: Any, world: int) -> Any:
    """The main rank's ``value`` on every rank (it alone claims cells; all ranks train what it claimed)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_workers(
    name_or_path: str | Path, db: str | Path, data_dir: str | Path | None, quick: bool, rerun: bool, workers: int,
    lease_seconds: float,
) -> RunSummary:
    """Run a suite in ``workers`` processes on this machine that share it through the database's leases, each
    with an equal share of this process's torch threads; their summaries added up."""
    if launched_by_torchrun():
        raise ConfigError("workers cannot be combined with --nproc > 1: use one or the other")
    suite = load_suite(name_or_path, quick)  # the schema is checked once, here, before any process starts
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    arguments = (str(name_or_path), str(db), None if data_dir is None else str(data_dir), quick, rerun, threads,
                 lease_seconds)
    processes = [context.Process(target=_worker, args=(results, *arguments), name=f"embbench-worker-{index}")
                 for index in range(workers)]
    outcomes: list[RunSummary | str] = []
    with _terminated_as_exit():
        for process in processes:
            process.start()
        _collect(processes, results, outcomes)
    errors = [outcome for outcome in outcomes if isinstance(outcome, str)]
    if errors:
        raise EmbbenchError(errors[0])
    summaries = [outcome for outcome in outcomes if isinstance(outcome, RunSummary)]
    total = RunSummary(suite.name, Path(db), total=summaries[0].total)
    total.already_done = min(s.already_done for s in summaries)
    for summary in summaries:
        total.ok, total.failed, total.skipped = (
            total.ok + summary.ok, total.failed + summary.failed, total.skipped + summary.skipped
        )
        total.failures += summary.failures
    # what none of these workers ran nor found finished at its start: finished by runners outside this group
    total.elsewhere = max(0, total.total - total.already_done - total.ok - total.failed - total.skipped)
    return total


@contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s) raises SystemExit here, so that the workers are stopped on the way out
    rather than left training on their own; a worker also stops by itself when this process dies (SIGKILL)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _collect(processes: list[Any], results: Any, outcomes: list[RunSummary | str]) -> None:
    """Every worker's outcome into ``outcomes``; the workers still running are terminated if this stops early."""
    try:
        while len(outcomes) < len(processes):
            try:
                outcomes.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"worker {dead[0].name} died with exit code {dead[0].exitcode}") from None
    finally:
        for process in processes:
            if process.is_alive() and len(outcomes) < len(processes):
                process.terminate()
            process.join()


def _worker(
    results: Any, name_or_path: str, db: str, data_dir: str | None, quick: bool, rerun: bool, threads: int,
    lease_seconds: float,
) -> None:
    """One runner process of :func:`_run_workers`: its summary, or the line of its user error, into ``results``.
    It exits at once if the process that started it dies (its cell's lease then expires and returns to others)."""
    _exit_with_parent()
    try:
        summary = run_suite(name_or_path, db, data_dir, quick, progress=False, rerun=rerun, threads=threads,
                            lease_seconds=lease_seconds)
    except EmbbenchError as exc:
        results.put(str(exc))
        return
    results.put(summary)


def _exit_with_parent() -> None:
    """A daemon thread that ends this process as soon as its parent process is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="embbench-parent-watch", daemon=True).start()


def _single_process_group() -> None:
    """A gloo process group of one process, so that sharded cells run through DMP without torchrun."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store_file = Path(tempfile.mkdtemp(prefix="embbench-pg-")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
