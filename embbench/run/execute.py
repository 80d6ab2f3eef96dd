"""Running one resolved training run (:class:`embbench.run.resolve.Run`): build the model as the run's
placement says, train it, evaluate it at each precision, measure latency and memory; one record per cell.

A run that raises is recorded as failed with its traceback (its other precisions too); a refused run is
recorded as skipped with the reason, nothing built.
"""

from __future__ import annotations

import datetime as dt
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from embbench.bags import BagIndex, select_bags
from embbench.collection import FeatureEmbeddings
from embbench.errors import Diverged
from embbench.measure.environment import device_name, environment, git_commit, host
from embbench.measure.latency import embedding_latency_ms, measure_cell_latency
from embbench.measure.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
from embbench.measure.quantization import QuantizationUnavailable, quantize_model, quantized_feature_bytes
from embbench.metrics import require_finite_metrics
from embbench.optimizers import optimizer_memory
from embbench.run.cells import Cell
from embbench.run.record import SHARED_FIELDS
from embbench.run.resolve import Run
from embbench.run.settings import BASE_PRECISION
from embbench.run.tuning import tuning_record
from embbench.schemes import FeatureSpec, build_features, distinct_plans, full_table_bytes
from embbench.tables import TableInit, initialise_tables
from embbench.tasks import Task, TaskData, metric_record
from embbench.training import PlainStep, TrainConfig, TrainResult


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def table_init(cell: Cell) -> TableInit | None:
    """The initialisation a cell's ``init`` setting gives every embedding table; None: each scheme's own."""
    if cell["init"] == "scheme":
        return None
    return TableInit(cell["init"], std=cell["init_std"], scale=cell["init_scale"], fan=cell["dim"])


def build_model(run: Run, task: Task, data: TaskData, sharded_tables: bool | None = None) -> nn.Module:
    """The run's model on its device: each feature's module built from its plan and seed (its stated size
    held equal to its state; the modules of a shared plan built and counted together), all in one
    :class:`FeatureEmbeddings` as the placement says."""
    assert run.placement is not None
    data = select_bags(data, run.trained["bags"])
    modules = build_features(run.scheme, run.trained.scheme.name, data.features, run.plans, run.feature_seeds)
    init = table_init(run.trained)
    if init is not None:  # the suite's init overrides the schemes' own, before the collection takes the rows
        for module in modules.values():
            initialise_tables(module, init)
    tables = run.placement.tables
    bags = {name: BagIndex(source, run.trained["bag_mode"]) for name, source in data.bags.items()}
    embeddings = FeatureEmbeddings(modules, tables, bags)
    torch.manual_seed(run.trained.seed)
    model = task.build_model(run.model_class, embeddings, data, run.trained["dim"], dict(run.model_params))
    return model.to(run.placement.device)


def base_record(cell: Cell, run: Run, features: dict[str, FeatureSpec]) -> dict[str, Any]:
    placement = run.placement
    record: dict[str, Any] = {
        "cell_key": cell.key,
        "suite": cell.suite,
        "task": cell["task"],
        "dataset": cell.dataset.label,
        "model": cell.model.label,
        "scheme": cell.scheme.name,
        "scheme_label": cell.label,
        "precision": cell.precision,
        "budget": cell.budget,
        "device": cell.device,
        "seed": cell.seed,
        "config_json": cell.config(),
        **tuning_record(cell),
        "provenance_json": dict(cell.provenance),
        "plan_json": {
            name: {
                "params": plan.params, "size_bytes": plan.size_bytes, "budget_bytes": plan.budget_bytes,
                "unseen": run.scheme.unseen_for(plan), "notes": plan.notes,
                **({"shared_by": list(plan.shared_by)} if plan.shared_by else {}),
            }
            for name, plan in run.plans.items()
        },
        # a plan shared by several features once: its module is stored once
        "size_bytes": sum(p.size_bytes for p in distinct_plans(run.plans)),
        "budget_bytes": sum(p.budget_bytes for p in distinct_plans(run.plans)),
        "full_bytes": sum(full_table_bytes(f.vocabulary, f.dim) for f in features.values()),
        "embedding_optimizer": cell["embedding_optimizer"],
        "embedding_learning_rate": cell["embedding_learning_rate"],
        "git_commit": git_commit(),
        "host": host(),
        "threads": torch.get_num_threads(),
        "world_size": cell.world_size,
        "started_at": now(),
    }
    if placement is not None:
        record.update(table_backend=placement.table_backend, table_kernel=placement.tables.kernel)
    return record


def execute(
    run: Run,
    task: Task,
    data: TaskData,
    only: Collection[str] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    is_main: bool = True,
) -> list[dict[str, Any]]:
    """Train ``run`` once and give a record for each of its cells (or only those whose key is in ``only``),
    in order. Records of other ranks than the main one are not meant to be stored."""
    cells = [cell for cell in run.cells if only is None or cell.key in only]
    data = select_bags(data, run.trained["bags"])  # the run's own bag features, of all the suite attached
    record, model = _train(run, task, data, on_epoch, is_main)
    records = []
    for cell in cells:
        if cell.precision == BASE_PRECISION:
            records.append({**record, "cell_key": cell.key, "config_json": cell.config()})
        elif is_main:
            records.append(_quantized_record(cell, run, record, model, task, data))
        else:
            records.append({**record, "cell_key": cell.key, "precision": cell.precision})
    return records


def _train(
    run: Run,
    task: Task,
    data: TaskData,
    on_epoch: Callable[[dict[str, float]], None] | None,
    is_main: bool,
) -> tuple[dict[str, Any], nn.Module | None]:
    """The training run's (fp32) record and its trained model (None unless the record is ok)."""
    started = time.perf_counter()
    record = base_record(run.trained, run, data.features)
    placement = run.placement
    if placement is None or run.refusal is not None:
        record.update(status="skipped", error=run.refusal, finished_at=now(), wall_seconds=0.0)
        return record, None
    device = placement.device
    record.update(device_name=device_name(device), environment_json=environment(device))
    model = None
    try:
        peak_window = reset_peak_resident()
        memory_before = _memory_in_use(device)
        model = build_model(run, task, data)
        record["dense_bytes"] = model.dense_size_bytes()
        first_step: dict[str, int | None] = {}

        def after_first_step() -> None:
            first_step["bytes"] = _memory_growth(device, memory_before)

        if placement.sharding is not None:
            from embbench.distributed import ShardedStep, full_state_dict

            step: Any = ShardedStep(model, run.training, placement, after_first_step)
        else:
            step = PlainStep(model, run.training, device, after_first_step)
        result = task.fit(model, data, run.training, run.trained.seed, step, on_epoch=on_epoch)
        memory = optimizer_memory(model, step.optimizers) if placement.sharding is None else None
        if placement.sharding is not None:
            # The trained model's tables are shards: later steps use an unsharded replica of its weights.
            state = full_state_dict(step.wrapped)
            model = build_model(run, task, data)
            model.load_state_dict(state)
            record.update(sharding=step.info.sharding_type, sharding_json=step.info.as_dict())
        else:
            record.update(sharding="none")
        embeddings = getattr(model, "embeddings", None)
        if isinstance(embeddings, FeatureEmbeddings):
            record["table_kernel"] = embeddings.kernel if placement.sharding is None else "sharded"
            if embeddings.tables is not None:
                record["tables_json"] = embeddings.tables.describe()
        record.update(
            status="ok",
            **metric_record("test", result.test),
            **metric_record("val", result.validation),
            dense_optimizer=_dense_optimizer(run.training),
            train_seconds=result.train_seconds,
            eval_seconds=result.eval_seconds,
            epochs_run=len(result.history),
            best_epoch=result.best_epoch,
            history_json=result.history,
            **_regime_record(run.training, result),
            train_examples_per_second=result.examples_per_second,
            peak_memory_bytes=first_step.get("bytes"),
            # the whole process (data included) while building and training this cell
            peak_rss_bytes=peak_resident_bytes() if peak_window else None,
        )
        if memory is not None:
            record.update(table_optimizer_bytes=memory.table_bytes, dense_optimizer_bytes=memory.dense_bytes)
        if run.latency_batch_sizes and is_main:  # other ranks' records are not stored
            record.update(_latency_record(model, task, data, device, run.latency_batch_sizes))
    except Diverged as exc:  # not a result: failed, with where it diverged and the finished epochs
        record.update(status="failed", error=str(exc), history_json=exc.history, epochs_run=len(exc.history))
        model = None
    except (Exception, SystemExit):  # one failing run (a plugin's sys.exit too) must not stop the sweep
        record.update(status="failed", error=traceback.format_exc())
        model = None
    record.update(wall_seconds=time.perf_counter() - started, finished_at=now())
    return record, model


def _dense_optimizer(config: TrainConfig) -> str:
    """The torch optimizer the dense parameters trained with: AdamW only where it decayed them decoupled."""
    return "adamw" if config.optimizer == "adamw" and config.weight_decay > 0 else "adam"


def _regime_record(config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """The regime columns: how the tested epoch was chosen, the one-epoch model's metrics, and when the watched
    validation metric reached the target."""
    target = result.target
    return {
        "early_stopping": config.early_stopping,
        **metric_record("one_epoch_test", result.one_epoch_test),
        **metric_record("one_epoch_val", result.one_epoch_validation),
        "target_val_metric": config.target_val_metric,
        "epochs_to_target": None if target is None else target.epochs,
        "seconds_to_target": None if target is None else target.seconds,
        "steps_to_target": None if target is None else target.steps,
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


def _quantized_record(
    cell: Cell, run: Run, trained: dict[str, Any], model: nn.Module | None, task: Task, data: TaskData
) -> dict[str, Any]:
    """The record of ``cell``: the trained model's tables quantised to ``cell.precision``, evaluated again."""
    started = time.perf_counter()
    record = {
        **{name: trained[name] for name in SHARED_FIELDS if name in trained},
        "cell_key": cell.key,
        "scheme_label": cell.label,
        "precision": cell.precision,
        "config_json": cell.config(),
        "started_at": now(),
    }
    if model is None:  # the training run was skipped or failed: so is this precision, for the same reason
        where = "" if trained["status"] == "skipped" else f"training the {BASE_PRECISION} model failed:\n"
        record.update(status=trained["status"], error=where + str(trained.get("error")), finished_at=now(),
                      wall_seconds=0.0)
        return record
    assert run.placement is not None
    device = run.placement.device
    try:
        quantized = quantize_model(model, cell.precision)  # a copy; the dense layers are not quantised
        sizes = quantized_feature_bytes(quantized)
        record["plan_json"] = {
            name: {**plan, "size_bytes": sizes[name], "fp32_size_bytes": plan["size_bytes"]}
            for name, plan in trained["plan_json"].items()
        }
        record["size_bytes"] = sum(sizes.values())
        evaluated = time.perf_counter()
        test = require_finite_metrics(task.evaluate(quantized, data, "test", device, run.training), "test")
        validation = require_finite_metrics(
            task.evaluate(quantized, data, "validation", device, run.training), "validation"
        )
        record.update(
            status="ok",
            **metric_record("test", test),
            **metric_record("val", validation),
            eval_seconds=time.perf_counter() - evaluated,
        )
        if run.latency_batch_sizes:
            record.update(_latency_record(quantized, task, data, device, run.latency_batch_sizes))
    except QuantizationUnavailable as exc:  # a property of the scheme or the installation: not run again
        record.update(status="skipped", error=str(exc), size_bytes=None)
    except Diverged as exc:  # the quantised model's scores or metrics are not numbers: no result
        record.update(status="failed", error=f"{exc} ({cell.precision} model)")
    except Exception:  # one failing precision must not stop the sweep; its traceback is kept
        record.update(status="failed", error=traceback.format_exc())
    record.update(wall_seconds=time.perf_counter() - started, finished_at=now())
    return record


def _memory_in_use(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes()


def _memory_growth(device: torch.device, before: int | None) -> int | None:
    """Memory added since ``before``: peak bytes allocated on a GPU; resident-set growth on a CPU (an
    estimate: freed memory the allocator keeps, or reuses, blurs it)."""
    if before is None:
        return None
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) - before)
    after = resident_bytes()
    return None if after is None else max(0, after - before)
