"""The runner: validate a whole suite up front, then run its cells one by one into the results store.

Everything that can be checked before training is checked before the database is touched: the schema,
plugin names and hyper-parameters, the data files, and every scheme's plan at every budget. A cell that
raises while running is stored as failed with its traceback and the sweep goes on.

Cells that differ only in precision share one training run: the fp32 model is trained once, then each other
precision quantises a copy of its tables and is evaluated again, as a row of its own.

What is learned and how it is scored is the suite's task (a plugin: ranking, rating-classification, ctr).
A cell whose tables would not fit in the memory available is refused before anything is built, and stored
as skipped with the reason, so a sweep never ends in an out-of-memory kill.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from embbench import registry
from embbench.distributed import barrier, full_state_dict, init_from_env, is_main
from embbench.environment import available_memory_bytes, device_name, environment, git_commit, host
from embbench.errors import BudgetTooSmall, ConfigError, EmbbenchError
from embbench.latency import (
    embedding_latency_ms,
    measure_cell_latency,
    peak_resident_bytes,
    pool_batch,
    reset_peak_resident,
    resident_bytes,
)
from embbench.models import RESERVED_ARGUMENTS
from embbench.quantization import QuantizationUnavailable, quantize_tables, quantized_size_bytes
from embbench.schemes import Budget, FeatureSpec, SchemePlan, build_embedding, full_table_bytes
from embbench.store import DEFAULT_DB, ResultStore
from embbench.suites import BASE_PRECISION, DEFAULT_BACKEND, Cell, Entry, Suite, find_suite, parse_suite
from embbench.tables import table_backend
from embbench.tasks import Task, TaskData, metric_record
from embbench.training import Sharding, TrainConfig, sharded

#: bytes held per byte of embedding state while training: weights, gradients and Adam's two moments
TRAINING_MEMORY_FACTOR = 4
#: the share of the available memory a cell's embeddings may take while training; the rest is for the data,
#: activations, the allocator's slack and the rest of the system
MEMORY_HEADROOM = 0.8


@dataclass
class PreparedSuite:
    suite: Suite
    cells: list[Cell]
    task: Task
    data: dict[str, TaskData]  # by dataset label
    plans: dict[str, dict[str, SchemePlan]]  # by cell key, then feature
    refused: dict[str, str] = field(default_factory=dict)  # cell key -> why it cannot run on this machine


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


def plan_cell(cell: Cell, features: dict[str, FeatureSpec]) -> dict[str, SchemePlan]:
    """Each feature's plan, the cell's budget shared over the features (see :func:`share_budget`); a budget
    the features cannot share names the suite entry."""
    scheme = registry.create("schemes", cell.scheme.name, where=cell.scheme.where, **cell.scheme.params)
    try:
        return share_budget(scheme, features, Budget.parse(cell.budget))
    except BudgetTooSmall as exc:
        raise ConfigError(f"{cell.scheme.where} at budget {cell.budget} on {cell.dataset.label}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{cell.scheme.where}: {exc}") from None


def share_budget(scheme: Any, features: dict[str, FeatureSpec], budget: Budget) -> dict[str, SchemePlan]:
    """Plans of ``scheme`` for every feature within ``budget`` for all of them together.

    Each feature first gets its share (:meth:`Budget.allocate`). A feature whose share is below the scheme's
    smallest module (a field of three IDs, say) gets that minimum instead, and the other features share what
    is left in the same proportions; repeated until every feature fits, or the budget cannot hold the
    minimums (BudgetTooSmall).
    """
    shares = budget.allocate(features)
    total = sum(shares.values())
    floors: dict[str, int] = {}
    for _ in range(len(features) + 1):
        plans, below = {}, {}
        for name, feature in features.items():
            try:
                plans[name] = scheme.plan(feature, floors.get(name, shares[name]))
            except BudgetTooSmall as exc:
                if name in floors:  # even its stated minimum does not fit: a bug in the scheme, or odd input
                    raise
                below[name] = exc
        if not below:
            return plans
        floors.update({name: exc.minimum_bytes for name, exc in below.items()})
        rest = {name: shares[name] for name in features if name not in floors}
        remaining = total - sum(floors.values())
        if remaining <= 0 or not rest:
            name, exc = next(iter(below.items()))
            raise BudgetTooSmall(
                exc.scheme, total, sum(floors.values()) + len(rest),
                f"the smallest modules of {len(floors)} of {len(features)} features, e.g. '{name}' "
                f"({features[name].vocabulary:,} IDs) needs {exc.minimum_bytes:,} bytes",
            ) from None
        weight = sum(rest.values())
        shares.update({name: remaining * share // weight for name, share in rest.items()})
    raise AssertionError("unreachable: every round floors at least one more feature")


def memory_refusal(plans: dict[str, SchemePlan], available: int | None) -> str | None:
    """Why the cell's embeddings cannot be trained in ``available`` bytes, or None when they fit."""
    size = sum(plan.size_bytes for plan in plans.values())
    needed = size * TRAINING_MEMORY_FACTOR
    if available is None or needed <= available * MEMORY_HEADROOM:
        return None
    return (
        f"refused before building: the embeddings store {_size_text(size)}, about {_size_text(needed)} while "
        f"training (weights, gradients, Adam moments), more than {MEMORY_HEADROOM:.0%} of the "
        f"{_size_text(available)} this machine has available; use a smaller vocabulary or budget, or a "
        "compressed scheme"
    )


def _size_text(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


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
    try:
        task.probe_model(model_class, dim, dict(entry.params))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{entry.where}: {exc}") from None


def prepare(
    name_or_path: str, data_dir: str | Path | None = None, quick: bool = False, world_size: int = 1
) -> PreparedSuite:
    """Parse and fully validate a suite; load and split its datasets; plan every cell (for a run over
    ``world_size`` processes)."""
    suite = parse_suite(find_suite(name_or_path), quick=quick)
    settings = suite.settings
    task_name = settings["task"]
    task: Task = registry.create("tasks", task_name, where=f"{suite.path}: task")
    if settings["early_stopping"] not in task.early_stopping:
        raise ConfigError(
            f"{suite.path}: early_stopping '{settings['early_stopping']}' is not a metric of task '{task_name}'; "
            f"use one of {', '.join(task.early_stopping)}"
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
    cells = suite.cells(world_size)
    plans: dict[str, dict[str, SchemePlan]] = {}
    refused: dict[str, str] = {}
    available = available_memory_bytes()
    for cell in cells:  # cells of one training run share the fp32 cell's plan
        trained_key = cell.trained.key
        if trained_key not in plans:
            plans[trained_key] = plan_cell(cell, data[cell.dataset.label].features)
            if cell.device != "cuda":  # GPU memory is checked when the cell runs, on its device
                reason = memory_refusal(plans[trained_key], available)
                if reason is not None:
                    refused[trained_key] = reason
        plans[cell.key] = plans[trained_key]
        if trained_key in refused:
            refused[cell.key] = refused[trained_key]
    return PreparedSuite(suite, cells, task, data, plans, refused)


def resolve_device(name: str) -> tuple[torch.device | None, str | None]:
    """The torch device for a suite device name, or (None, reason) when it is not available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    if name == "cuda" and not torch.cuda.is_available():
        return None, "CUDA is not available on this machine (torch.cuda.is_available() is False)"
    return torch.device(name), None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def table_backend_of(cell: Cell) -> Iterator[None]:
    """Tables built inside use the cell's backend (``auto`` leaves the environment's choice)."""
    if cell.backend == DEFAULT_BACKEND:
        yield
        return
    previous = os.environ.get("EMBBENCH_TABLE_BACKEND")
    os.environ["EMBBENCH_TABLE_BACKEND"] = cell.backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("EMBBENCH_TABLE_BACKEND", None)
        else:
            os.environ["EMBBENCH_TABLE_BACKEND"] = previous


def run_cells(
    cells: Sequence[Cell],
    task: Task,
    data: TaskData,
    plans: dict[str, SchemePlan],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    refusal: str | None = None,
) -> list[dict[str, Any]]:
    """Train the cells' shared fp32 model once and evaluate it at each cell's precision; one store record per
    cell, in order. ``cells`` must differ only in precision. With a ``refusal``, nothing is built and every
    cell is stored as skipped with that reason."""
    trained_cell = cells[0].trained
    if any(cell.trained != trained_cell for cell in cells):
        raise ValueError("run_cells takes cells that differ only in precision")
    with table_backend_of(trained_cell):
        record, model = _train_cell(trained_cell, task, data, plans, on_epoch, refusal)
        records = []
        for cell in cells:
            if cell.precision == BASE_PRECISION:
                records.append(record)
            elif is_main():  # other ranks' records are not stored
                records.append(_quantized_record(cell, record, model, task, data))
            else:
                records.append({**record, "cell_key": cell.key, "precision": cell.precision})
    return records


def _base_record(cell: Cell, features: dict[str, FeatureSpec], plans: dict[str, SchemePlan]) -> dict[str, Any]:
    return {
        "cell_key": cell.key,
        "suite": cell.suite,
        "task": cell.task,
        "dataset": cell.dataset.label,
        "model": cell.model.label,
        "scheme": cell.scheme.name,
        "scheme_label": cell.label,
        "precision": cell.precision,
        "budget": cell.budget,
        "device": cell.device,
        "seed": cell.seed,
        "config_json": cell.config(),
        "plan_json": {name: {"params": p.params, "size_bytes": p.size_bytes} for name, p in plans.items()},
        "size_bytes": sum(p.size_bytes for p in plans.values()),
        "budget_bytes": sum(p.budget_bytes for p in plans.values()),
        "full_bytes": sum(full_table_bytes(f.vocabulary, f.dim) for f in features.values()),
        "git_commit": git_commit(),
        "host": host(),
        "threads": torch.get_num_threads(),
        "started_at": _now(),
    }


def _latency_record(
    model: nn.Module, task: Task, data: TaskData, device: torch.device, batch_sizes: Sequence[int]
) -> dict[str, Any]:
    modules = model.embedding_modules()
    pools = {name: (modules[name], torch.as_tensor(feature.ids)) for name, feature in data.features.items()}
    latency = measure_cell_latency(pools, model, task.model_batch(data, max(batch_sizes), device), device, batch_sizes)
    return {
        "latency_json": latency,
        "embedding_latency_ms": embedding_latency_ms(latency, list(pools)),
        "model_latency_ms": latency["model"]["median_ms"],
    }


def _train_cell(
    cell: Cell,
    task: Task,
    data: TaskData,
    plans: dict[str, SchemePlan],
    on_epoch: Callable[[dict[str, float]], None] | None,
    refusal: str | None = None,
) -> tuple[dict[str, Any], nn.Module | None]:
    """The fp32 cell's record, and its trained model (None unless the record is ok)."""
    started = time.perf_counter()
    features = data.features
    record = _base_record(cell, features, plans)
    device, reason = resolve_device(cell.device)
    if device is None or refusal is not None:
        record.update(status="skipped", error=reason or refusal, finished_at=_now(), wall_seconds=0.0)
        return record, None
    record.update(device_name=device_name(device), environment_json=environment(device))
    model = None
    try:
        peak_window = reset_peak_resident()
        memory_before = _memory_in_use(device)
        model = _build_model(cell, task, data, plans)
        record["peak_memory_bytes"] = _embedding_memory(model, features, device, memory_before)
        record["dense_bytes"] = model.dense_size_bytes()
        record["table_backend"] = table_backend()
        config = TrainConfig(**cell.training)
        if cell.sharded:
            how = Sharding(cell.sharding_type, cell.embedding_optimizer, cell.embedding_learning_rate)
            with sharded(how) as sharding:
                result = task.fit(model, data, config, cell.seed, device, on_epoch=on_epoch)
            # The trained model's tables are shards now: later steps use an unsharded replica of its weights.
            state = full_state_dict(sharding.wrapped)
            model = _build_model(cell, task, data, plans)
            model.load_state_dict(state)
            model.to(device)
            info = sharding.info.as_dict()
            record.update(
                sharding=info["sharding_type"], world_size=info["world_size"], sharding_json=info,
                embedding_optimizer=info["embedding_optimizer"],
            )
        else:
            result = task.fit(model, data, config, cell.seed, device, on_epoch=on_epoch)
            record.update(sharding="none", world_size=1, embedding_optimizer="adam")
        record.update(
            status="ok",
            **metric_record("test", result.test),
            **metric_record("val", result.validation),
            dense_optimizer="adam",
            train_seconds=result.train_seconds,
            eval_seconds=result.eval_seconds,
            epochs_run=len(result.history),
            best_epoch=result.best_epoch,
            history_json=result.history,
            train_examples_per_second=result.examples_per_second,
            # the whole process (data included) while building and training this cell
            peak_rss_bytes=peak_resident_bytes() if peak_window else None,
        )
        if cell.latency_batch_sizes and is_main():  # other ranks' records are not stored
            record.update(_latency_record(model, task, data, device, cell.latency_batch_sizes))
    except Exception:  # one failing cell must not stop the sweep; its traceback is kept
        record.update(status="failed", error=traceback.format_exc())
        model = None
    record.update(wall_seconds=time.perf_counter() - started, finished_at=_now())
    return record, model


def _build_model(cell: Cell, task: Task, data: TaskData, plans: dict[str, SchemePlan]) -> nn.Module:
    """The cell's model, its embeddings built from the plans with the cell's seeds."""
    scheme = registry.create("schemes", cell.scheme.name, where=cell.scheme.where, **cell.scheme.params)
    embeddings = {}
    for offset, (name, feature) in enumerate(data.features.items()):
        module, _ = build_embedding(
            scheme, cell.scheme.name, feature, plans[name].budget_bytes, seed=cell.seed * 1000 + offset + 1
        )
        embeddings[name] = module
    torch.manual_seed(cell.seed)
    model_class = registry.get_plugin("models", cell.model.name)
    return task.build_model(model_class, embeddings, data, cell.dim, dict(cell.model.params))


# Fields a quantised row takes from its training run: what was trained, and how; not how it scores.
_SHARED_FIELDS = (
    "suite", "task", "dataset", "model", "scheme", "budget", "device", "seed", "plan_json", "size_bytes",
    "budget_bytes", "full_bytes", "git_commit", "host", "threads", "device_name", "environment_json", "dense_bytes",
    "table_backend", "train_seconds", "epochs_run", "best_epoch", "history_json", "train_examples_per_second",
    "peak_rss_bytes", "sharding", "world_size", "sharding_json", "embedding_optimizer", "dense_optimizer",
)


def _quantized_record(
    cell: Cell, trained: dict[str, Any], model: nn.Module | None, task: Task, data: TaskData
) -> dict[str, Any]:
    """The record of ``cell``: the trained model's tables quantised to ``cell.precision``, evaluated again."""
    started = time.perf_counter()
    record = {
        **{name: trained[name] for name in _SHARED_FIELDS if name in trained},
        "cell_key": cell.key,
        "scheme_label": cell.label,
        "precision": cell.precision,
        "config_json": cell.config(),
        "started_at": _now(),
    }
    if model is None:  # the training run was skipped or failed: so is this precision, for the same reason
        where = "" if trained["status"] == "skipped" else f"training the {BASE_PRECISION} model failed:\n"
        record.update(status=trained["status"], error=where + str(trained.get("error")), finished_at=_now(),
                      wall_seconds=0.0)
        return record
    device, _ = resolve_device(cell.device)
    assert device is not None
    try:
        quantized = quantize_tables(model, cell.precision)  # a copy; the dense layers are not quantised
        modules = quantized.embedding_modules()
        sizes = {name: quantized_size_bytes(modules[name]) for name in data.features}
        record["plan_json"] = {
            name: {**plan, "size_bytes": sizes[name], "fp32_size_bytes": plan["size_bytes"]}
            for name, plan in trained["plan_json"].items()
        }
        record["size_bytes"] = sum(sizes.values())
        evaluated = time.perf_counter()
        config = TrainConfig(**cell.training)
        test = task.evaluate(quantized, data, "test", device, config)
        validation = task.evaluate(quantized, data, "validation", device, config)
        record.update(
            status="ok",
            **metric_record("test", test),
            **metric_record("val", validation),
            eval_seconds=time.perf_counter() - evaluated,
        )
        if cell.latency_batch_sizes:
            record.update(_latency_record(quantized, task, data, device, cell.latency_batch_sizes))
    except QuantizationUnavailable as exc:  # a property of the scheme or the installation: not run again
        record.update(status="skipped", error=str(exc), size_bytes=None)
    except Exception:  # one failing precision must not stop the sweep; its traceback is kept
        record.update(status="failed", error=traceback.format_exc())
    record.update(wall_seconds=time.perf_counter() - started, finished_at=_now())
    return record


def _memory_in_use(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes()


def _embedding_memory(
    model: nn.Module, features: dict[str, FeatureSpec], device: torch.device, before: int | None
) -> int | None:
    """Peak memory of building the embeddings and one training step of a 4096-ID batch through each: bytes
    allocated on a GPU; the growth of the process's resident set on a CPU (an estimate: freed memory that
    the allocator keeps, or reuses, blurs it)."""
    if before is None:
        return None
    model.to(device)
    modules = model.embedding_modules()
    for name, feature in features.items():
        module = modules[name]
        # The probe step must leave no trace in training: restore buffers (e.g. BatchNorm statistics).
        buffers = {key: buffer.clone() for key, buffer in module.named_buffers()}
        ids = pool_batch(torch.as_tensor(feature.ids), 4096, device)  # a field of one ID still gives a batch
        module(ids).sum().backward()
        with torch.no_grad():
            for key, buffer in module.named_buffers():
                buffer.copy_(buffers[key])
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) - before)
    after = resident_bytes()
    return None if after is None else max(0, after - before)


def run_suite(
    name_or_path: str,
    db: str | Path = DEFAULT_DB,
    data_dir: str | Path | None = None,
    quick: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Run every cell of a suite that is not already finished in ``db``.

    Under torchrun (``embbench run suite --nproc N``) every rank runs this: all ranks train each cell
    together and rank 0 alone writes the results. A sharded cell in a single process runs in a process group
    of one, the same code path.
    """
    devices = parse_suite(find_suite(name_or_path), quick=quick).settings["devices"]
    on_gpu = "cuda" in devices or ("auto" in devices and torch.cuda.is_available())
    rank_, world = init_from_env("cuda" if on_gpu and torch.cuda.is_available() else "cpu")  # nccl or gloo
    prepared = prepare(name_or_path, data_dir=data_dir, quick=quick, world_size=world)
    store = ResultStore(db)
    done = store.finished_keys()
    barrier()  # every rank has read the same finished cells before rank 0 writes new ones
    main = rank_ == 0
    if world == 1 and any(cell.sharded for cell in prepared.cells):
        _single_process_group()
    summary = RunSummary(prepared.suite.name, store.path, total=len(prepared.cells))
    pending = [cell for cell in prepared.cells if cell.key not in done]
    summary.already_done = summary.total - len(pending)
    runs: dict[str, list[Cell]] = {}  # pending cells by the training run they share, in suite order
    for cell in pending:
        runs.setdefault(cell.trained.key, []).append(cell)
    bar = tqdm(
        total=len(pending), desc=prepared.suite.name, unit="cell", disable=not (progress and main), dynamic_ncols=True
    )
    for cells in runs.values():
        trained = cells[0].trained
        bar.set_postfix_str(trained.describe())

        def show(epoch: dict[str, float], cell: Cell = trained) -> None:
            bar.set_postfix_str(f"{cell.describe()} epoch {epoch['epoch']} val_auc {epoch.get('val_auc', 0):.4f}")

        records = run_cells(
            cells,
            prepared.task,
            prepared.data[trained.dataset.label],
            prepared.plans[trained.key],
            on_epoch=show,
            refusal=prepared.refused.get(trained.key),
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
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        return
    store_file = Path(tempfile.mkdtemp(prefix="embbench-pg-")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
