"""The runner: validate a whole suite up front, then run its cells one by one into the results store.

Everything that can be checked before training is checked before the database is touched: the schema,
plugin names and hyper-parameters, the data files, and every scheme's plan at every budget. A cell that
raises while running is stored as failed with its traceback and the sweep goes on.
"""

from __future__ import annotations

import datetime as dt
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from embbench import registry
from embbench.data import Split, prepare_split
from embbench.environment import device_name, environment, git_commit, host
from embbench.errors import BudgetTooSmall, ConfigError, EmbbenchError
from embbench.latency import measure_cell_latency, resident_bytes
from embbench.models import RESERVED_ARGUMENTS
from embbench.schemes import Budget, FeatureSpec, SchemePlan, build_embedding, full_table_bytes
from embbench.store import DEFAULT_DB, ResultStore
from embbench.suites import Cell, Entry, Suite, find_suite, parse_suite
from embbench.tables import table_backend
from embbench.training import TrainConfig, train_and_evaluate

FEATURES = ("user", "item")


@dataclass
class PreparedSuite:
    suite: Suite
    cells: list[Cell]
    splits: dict[str, Split]  # by dataset label
    plans: dict[str, dict[str, SchemePlan]]  # by cell key, then feature
    features: dict[str, dict[str, FeatureSpec]]  # by dataset label, then feature


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


def features_of(split: Split, dim: int) -> dict[str, FeatureSpec]:
    features = {}
    for name in FEATURES:
        ids, counts = split.feature_counts(name)
        features[name] = FeatureSpec(name, ids, counts, dim)
    return features


def plan_cell(cell: Cell, features: dict[str, FeatureSpec]) -> dict[str, SchemePlan]:
    """Each feature's plan at the cell's budget; a budget below the scheme's minimum names the suite entry."""
    scheme = registry.create("schemes", cell.scheme.name, where=cell.scheme.where, **cell.scheme.params)
    budget = Budget.parse(cell.budget)
    plans = {}
    for name, feature in features.items():
        budget_bytes = budget.resolve(feature.num_ids, feature.dim)
        try:
            plans[name] = scheme.plan(feature, budget_bytes)
        except BudgetTooSmall as exc:
            raise ConfigError(
                f"{cell.scheme.where} at budget {cell.budget}, {name} feature of {cell.dataset.label} "
                f"({feature.num_ids:,} IDs): {exc}"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"{cell.scheme.where}: {exc}") from None
    return plans


def _check_model_entry(entry: Entry) -> None:
    reserved = set(entry.params) & set(RESERVED_ARGUMENTS)
    if reserved:
        raise ConfigError(f"{entry.where}: '{sorted(reserved)[0]}' is set by embbench and cannot be a model parameter")
    model_class = registry.get_plugin("models", entry.name)
    registry.check_params("models", entry.name, entry.params, entry.where)
    dim_probe = torch.nn.Embedding(1, 2)
    try:
        model_class(dim_probe, dim_probe, 2, **entry.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{entry.where}: {exc}") from None


def prepare(name_or_path: str, data_dir: str | Path | None = None, quick: bool = False) -> PreparedSuite:
    """Parse and fully validate a suite; load and split its datasets; plan every cell."""
    suite = parse_suite(find_suite(name_or_path), quick=quick)
    for entry in suite.schemes:
        registry.create("schemes", entry.name, where=entry.where, **entry.params)
    for entry in suite.models:
        _check_model_entry(entry)
    splits, features = {}, {}
    for entry in suite.datasets:
        registry.check_params("datasets", entry.name, entry.params, entry.where)
        dataset = registry.create("datasets", entry.name, where=entry.where, data_dir=data_dir, **entry.params)
        try:
            splits[entry.label] = prepare_split(dataset)
        except EmbbenchError as exc:
            raise type(exc)(f"{entry.where}: {exc}") from None
        features[entry.label] = features_of(splits[entry.label], suite.settings["dim"])
    cells = suite.cells()
    plans = {cell.key: plan_cell(cell, features[cell.dataset.label]) for cell in cells}
    return PreparedSuite(suite, cells, splits, plans, features)


def resolve_device(name: str) -> tuple[torch.device | None, str | None]:
    """The torch device for a suite device name, or (None, reason) when it is not available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    if name == "cuda" and not torch.cuda.is_available():
        return None, "CUDA is not available on this machine (torch.cuda.is_available() is False)"
    return torch.device(name), None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_cell(
    cell: Cell,
    split: Split,
    features: dict[str, FeatureSpec],
    plans: dict[str, SchemePlan],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one cell; returns the store record (status ok, failed or skipped)."""
    started, started_at = time.perf_counter(), _now()
    record: dict[str, Any] = {
        "cell_key": cell.key,
        "suite": cell.suite,
        "dataset": cell.dataset.label,
        "model": cell.model.label,
        "scheme": cell.scheme.name,
        "scheme_label": cell.scheme.label,
        "budget": cell.budget,
        "device": cell.device,
        "seed": cell.seed,
        "config_json": cell.config(),
        "plan_json": {name: {"params": p.params, "size_bytes": p.size_bytes} for name, p in plans.items()},
        "size_bytes": sum(p.size_bytes for p in plans.values()),
        "budget_bytes": sum(p.budget_bytes for p in plans.values()),
        "full_bytes": sum(full_table_bytes(f.num_ids, f.dim) for f in features.values()),
        "git_commit": git_commit(),
        "host": host(),
        "threads": torch.get_num_threads(),
        "started_at": started_at,
    }
    device, reason = resolve_device(cell.device)
    if device is None:
        record.update(status="skipped", error=reason, finished_at=_now(), wall_seconds=0.0)
        return record
    record.update(device_name=device_name(device), environment_json=environment(device))
    try:
        scheme = registry.create("schemes", cell.scheme.name, where=cell.scheme.where, **cell.scheme.params)
        memory_before = _memory_in_use(device)
        embeddings = {}
        for offset, (name, feature) in enumerate(features.items()):
            module, _ = build_embedding(
                scheme, cell.scheme.name, feature, plans[name].budget_bytes, seed=cell.seed * 1000 + offset + 1
            )
            embeddings[name] = module
        torch.manual_seed(cell.seed)
        model_class = registry.get_plugin("models", cell.model.name)
        model = model_class(embeddings["user"], embeddings["item"], cell.dim, **cell.model.params)
        record["peak_memory_bytes"] = _embedding_memory(model, split, device, memory_before)
        record["dense_bytes"] = model.dense_size_bytes()
        record["table_backend"] = table_backend()
        config = TrainConfig(**cell.training)
        result = train_and_evaluate(model, split, config, cell.seed, device, on_epoch=on_epoch)
        record.update(
            status="ok",
            test_auc=result.test.get("auc"),
            test_hr10=result.test.get("hr@10"),
            test_ndcg10=result.test.get("ndcg@10"),
            val_auc=result.validation.get("auc"),
            val_hr10=result.validation.get("hr@10"),
            train_seconds=result.train_seconds,
            eval_seconds=result.eval_seconds,
            epochs_run=len(result.history),
            best_epoch=result.best_epoch,
            history_json=result.history,
            train_examples_per_second=result.examples_per_second,
        )
        if cell.latency_batch_sizes:
            latency = measure_cell_latency(
                model, torch.as_tensor(split.users), torch.as_tensor(split.items), device, cell.latency_batch_sizes
            )
            record.update(
                latency_json=latency,
                embedding_latency_ms=latency["user_embedding"][-1]["median_ms"]
                + latency["item_embedding"][-1]["median_ms"],
                model_latency_ms=latency["model"]["median_ms"],
            )
    except Exception:  # one failing cell must not stop the sweep; its traceback is kept
        record.update(status="failed", error=traceback.format_exc())
    record.update(wall_seconds=time.perf_counter() - started, finished_at=_now())
    return record


def _memory_in_use(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes()


def _embedding_memory(model: Any, split: Split, device: torch.device, before: int | None) -> int | None:
    """Peak memory of building the embeddings and one training step of a 4096-ID batch through each: bytes
    allocated on a GPU; the growth of the process's resident set on a CPU (an estimate: freed memory that
    the allocator keeps, or reuses, blurs it)."""
    if before is None:
        return None
    model.to(device)
    for module, pool in ((model.user_embedding, split.users), (model.item_embedding, split.items)):
        # The probe step must leave no trace in training: restore buffers (e.g. BatchNorm statistics).
        buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
        ids = torch.as_tensor(pool[:4096]).to(device)
        module(ids).sum().backward()
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
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
    """Run every cell of a suite that is not already finished in ``db``."""
    prepared = prepare(name_or_path, data_dir=data_dir, quick=quick)
    store = ResultStore(db)
    done = store.finished_keys()
    summary = RunSummary(prepared.suite.name, store.path, total=len(prepared.cells))
    pending = [cell for cell in prepared.cells if cell.key not in done]
    summary.already_done = summary.total - len(pending)
    bar = tqdm(pending, desc=prepared.suite.name, unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.describe())

        def show(epoch: dict[str, float], cell: Cell = cell) -> None:
            bar.set_postfix_str(f"{cell.describe()} epoch {epoch['epoch']} val_auc {epoch.get('val_auc', 0):.4f}")

        record = run_cell(
            cell,
            prepared.splits[cell.dataset.label],
            prepared.features[cell.dataset.label],
            prepared.plans[cell.key],
            on_epoch=show,
        )
        store.write(record)
        status = record["status"]
        setattr(summary, status, getattr(summary, status) + 1)
        if status == "failed":
            last_line = record["error"].strip().splitlines()[-1]
            summary.failures.append(f"{cell.describe()}: {last_line}")
    bar.close()
    return summary
