"""The task API: what is learned from a dataset, with which kind of model, and how it is scored.

A task plugin (entry-point group ``embbench.tasks``) turns a dataset into :class:`TaskData` (the categorical
features every scheme instance is planned for, and whatever the task trains and evaluates on), builds the
model from a model plugin and one embedding module per feature, trains it with early stopping, and scores
held-out rows. The runner knows nothing else about tasks: ranking, rating classification and click-through
are plugins like schemes, datasets and models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from embbench.bags import BagSource
from embbench.data import LEAVE_LAST_OUT, Dataset
from embbench.schemes import FeatureSpec
from embbench.training import EpochRows, TrainConfig, TrainResult, TrainStep, fit

#: the results store has a column for each of these metrics, test_ and val_ prefixed
METRIC_COLUMNS = {"auc": "auc", "hr@10": "hr10", "ndcg@10": "ndcg10", "logloss": "logloss"}


@dataclass
class TaskData:
    """A dataset prepared for a task: the features schemes are planned for, and the task's own payload.
    ``bags`` holds the lists of each bag feature among ``features`` (:func:`embbench.bags.attach_bags`)."""

    features: dict[str, FeatureSpec]
    payload: Any
    summary: dict[str, int] = field(default_factory=dict)
    bags: dict[str, BagSource] = field(default_factory=dict)


class Task(ABC):
    """Base class of task plugins."""

    #: one-line description shown by ``embbench list tasks``
    summary: ClassVar[str] = ""
    #: the base class model plugins of this task derive from (RecModel or CTRModel)
    model_api: ClassVar[type]
    #: metric names ``evaluate`` returns (keys of METRIC_COLUMNS)
    metrics: ClassVar[tuple[str, ...]]
    #: metrics training may early-stop on
    early_stopping: ClassVar[tuple[str, ...]] = ("auc",)
    #: features a dataset's bag features (``Dataset.bag_features``) can attach to, their lists keyed by the
    #: feature's IDs (:meth:`bag_source`); the model adds the pooled bags to them (``RecModel`` does). Empty: the
    #: task takes no bags
    bag_owners: ClassVar[tuple[str, ...]] = ()
    #: split protocols (the suite setting ``split``) the task holds data out by: leave-last-out stands for the
    #: task's own hold-out and is the default; any other arrives as ``prepare(dataset, dim, split=SplitProtocol)``
    splits: ClassVar[tuple[str, ...]] = (LEAVE_LAST_OUT,)

    @abstractmethod
    def prepare(self, dataset: Dataset, dim: int) -> TaskData:
        """Load and split ``dataset``; raise ConfigError in one line when the dataset does not suit the task."""

    def bag_source(self, data: TaskData, source: BagSource) -> BagSource:
        """A dataset's bag feature keyed by the IDs this task gives feature ``source.owner``: as it is where those
        are the dataset's raw IDs; a task that renumbers them renumbers the keys."""
        return source

    @abstractmethod
    def build_model(
        self, model_class: type, embeddings: Mapping[str, nn.Module], data: TaskData, dim: int, params: dict
    ) -> nn.Module:
        """The model: ``model_class`` around the features' embedding modules."""

    @abstractmethod
    def epoch_rows(self, data: TaskData, config: TrainConfig, generator: torch.Generator) -> EpochRows:
        """One epoch's training rows: ``model(*inputs)`` gives logits for the 0/1 labels."""

    def fit(
        self,
        model: nn.Module,
        data: TaskData,
        config: TrainConfig,
        seed: int,
        step: TrainStep,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> TrainResult:
        """Train with ``step`` on ``epoch_rows`` with early stopping on validation
        (:func:`embbench.training.fit`); the result holds validation and test metrics."""
        return fit(
            model,
            lambda generator: self.epoch_rows(data, config, generator),
            lambda which: self.evaluate(model, data, which, step.device, config),
            config, seed, step, on_epoch,
        )

    @abstractmethod
    def evaluate(
        self, model: nn.Module, data: TaskData, which: str, device: torch.device, config: TrainConfig
    ) -> dict[str, float]:
        """The metrics of ``model`` on the held-out ``which`` ('validation' or 'test') rows."""

    @abstractmethod
    def model_batch(self, data: TaskData, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Inputs of one inference batch for ``model(*inputs)`` (full-model latency)."""

    @abstractmethod
    def probe_model(self, model_class: type, dim: int, params: dict) -> nn.Module:
        """``model_class`` built around stand-in embeddings, to check its parameters before any data loads."""


def pool_batch(pool: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """``batch_size`` IDs drawn cyclically from ``pool`` (repeats when the pool is smaller), on ``device``: a
    batch of real IDs, e.g. for :meth:`Task.model_batch` or an embedding-latency measurement."""
    repeats = -(-batch_size // len(pool))
    return pool.repeat(repeats)[:batch_size].to(device)


def metric_record(prefix: str, metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Store columns (``test_auc``, ``val_logloss``, ...) of a metrics dict; metrics a task lacks are None."""
    return {f"{prefix}_{column}": metrics.get(name) for name, column in METRIC_COLUMNS.items()}
