"""``ranking``: implicit-feedback top-k ranking (NCF / DHE paper protocol).

Every interaction is a positive; per user the last interaction by time is the test item and the second-last
the validation item (leave-last-out). Training samples ``num_negatives`` items per positive each epoch; the
held-out item is ranked against every catalogue item the user has not interacted with: AUC, HR@10, NDCG@10.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from embbench.data import Dataset, Split, features_of, prepare_split
from embbench.latency import pool_batch
from embbench.models import RecModel
from embbench.tasks import Task, TaskData
from embbench.training import EpochRows, RankingTask, TrainConfig, evaluate


@dataclass
class RankingData:
    """A leave-last-out split and, built on first use, its evaluation index arrays."""

    split: Split

    @functools.cached_property
    def index(self) -> RankingTask:
        return RankingTask(self.split)


class Ranking(Task):
    """Implicit-feedback ranking: leave-last-out, sampled negatives, full-catalogue AUC / HR@10 / NDCG@10."""

    summary = "implicit-feedback ranking: leave-last-out split, full-catalogue AUC, HR@10, NDCG@10"
    model_api = RecModel
    metrics = ("auc", "hr@10", "ndcg@10")
    early_stopping = ("auc", "hr@10")

    def prepare(self, dataset: Dataset, dim: int) -> TaskData:
        split = prepare_split(dataset)
        features = features_of(split, dim, dataset.item_side_features())
        return TaskData(features, RankingData(split), split.summary())

    def build_model(
        self, model_class: type, embeddings: Mapping[str, nn.Module], data: TaskData, dim: int, params: dict
    ) -> nn.Module:
        return model_class(embeddings["user"], embeddings["item"], dim, **params)

    def probe_model(self, model_class: type, dim: int, params: dict) -> nn.Module:
        return model_class(nn.Embedding(1, dim), nn.Embedding(1, dim), dim, **params)

    def epoch_rows(self, data: TaskData, config: TrainConfig, generator: torch.Generator) -> EpochRows:
        return data.payload.index.epoch_rows(config.num_negatives, generator)

    def evaluate(
        self, model: nn.Module, data: TaskData, which: str, device: torch.device, config: TrainConfig
    ) -> dict[str, float]:
        return evaluate(model, data.payload.index, which, device, config.eval_batch_users)

    def model_batch(self, data: TaskData, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        split: Split = data.payload.split
        users, items = torch.as_tensor(split.users), torch.as_tensor(split.items).roll(7)
        return pool_batch(users, batch_size, device), pool_batch(items, batch_size, device)
