"""``ranking``: implicit-feedback top-k ranking (NCF / DHE paper protocol).

Every interaction is a positive; per user the last interaction by time is the test item and the second-last
the validation item (leave-last-out), or (``split = "global-temporal"``) each user's first interaction after a
cut-off time common to all users. Training samples ``num_negatives`` items per positive each epoch; each
held-out item is ranked against every catalogue item the user has not interacted with: AUC, HR@10, NDCG@10.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from embbench import (
    SPLIT_PROTOCOLS,
    Dataset,
    EpochRows,
    RankingAccumulator,
    RecModel,
    Split,
    SplitProtocol,
    Task,
    TaskData,
    TrainConfig,
    features_of,
    pool_batch,
    prepare_split,
    require_finite_scores,
)


class RankingIndex:
    """Index arrays for full-ranking evaluation of one split, built once and reused every epoch."""

    def __init__(self, split: Split) -> None:
        self.items = torch.as_tensor(split.items, dtype=torch.int64)
        self.negative_pool = torch.as_tensor(split.sampling_items, dtype=torch.int64)
        self.users = torch.as_tensor(split.users, dtype=torch.int64)
        self.num_items = len(split.items)
        self.train_user_rows = np.searchsorted(split.users, split.train["user"].to_numpy())
        self.train_item_cols = np.searchsorted(split.items, split.train["item"].to_numpy())
        order = np.argsort(self.train_user_rows, kind="stable")
        self.train_user_rows, self.train_item_cols = self.train_user_rows[order], self.train_item_cols[order]
        self.held_out: dict[str, np.ndarray] = {}
        for name, frame in (("validation", split.validation), ("test", split.test)):
            rows = np.searchsorted(split.users, frame["user"].to_numpy())
            cols = np.full(len(split.users), -1, dtype=np.int64)
            cols[rows] = np.searchsorted(split.items, frame["item"].to_numpy())
            self.held_out[name] = cols
        # the users each held-out set ranks: every user under leave-last-out; under global-temporal those
        # with an interaction in its period
        self.evaluated = {name: np.flatnonzero(cols >= 0) for name, cols in self.held_out.items()}
        self.row_starts = np.searchsorted(self.train_user_rows, np.arange(len(split.users) + 1))
        self.train_users = torch.tensor(split.train["user"].to_numpy(), dtype=torch.int64)
        self.train_items = torch.tensor(split.train["item"].to_numpy(), dtype=torch.int64)

    def epoch_rows(self, negatives_per: int, generator: torch.Generator) -> EpochRows:
        """Every training interaction (label 1) and ``negatives_per`` items per interaction drawn uniformly
        from the split's ``sampling_items`` for the same user (label 0)."""
        pool = self.negative_pool
        negative_cols = torch.randint(0, len(pool), (len(self.train_items) * negatives_per,), generator=generator)
        users = torch.cat((self.train_users, self.train_users.repeat_interleave(negatives_per)))
        items = torch.cat((self.train_items, pool[negative_cols]))
        labels = torch.cat((torch.ones(len(self.train_items)), torch.zeros(len(negative_cols))))
        return (users, items), labels

    def excluded_mask(self, which: str, rows: np.ndarray) -> torch.Tensor:
        """bool [len(rows), M]: of the users at ``rows`` (positions in ``users``), their training items and their
        other held-out item, where they have one."""
        mask = torch.zeros(len(rows), self.num_items, dtype=torch.bool)
        lo, sizes = self.row_starts[rows], self.row_starts[rows + 1] - self.row_starts[rows]
        trained = np.repeat(lo - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
        trained_rows = np.repeat(np.arange(len(rows)), sizes)
        mask[torch.as_tensor(trained_rows), torch.as_tensor(self.train_item_cols[trained])] = True
        other_cols = self.held_out["test" if which == "validation" else "validation"][rows]
        has_other = np.flatnonzero(other_cols >= 0)
        mask[torch.as_tensor(has_other), torch.as_tensor(other_cols[has_other])] = True
        positive = torch.as_tensor(self.held_out[which][rows])
        mask[torch.arange(len(rows)), positive] = False
        return mask


@torch.no_grad()
def evaluate_ranking(
    model: RecModel, index: RankingIndex, which: str, device: torch.device, batch_users: int
) -> dict[str, float]:
    """Mean AUC, HR@10 and NDCG@10 of ranking each user's held-out item among all non-interacted items (over
    the users that have one)."""
    was_training = model.training
    model.eval()
    item_vectors = torch.cat(
        [model.item_vectors(chunk.to(device)) for chunk in index.items.split(65536)], dim=0
    )
    accumulator = RankingAccumulator()
    evaluated = index.evaluated[which]
    for start in range(0, len(evaluated), batch_users):
        rows = evaluated[start:start + batch_users]
        user_vectors = model.user_vectors(index.users[torch.as_tensor(rows)].to(device))
        scores = model.interact_all(user_vectors, item_vectors).float().cpu()
        require_finite_scores(scores, which)
        positive = torch.as_tensor(index.held_out[which][rows])
        accumulator.add(scores, positive, index.excluded_mask(which, rows))
    model.train(was_training)
    return accumulator.result()


@dataclass
class RankingData:
    """A split and, built on first use, its evaluation index arrays."""

    split: Split

    @functools.cached_property
    def index(self) -> RankingIndex:
        return RankingIndex(self.split)


class Ranking(Task):
    """Implicit-feedback ranking: leave-last-out (or global-temporal), sampled negatives, full-catalogue AUC /
    HR@10 / NDCG@10."""

    summary = "implicit-feedback ranking: leave-last-out split, full-catalogue AUC, HR@10, NDCG@10"
    model_api = RecModel
    metrics = ("auc", "hr@10", "ndcg@10")
    early_stopping = ("auc", "hr@10")
    bag_owners = ("user", "item")  # the split keeps the dataset's raw IDs
    splits = SPLIT_PROTOCOLS

    def prepare(self, dataset: Dataset, dim: int, split: SplitProtocol | None = None) -> TaskData:
        data_split = prepare_split(dataset, protocol=split)
        features = features_of(data_split, dim, dataset.item_side_features())
        return TaskData(features, RankingData(data_split), data_split.summary())

    def build_model(
        self, model_class: type, embeddings: Mapping[str, nn.Module], data: TaskData, dim: int, params: dict
    ) -> nn.Module:
        return model_class(embeddings, dim, **params)

    def probe_model(self, model_class: type, dim: int, params: dict) -> nn.Module:
        return model_class({"user": nn.Embedding(1, dim), "item": nn.Embedding(1, dim)}, dim, **params)

    def epoch_rows(self, data: TaskData, config: TrainConfig, generator: torch.Generator) -> EpochRows:
        return data.payload.index.epoch_rows(config.num_negatives, generator)

    def evaluate(
        self, model: nn.Module, data: TaskData, which: str, device: torch.device, config: TrainConfig
    ) -> dict[str, float]:
        return evaluate_ranking(model, data.payload.index, which, device, config.eval_batch_users)

    def model_batch(self, data: TaskData, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        split: Split = data.payload.split
        users, items = torch.as_tensor(split.users), torch.as_tensor(split.items).roll(7)
        return pool_batch(users, batch_size, device), pool_batch(items, batch_size, device)
