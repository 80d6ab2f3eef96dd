"""The runner: validate a whole suite up front, then run its cells one by one into the results store.

Everything that can be checked before training is checked before the database is touched: the schema,
plugin names and hyper-parameters, the data files, and every scheme's plan at every budget. A cell that
raises while running is stored as failed with its traceback and the sweep goes on.

Cells that differ only in precision share one training run: the fp32 model is trained once, then each other
precision quantises a copy of its tables and is evaluated again, as a row of its own.
"""

from __future__ import annotations

import datetime as dt
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from embbench import registry
from embbench.data import Split, prepare_split
from embbench.environment import device_name, environment, git_commit, host
from embbench.errors import BudgetTooSmall, ConfigError, EmbbenchError
from embbench.latency import measure_cell_latency, resident_bytes
from embbench.models import RESERVED_ARGUMENTS, RecModel
from embbench.quantization import QuantizationUnavailable, quantize_tables, quantized_size_bytes
from embbench.schemes import Budget, FeatureSpec, SchemePlan, build_embedding, full_table_bytes
from embbench.store import DEFAULT_DB, ResultStore
from embbench.suites import BASE_PRECISION, Cell, Entry, Suite, find_suite, parse_suite
from embbench.tables import table_backend
from embbench.training import RankingTask, TrainConfig, evaluate, train_and_evaluate

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


def features_of(split: Split, dim: int, item_side: pd.DataFrame | None = None) -> dict[str, FeatureSpec]:
    """The user and item features of a split; items carry the dataset's side features where it has any
    (rows aligned with the training IDs, zeros for an item the side table lacks)."""
    features = {}
    for name in FEATURES:
        ids, counts = split.feature_counts(name)
        side = None
        if name == "item" and item_side is not None and len(item_side.columns):
            side = item_side.reindex(ids).fillna(0.0).to_numpy(dtype=np.float32)
        features[name] = FeatureSpec(name, ids, counts, dim, side)
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
        features[entry.label] = features_of(splits[entry.label], suite.settings["dim"], dataset.item_side_features())
    cells = suite.cells()
    plans: dict[str, dict[str, SchemePlan]] = {}
    for cell in cells:  # cells of one training run share the fp32 cell's plan
        trained_key = cell.trained.key
        if trained_key not in plans:
            plans[trained_key] = plan_cell(cell, features[cell.dataset.label])
        plans[cell.key] = plans[trained_key]
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
    return run_cells([cell], split, features, plans, on_epoch)[0]


def run_cells(
    cells: Sequence[Cell],
    split: Split,
    features: dict[str, FeatureSpec],
    plans: dict[str, SchemePlan],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train the cells' shared fp32 model once and evaluate it at each cell's precision; one store record per
    cell, in order. ``cells`` must differ only in precision."""
    trained_cell = cells[0].trained
    if any(cell.trained != trained_cell for cell in cells):
        raise ValueError("run_cells takes cells that differ only in precision")
    record, model = _train_cell(trained_cell, split, features, plans, on_epoch)
    task = RankingTask(split) if model is not None and any(c.precision != BASE_PRECISION for c in cells) else None
    records = []
    for cell in cells:
        if cell.precision == BASE_PRECISION:
            records.append(record)
        else:
            records.append(_quantized_record(cell, record, model, split, task))
    return records


def _base_record(cell: Cell, features: dict[str, FeatureSpec], plans: dict[str, SchemePlan]) -> dict[str, Any]:
    return {
        "cell_key": cell.key,
        "suite": cell.suite,
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
        "full_bytes": sum(full_table_bytes(f.num_ids, f.dim) for f in features.values()),
        "git_commit": git_commit(),
        "host": host(),
        "threads": torch.get_num_threads(),
        "started_at": _now(),
    }


def _train_cell(
    cell: Cell,
    split: Split,
    features: dict[str, FeatureSpec],
    plans: dict[str, SchemePlan],
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> tuple[dict[str, Any], RecModel | None]:
    """The fp32 cell's record, and its trained model (None unless the record is ok)."""
    started = time.perf_counter()
    record = _base_record(cell, features, plans)
    device, reason = resolve_device(cell.device)
    if device is None:
        record.update(status="skipped", error=reason, finished_at=_now(), wall_seconds=0.0)
        return record, None
    record.update(device_name=device_name(device), environment_json=environment(device))
    model = None
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
        model = None
    record.update(wall_seconds=time.perf_counter() - started, finished_at=_now())
    return record, model


# Fields a quantised row takes from its training run: what was trained, and how; not how it scores.
_SHARED_FIELDS = (
    "suite", "dataset", "model", "scheme", "budget", "device", "seed", "plan_json", "size_bytes", "budget_bytes",
    "full_bytes", "git_commit", "host", "threads", "device_name", "environment_json", "dense_bytes",
    "table_backend", "train_seconds", "epochs_run", "best_epoch", "history_json", "train_examples_per_second",
)


def _quantized_record(
    cell: Cell, trained: dict[str, Any], model: RecModel | None, split: Split, task: RankingTask | None
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
    assert task is not None
    device, _ = resolve_device(cell.device)
    assert device is not None
    try:
        quantized = quantize_tables(model, cell.precision)  # a copy; the dense layers are not quantised
        sizes = {name: quantized_size_bytes(getattr(quantized, f"{name}_embedding")) for name in FEATURES}
        record["plan_json"] = {
            name: {**plan, "size_bytes": sizes[name], "fp32_size_bytes": plan["size_bytes"]}
            for name, plan in trained["plan_json"].items()
        }
        record["size_bytes"] = sum(sizes.values())
        evaluated = time.perf_counter()
        batch_users = TrainConfig(**cell.training).eval_batch_users
        test = evaluate(quantized, task, "test", device, batch_users)
        validation = evaluate(quantized, task, "validation", device, batch_users)
        record.update(
            status="ok",
            test_auc=test.get("auc"),
            test_hr10=test.get("hr@10"),
            test_ndcg10=test.get("ndcg@10"),
            val_auc=validation.get("auc"),
            val_hr10=validation.get("hr@10"),
            eval_seconds=time.perf_counter() - evaluated,
        )
        if cell.latency_batch_sizes:
            latency = measure_cell_latency(
                quantized, torch.as_tensor(split.users), torch.as_tensor(split.items), device,
                cell.latency_batch_sizes,
            )
            record.update(
                latency_json=latency,
                embedding_latency_ms=latency["user_embedding"][-1]["median_ms"]
                + latency["item_embedding"][-1]["median_ms"],
                model_latency_ms=latency["model"]["median_ms"],
            )
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
    runs: dict[str, list[Cell]] = {}  # pending cells by the training run they share, in suite order
    for cell in pending:
        runs.setdefault(cell.trained.key, []).append(cell)
    bar = tqdm(total=len(pending), desc=prepared.suite.name, unit="cell", disable=not progress, dynamic_ncols=True)
    for cells in runs.values():
        trained = cells[0].trained
        bar.set_postfix_str(trained.describe())

        def show(epoch: dict[str, float], cell: Cell = trained) -> None:
            bar.set_postfix_str(f"{cell.describe()} epoch {epoch['epoch']} val_auc {epoch.get('val_auc', 0):.4f}")

        records = run_cells(
            cells,
            prepared.splits[trained.dataset.label],
            prepared.features[trained.dataset.label],
            prepared.plans[trained.key],
            on_epoch=show,
        )
        for cell, record in zip(cells, records, strict=True):
            store.write(record)
            status = record["status"]
            setattr(summary, status, getattr(summary, status) + 1)
            if status == "failed":
                last_line = record["error"].strip().splitlines()[-1]
                summary.failures.append(f"{cell.describe()}: {last_line}")
            bar.update(1)
    bar.close()
    return summary
