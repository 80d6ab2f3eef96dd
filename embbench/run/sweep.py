"""The sweep: validate and resolve a whole suite up front (:func:`prepare`), then run each unfinished training
run into the results store (:func:`run_suite`).

Everything that can be checked before training is checked before the database is touched: the schema, plugin
names and parameters, the data files, every scheme's plan at every budget and every placement. A run that
raises is stored as failed with its traceback and the sweep goes on; a run this machine cannot hold (memory,
a missing GPU or library) is stored as skipped with the reason.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from embbench import registry
from embbench.distributed import barrier, init_from_env
from embbench.errors import ConfigError, EmbbenchError
from embbench.measure.environment import available_memory_bytes
from embbench.models import RESERVED_ARGUMENTS
from embbench.run.execute import execute
from embbench.run.resolve import MEMORY_HEADROOM, Run, resolve_runs
from embbench.run.store import DEFAULT_DB, ResultStore
from embbench.run.suites import Entry, Suite, find_suite, parse_suite
from embbench.tasks import Task, TaskData


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
    failures: list[str] = field(default_factory=list)


def load_suite(name_or_path: str | Path, quick: bool = False) -> Suite:
    """A shipped suite by name, or a suite file by path, read and validated (schema only)."""
    return parse_suite(find_suite(name_or_path), quick=quick)


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
    if settings["early_stopping"] not in task.early_stopping:
        raise ConfigError(
            f"{suite.path}: early_stopping '{settings['early_stopping']}' is not a metric of task "
            f"'{settings['task']}'; use one of {', '.join(task.early_stopping)}"
        )
    for entry in suite.schemes:
        registry.create("schemes", entry.name, where=entry.where, **entry.params)
    for entry in suite.models:
        _check_model_entry(entry, task, settings["dim"])
    data = {}
    for entry in suite.datasets:
        registry.check_params("datasets", entry.name, entry.params, entry.where)
        dataset = registry.create("datasets", entry.name, where=entry.where, data_dir=data_dir, **entry.params)
        try:
            data[entry.label] = task.prepare(dataset, settings["dim"])
        except EmbbenchError as exc:
            raise type(exc)(f"{entry.where}: {exc}") from None
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
) -> RunSummary:
    """Run every cell of a suite that is not already finished in ``db`` (every cell, with ``rerun``: its
    stored row is replaced).

    Under torchrun (``embbench run suite --nproc N``) every rank runs this: all ranks train each cell together
    and rank 0 alone writes the results. A sharded cell in a single process runs in a process group of one,
    the same code path.
    """
    suite = load_suite(name_or_path, quick)
    devices = suite.settings["devices"]
    on_gpu = torch.cuda.is_available() and ("cuda" in devices or "auto" in devices)
    rank, world = init_from_env("cuda" if on_gpu else "cpu")  # nccl for GPU runs, gloo otherwise
    prepared = prepare(suite, data_dir, world_size=world)
    store = ResultStore(db)
    done = set() if rerun else store.finished_keys()
    barrier()  # every rank has read the same finished cells before rank 0 writes new ones
    main = rank == 0
    if world == 1 and any(run.placement is not None and run.placement.sharding for run in prepared.runs):
        _single_process_group()
    summary = RunSummary(suite.name, store.path, total=len(prepared.cells))
    pending = [(run, [c for c in run.cells if c.key not in done]) for run in prepared.runs]
    pending = [(run, cells) for run, cells in pending if cells]
    summary.already_done = summary.total - sum(len(cells) for _, cells in pending)
    bar = tqdm(
        total=summary.total - summary.already_done, desc=suite.name, unit="cell",
        disable=not (progress and main), dynamic_ncols=True,
    )
    for run, cells in pending:
        trained = run.trained
        bar.set_postfix_str(trained.describe())

        def show(epoch: dict[str, float], text: str = trained.describe()) -> None:
            bar.set_postfix_str(f"{text} epoch {epoch['epoch']} val_auc {epoch.get('val_auc', 0):.4f}")

        records = execute(
            run, prepared.task, prepared.data[trained.dataset.label], {c.key for c in cells}, show, main
        )
        for cell, record in zip(cells, records, strict=True):
            if main:
                store.write(record)
            status = record["status"]
            setattr(summary, status, getattr(summary, status) + 1)
            if status == "failed":
                last_line = record["error"].strip().splitlines()[-1]
                summary.failures.append(f"{cell.describe()}: {last_line}")
            bar.update(1)
    bar.close()
    barrier()
    return summary


def _single_process_group() -> None:
    """A gloo process group of one process, so that sharded cells run through DMP without torchrun."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store_file = Path(tempfile.mkdtemp(prefix="embbench-pg-")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
