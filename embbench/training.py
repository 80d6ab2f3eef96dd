"""Training with sampled negatives and early stopping; evaluation by ranking the full item catalogue.

Training: each training interaction is a positive; each epoch draws ``num_negatives`` items per positive
uniformly from the catalogue; binary cross-entropy; Adam. After every epoch the validation item of each
user is ranked against all catalogue items the user has not interacted with; training stops when the
validation metric has not improved for ``patience`` epochs, and the best epoch's weights are tested.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from embbench.data import Split
from embbench.metrics import RankingAccumulator
from embbench.models import RecModel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 1e-3
    num_negatives: int = 4
    patience: int = 2
    early_stopping: str = "auc"  # the validation metric: "auc" or "hr@10"
    eval_batch_users: int = 1024

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "num_negatives": self.num_negatives >= 1,
            "patience": self.patience >= 1,
            "eval_batch_users": self.eval_batch_users >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.early_stopping not in ("auc", "hr@10"):
            raise ValueError(f"early_stopping must be 'auc' or 'hr@10', got '{self.early_stopping}'")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    best_epoch: int = 0
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_examples: int = 0  # (user, item, label) examples trained on, over all epochs

    @property
    def examples_per_second(self) -> float:
        """Training throughput: forward, backward and optimizer step, examples per second."""
        return self.train_examples / self.train_seconds if self.train_seconds > 0 else float("nan")


class RankingTask:
    """Index arrays for full-ranking evaluation of one split, built once and reused every epoch."""

    def __init__(self, split: Split) -> None:
        self.items = torch.as_tensor(split.items, dtype=torch.int64)
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
        self.row_starts = np.searchsorted(self.train_user_rows, np.arange(len(split.users) + 1))

    def excluded_mask(self, which: str, start: int, stop: int) -> torch.Tensor:
        """bool [stop-start, M]: the users' training items and their other held-out item."""
        mask = torch.zeros(stop - start, self.num_items, dtype=torch.bool)
        lo, hi = self.row_starts[start], self.row_starts[stop]
        rows = torch.as_tensor(self.train_user_rows[lo:hi] - start)
        mask[rows, torch.as_tensor(self.train_item_cols[lo:hi])] = True
        other = "test" if which == "validation" else "validation"
        other_cols = torch.as_tensor(self.held_out[other][start:stop])
        mask[torch.arange(stop - start), other_cols] = True
        positive = torch.as_tensor(self.held_out[which][start:stop])
        mask[torch.arange(stop - start), positive] = False
        return mask


@torch.no_grad()
def evaluate(model: RecModel, task: RankingTask, which: str, device: torch.device, batch_users: int) -> dict:
    """Mean AUC, HR@10 and NDCG@10 of ranking each user's held-out item among all non-interacted items."""
    was_training = model.training
    model.eval()
    item_vectors = torch.cat(
        [model.item_embedding(chunk.to(device)) for chunk in task.items.split(65536)], dim=0
    )
    accumulator = RankingAccumulator()
    for start in range(0, len(task.users), batch_users):
        stop = min(start + batch_users, len(task.users))
        user_vectors = model.user_embedding(task.users[start:stop].to(device))
        scores = model.interact_all(user_vectors, item_vectors).float().cpu()
        positive = torch.as_tensor(task.held_out[which][start:stop])
        accumulator.add(scores, positive, task.excluded_mask(which, start, stop))
    model.train(was_training)
    return accumulator.result()


def train_and_evaluate(
    model: RecModel,
    split: Split,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``split.train``, early-stop on validation, test the best epoch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    task = RankingTask(split)
    train_users = torch.tensor(split.train["user"].to_numpy(), dtype=torch.int64)
    train_items = torch.tensor(split.train["item"].to_numpy(), dtype=torch.int64)
    negatives_per = config.num_negatives
    result = TrainResult()
    best_score, best_state, stale = -np.inf, None, 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        negative_cols = torch.randint(
            0, task.num_items, (len(train_items) * negatives_per,), generator=generator
        )
        users = torch.cat((train_users, train_users.repeat_interleave(negatives_per)))
        items = torch.cat((train_items, task.items[negative_cols]))
        labels = torch.cat((torch.ones(len(train_items)), torch.zeros(len(negative_cols))))
        order = torch.randperm(len(users), generator=generator)
        total_loss, batches = 0.0, 0
        for batch in order.split(config.batch_size):
            logits = model(users[batch].to(device), items[batch].to(device))
            loss = loss_fn(logits, labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            batches += 1
        for embedding in (model.user_embedding, model.item_embedding):
            hook = getattr(embedding, "on_epoch_end", None)
            if callable(hook):  # e.g. CCE re-clusters its tables between epochs
                hook(epoch)
        train_seconds = time.perf_counter() - started
        result.train_seconds += train_seconds
        result.train_examples += len(users)
        started = time.perf_counter()
        validation = evaluate(model, task, "validation", device, config.eval_batch_users)
        result.eval_seconds += time.perf_counter() - started
        record = {
            "epoch": epoch,
            "loss": total_loss / max(batches, 1),
            "train_seconds": train_seconds,
            **{f"val_{k}": v for k, v in validation.items()},
        }
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        score = validation[config.early_stopping]
        if score > best_score:
            best_score, stale = score, 0
            best_state = copy.deepcopy(model.state_dict())
            result.best_epoch, result.validation = epoch, validation
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.test = evaluate(model, task, "test", device, config.eval_batch_users)
    return result
