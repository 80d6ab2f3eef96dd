"""Binary classification of held-out rows, scored by AUC and log-loss.

- ``rating-classification``: explicit ratings binarised (rating >= 4 -> 1, <= 2 -> 0, ratings in between
  dropped), user and item IDs compacted to 0..n-1, and per user the last two labelled ratings by time held out:
  the second-last for validation, the last for test (users with fewer than three keep all rows in training).
  User-item models (GMF, MLP).
- ``ctr``: click-through rows of a CTR dataset (Criteo, Avazu, synthetic-ctr), already split by the dataset;
  one scheme instance per categorical field, dense features through the model (DLRM). A size budget applies
  to the sum over fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from embbench import (
    BagSource,
    ConfigError,
    CTRData,
    CTRDataset,
    CTRModel,
    Dataset,
    EpochRows,
    FeatureSpec,
    RecModel,
    Task,
    TaskData,
    TrainConfig,
    classification_metrics,
    require_finite_scores,
)

POSITIVE_AT_LEAST = 4.0
NEGATIVE_AT_MOST = 2.0
_EVAL_BATCH_ROWS = 65536


@dataclass
class Rows:
    """Model inputs (row-aligned tensors) and 0/1 labels of one split."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor


class _Classification(Task):
    """Pointwise training on fixed rows; AUC and log-loss on held-out rows."""

    metrics = ("auc", "logloss")
    early_stopping = ("auc", "logloss")

    def epoch_rows(self, data: TaskData, config: TrainConfig, generator: torch.Generator) -> EpochRows:
        train: Rows = data.payload["train"]
        return train.inputs, train.labels

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: TaskData, which: str, device: torch.device, config: TrainConfig
    ) -> dict[str, float]:
        rows: Rows = data.payload[which]
        was_training = model.training
        model.eval()
        logits = torch.cat([
            model(*(tensor[start:start + _EVAL_BATCH_ROWS].to(device) for tensor in rows.inputs)).float().cpu()
            for start in range(0, len(rows.labels), _EVAL_BATCH_ROWS)
        ])
        model.train(was_training)
        require_finite_scores(logits, which)
        return classification_metrics(logits, rows.labels)

    def model_batch(self, data: TaskData, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        rows: Rows = data.payload["test"]
        index = torch.arange(batch_size) % len(rows.labels)
        return tuple(tensor[index].to(device) for tensor in rows.inputs)


def _feature(name: str, ids: np.ndarray, dim: int, vocabulary_size: int | None = None) -> FeatureSpec:
    unique, counts = np.unique(ids, return_counts=True)
    return FeatureSpec(name, unique.astype(np.int64), counts.astype(np.int64), dim, vocabulary_size=vocabulary_size)


def labelled(frame: pd.DataFrame) -> np.ndarray:
    """bool [rows]: the ratings that become labels (>= 4 or <= 2 stars)."""
    rating = frame["rating"].to_numpy(dtype=np.float64)
    return (rating >= POSITIVE_AT_LEAST) | (rating <= NEGATIVE_AT_MOST)


def binarize_ratings(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows rated >= 4 (label 1) or <= 2 (label 0), with user and item IDs compacted to 0..n-1 in raw order."""
    rating = frame["rating"].to_numpy(dtype=np.float64)
    keep = labelled(frame)
    kept = frame.loc[keep, ["user", "item", "timestamp"]].reset_index(drop=True)
    kept["label"] = (rating[keep] >= POSITIVE_AT_LEAST).astype(np.float32)
    for column in ("user", "item"):
        kept[column] = np.unique(kept[column].to_numpy(dtype=np.int64), return_inverse=True)[1].astype(np.int64)
    return kept


def hold_out_last_two(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per user sorted by time (ties in file order): the last row is test, the second-last validation, for
    users with at least three rows; everything else is training."""
    order = np.lexsort((frame["timestamp"].to_numpy(), frame["user"].to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    sizes = frame.groupby("user", sort=False)["user"].transform("size").to_numpy()
    from_end = sizes - 1 - frame.groupby("user", sort=False).cumcount().to_numpy()
    held = sizes >= 3
    return {
        "train": frame[~held | (from_end >= 2)],
        "validation": frame[held & (from_end == 1)],
        "test": frame[held & (from_end == 0)],
    }


class RatingClassification(_Classification):
    """Explicit ratings as binary labels (>= 4 positive, <= 2 negative); per user the last two held out."""

    summary = "explicit ratings binarised (>=4 vs <=2), last two per user held out; AUC and log-loss"
    model_api = RecModel
    bag_owners = ("user", "item")  # compacted IDs: bag_source renumbers the lists' keys alike

    def prepare(self, dataset: Dataset, dim: int) -> TaskData:
        frame = dataset.load()
        if "rating" not in frame.columns:
            raise ConfigError(
                f"{dataset!r} has no explicit ratings; rating-classification needs a dataset with a rating "
                "column (movielens-100k, movielens-1m, movielens-latest)"
            )
        splits = hold_out_last_two(binarize_ratings(frame))
        if len(splits["test"]) == 0:
            raise ConfigError(f"{dataset!r}: no user has three ratings of 1-2 or 4-5 stars to train and hold out")
        payload = {
            name: Rows(
                (torch.tensor(rows["user"].to_numpy()), torch.tensor(rows["item"].to_numpy())),
                torch.tensor(rows["label"].to_numpy(dtype=np.float32)),
            )
            for name, rows in splits.items()
        }
        train = splits["train"]
        features = {name: _feature(name, train[name].to_numpy(dtype=np.int64), dim) for name in ("user", "item")}
        summary = {f"{name}_rows": len(rows) for name, rows in splits.items()}
        summary["train_positives"] = int(train["label"].sum())
        # the dataset's raw ID of each compacted ID 0..n-1, to key the dataset's bag features alike
        kept = frame.loc[labelled(frame)]
        payload["raw_ids"] = {name: np.unique(kept[name].to_numpy(dtype=np.int64)) for name in ("user", "item")}
        return TaskData(features, payload, summary)

    def bag_source(self, data: TaskData, source: BagSource) -> BagSource:
        return source.reindexed(data.payload["raw_ids"][source.owner])

    def probe_model(self, model_class: type, dim: int, params: dict) -> nn.Module:
        return model_class({"user": nn.Embedding(1, dim), "item": nn.Embedding(1, dim)}, dim, **params)

    def build_model(
        self, model_class: type, embeddings: Mapping[str, nn.Module], data: TaskData, dim: int, params: dict
    ) -> nn.Module:
        return model_class(embeddings, dim, **params)


class ClickThrough(_Classification):
    """Click-through prediction: one scheme instance per categorical field, a DLRM-style model."""

    summary = "click-through prediction (Criteo, Avazu, synthetic): one scheme per field, AUC and log-loss"
    model_api = CTRModel

    def prepare(self, dataset: Dataset, dim: int) -> TaskData:
        if not isinstance(dataset, CTRDataset):
            raise ConfigError(
                f"{dataset!r} is not a click-through dataset; task 'ctr' needs one such as criteo, avazu or "
                "synthetic-ctr"
            )
        data: CTRData = dataset.load_ctr()
        data.validate(repr(dataset))
        features = {
            name: _feature(name, data.train.sparse[:, column], dim, data.vocabulary_sizes.get(name))
            for column, name in enumerate(data.fields)
        }
        payload = {
            which: Rows(
                (torch.as_tensor(frame.dense), torch.as_tensor(frame.sparse)), torch.as_tensor(frame.labels)
            )
            for which in ("train", "validation", "test")
            for frame in (data.frame(which),)
        }
        payload["num_dense"] = len(data.dense_names)
        return TaskData(features, payload, data.summary())

    def probe_model(self, model_class: type, dim: int, params: dict) -> nn.Module:
        return model_class({"a": nn.Embedding(1, dim), "b": nn.Embedding(1, dim)}, 2, dim, **params)

    def build_model(
        self, model_class: type, embeddings: Mapping[str, nn.Module], data: TaskData, dim: int, params: dict
    ) -> nn.Module:
        return model_class(embeddings, data.payload["num_dense"], dim, **params)
