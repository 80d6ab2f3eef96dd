"""The result record, declared once: every column a cell's row has, its SQLite type, whether it holds JSON,
whether ``embbench results --json/--csv`` shows it (a stable contract: public columns are only ever appended),
whether the report groups rows by it, and whether a quantised row takes it from its training run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embbench.tasks import METRIC_COLUMNS


@dataclass(frozen=True)
class Column:
    name: str
    sql: str
    doc: str
    public: bool = True  # in `embbench results` output, in this order
    json: bool = False  # stored as JSON text
    group: int = 0  # the report groups rows (seeds) by the columns with group > 0, in this order
    shared: bool = False  # a quantised row of the same training run takes it from the fp32 row
    field: str = ""  # its name in `embbench results` when not the column's (e.g. history_json -> history)
    json_value: bool = False  # `results --json` gives the JSON value itself, not its text (CSV: the text)

    @property
    def result_field(self) -> str:
        return self.field or self.name


def _metric_columns() -> list[Column]:
    return [
        Column(f"{split}_{column}", "REAL", f"{split} {metric}")
        for split in ("test", "val")
        for metric, column in METRIC_COLUMNS.items()
    ]


_PUBLIC = [
    Column("suite", "TEXT NOT NULL", "suite name", group=1, shared=True),
    Column("dataset", "TEXT NOT NULL", "dataset label", group=2, shared=True),
    Column("model", "TEXT NOT NULL", "model label", group=3, shared=True),
    Column("scheme", "TEXT NOT NULL", "scheme name", shared=True),
    Column("scheme_label", "TEXT NOT NULL", "scheme label (with the precision when not fp32)", group=5),
    Column("budget", "TEXT NOT NULL", "the budget as written: a fraction or bytes", group=6, shared=True),
    Column("size_bytes", "INTEGER", "bytes the embeddings store (all features)"),
    Column("budget_bytes", "INTEGER", "bytes allowed (all features)", shared=True),
    Column("full_bytes", "INTEGER", "bytes of the full tables (all features)", shared=True),
    Column("device", "TEXT NOT NULL", "device setting (cpu, cuda, auto)", group=4, shared=True),
    Column("device_name", "TEXT", "the device that ran", shared=True),
    Column("seed", "INTEGER NOT NULL", "random seed", shared=True),
    Column("status", "TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'skipped'))", "ok, failed or skipped"),
    *[c for c in _metric_columns() if c.name in ("test_auc", "test_hr10", "test_ndcg10", "val_auc", "val_hr10")],
    Column("train_seconds", "REAL", "training time, all epochs", shared=True),
    Column("eval_seconds", "REAL", "evaluation time"),
    Column("epochs_run", "INTEGER", "epochs trained", shared=True),
    Column("best_epoch", "INTEGER", "the epoch whose weights were tested", shared=True),
    Column("table_backend", "TEXT", "where the tables lived: torchrec or torch", shared=True),
    Column("threads", "INTEGER", "torch threads", shared=True),
    Column("git_commit", "TEXT", "embbench's git commit", shared=True),
    Column("finished_at", "TEXT", "UTC time the row was written"),
    Column("error", "TEXT", "why a cell failed or was skipped"),
    Column("task", "TEXT", "task plugin", shared=True),
    Column("precision", "TEXT", "table precision (NULL in old databases: fp32)"),
    Column("test_logloss", "REAL", "test log-loss"),
    Column("val_logloss", "REAL", "validation log-loss"),
    Column("peak_memory_bytes", "INTEGER",
           "memory growth from building the model to after its first training step", shared=True),
    Column("train_examples_per_second", "REAL", "training throughput", shared=True),
    Column("embedding_latency_ms", "REAL", "embedding look-up latency of the largest batch, all features"),
    Column("model_latency_ms", "REAL", "whole-model latency of the largest batch"),
    Column("peak_rss_bytes", "INTEGER", "process peak RSS while building and training", shared=True),
    Column("embedding_optimizer", "TEXT", "table optimizer", shared=True),
    Column("table_kernel", "TEXT", "table kernel that ran: fused, sparse, dense, sharded (joined by +)", shared=True),
    Column("table_optimizer_bytes", "INTEGER", "optimizer state of the tables after training", shared=True),
    Column("dense_optimizer_bytes", "INTEGER", "optimizer state of the dense parameters after training",
           shared=True),
    Column("sharding", "TEXT", "sharding type used (none: unsharded)", shared=True),
    Column("world_size", "INTEGER", "processes", shared=True),
    Column("plan_json", "TEXT", "each feature's plan: parameters, size, budget, unseen-ID handling, notes",
           json=True, shared=True),
    Column("early_stopping", "TEXT",
           "the regime of the test_ and val_ metrics: the validation metric early stopping chose the tested epoch "
           "by, or none (the last epoch)", shared=True),
    *[Column(f"one_epoch_{split}_{column}", "REAL", f"{split} {metric} of the model right after epoch 1 (a regime)",
             shared=True)
      for split in ("test", "val") for metric, column in METRIC_COLUMNS.items()],
    Column("target_val_metric", "REAL",
           "the validation target of the early-stopping metric (auc under early_stopping none); NULL: none",
           shared=True),
    Column("epochs_to_target", "INTEGER", "the first epoch whose validation metric reached the target (NULL: never)",
           shared=True),
    Column("seconds_to_target", "REAL", "training seconds until the end of that epoch", shared=True),
    Column("steps_to_target", "INTEGER", "optimizer steps until the end of that epoch", shared=True),
    Column("history_json", "TEXT",
           "every epoch: epoch, loss, train_seconds, steps, learning_rate (dense) and the val_ metrics",
           json=True, shared=True, field="history", json_value=True),
    Column("tuning", "TEXT", "trial (a tuning trial: validation only, never tested) or selected (a point's chosen "
           "configuration, its scheme label ending ' (tuned)'); NULL: untuned", shared=True),
    Column("trial", "INTEGER", "the trial (a trial row) or the chosen trial (a selected row)", shared=True),
    Column("tuning_json", "TEXT", "the search: trials per point, sampler seed, selection metric, space, values",
           json=True, shared=True, field="tuning_search", json_value=True),
]
_PRIVATE = [
    Column("cell_key", "TEXT PRIMARY KEY", "hash of the cell's identity", public=False),
    Column("val_ndcg10", "REAL", "validation NDCG@10", public=False),
    Column("dense_bytes", "INTEGER", "bytes of the model's own parameters", public=False, shared=True),
    Column("wall_seconds", "REAL", "wall time of the cell", public=False),
    Column("dense_optimizer", "TEXT", "optimizer of the dense parameters", public=False, shared=True),
    Column("embedding_learning_rate", "REAL", "table learning rate", public=False, shared=True),
    Column("sharding_json", "TEXT", "the sharding plan", public=False, json=True, shared=True),
    Column("tables_json", "TEXT", "the table collection: kernel, tables, slots, kernel calls per batch",
           public=False, json=True, shared=True),
    Column("provenance_json", "TEXT", "distribution and version of every plugin in the cell", public=False,
           json=True, shared=True),
    Column("config_json", "TEXT NOT NULL", "the cell's configuration (its identity and labels)", public=False,
           json=True),
    Column("latency_json", "TEXT", "every latency measurement", public=False, json=True),
    Column("environment_json", "TEXT", "library versions and hardware", public=False, json=True, shared=True),
    Column("host", "TEXT", "host name", public=False, shared=True),
    Column("started_at", "TEXT", "UTC time the cell started", public=False),
]
RECORD: tuple[Column, ...] = (*_PUBLIC, *_PRIVATE)
BY_NAME = {column.name: column for column in RECORD}
#: store columns (name -> SQLite type)
COLUMNS: dict[str, str] = {column.name: column.sql for column in RECORD}
JSON_COLUMNS = tuple(column.name for column in RECORD if column.json)
#: `embbench results --json/--csv` fields, in contract order
RESULT_FIELDS = [column.result_field for column in RECORD if column.public]
#: public fields whose JSON text `results --json` gives as the value itself
JSON_VALUE_FIELDS = tuple(column.result_field for column in RECORD if column.public and column.json_value)
#: the columns a report groups seeds by
GROUP_KEYS = [column.name for column in sorted(RECORD, key=lambda c: c.group) if column.group]
#: what a quantised row takes from its training run
SHARED_FIELDS = tuple(column.name for column in RECORD if column.shared)


def result_frame(frame: Any) -> Any:
    """The `embbench results` fields of stored rows (a :meth:`ResultStore.frame` DataFrame): the public columns
    under their field names, in contract order."""
    renamed = frame.rename(columns={c.name: c.result_field for c in RECORD if c.public and c.field})
    return renamed[[name for name in RESULT_FIELDS if name in renamed.columns]]


assert len(BY_NAME) == len(RECORD), "a column is declared twice"
assert len(set(RESULT_FIELDS)) == len(RESULT_FIELDS), "a results field is declared twice"
assert {f"{s}_{c}" for s in ("test", "val") for c in METRIC_COLUMNS.values()} <= set(BY_NAME), "a metric lacks a column"
