"""Training with early stopping (:func:`fit`, shared by every task), and the ranking task's pieces: sampled
negatives and evaluation by ranking the full item catalogue.

:func:`fit` trains on the rows an epoch provides with binary cross-entropy and Adam, evaluates validation
after every epoch, stops when the validation metric has not improved for ``patience`` epochs, and tests the
best epoch's weights. For ranking, each training interaction is a positive and each epoch draws
``num_negatives`` items per positive uniformly from the catalogue; the validation item of each user is
ranked against all catalogue items the user has not interacted with.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from embbench.data import Split
from embbench.metrics import RankingAccumulator
from embbench.models import RecModel

#: an epoch's training rows: the model's input tensors (row-aligned) and the 0/1 labels
EpochRows = tuple[tuple[torch.Tensor, ...], torch.Tensor]
#: validation metrics training can stop on; logloss is the one where lower is better
EARLY_STOPPING_METRICS = ("auc", "hr@10", "logloss")
LOWER_IS_BETTER = ("logloss",)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 1e-3
    num_negatives: int = 4
    patience: int = 2
    early_stopping: str = "auc"  # the validation metric: "auc", "hr@10" (ranking) or "logloss"
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
        if self.early_stopping not in EARLY_STOPPING_METRICS:
            raise ValueError(
                f"early_stopping must be one of {', '.join(EARLY_STOPPING_METRICS)}, got '{self.early_stopping}'"
            )

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
        self.train_users = torch.tensor(split.train["user"].to_numpy(), dtype=torch.int64)
        self.train_items = torch.tensor(split.train["item"].to_numpy(), dtype=torch.int64)

    def epoch_rows(self, negatives_per: int, generator: torch.Generator) -> EpochRows:
        """Every training interaction (label 1) and ``negatives_per`` items per interaction drawn uniformly
        from the catalogue for the same user (label 0)."""
        negative_cols = torch.randint(0, self.num_items, (len(self.train_items) * negatives_per,), generator=generator)
        users = torch.cat((self.train_users, self.train_users.repeat_interleave(negatives_per)))
        items = torch.cat((self.train_items, self.items[negative_cols]))
        labels = torch.cat((torch.ones(len(self.train_items)), torch.zeros(len(negative_cols))))
        return (users, items), labels

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


@dataclass
class Sharding:
    """Train under torchrec DistributedModelParallel over the current process group (:func:`sharded`).

    ``fit`` shards the model (``embbench.distributed.shard_model``): tables take ``embedding_optimizer`` (a
    fused optimizer) at ``embedding_learning_rate``, the other parameters Adam at the training learning rate;
    every rank steps through the same global batches and trains on its slice of each. The model's own table
    modules become the shards, so evaluation through it is collective: every rank evaluates the same rows in
    the same order. ``wrapped`` and ``info`` are filled in by ``fit``.
    """

    sharding_type: str
    embedding_optimizer: str
    embedding_learning_rate: float
    wrapped: nn.Module | None = None
    info: Any = None


_SHARDING: contextvars.ContextVar[Sharding | None] = contextvars.ContextVar("embbench_sharding", default=None)


@contextlib.contextmanager
def sharded(sharding: Sharding) -> Iterator[Sharding]:
    """Within the block, :func:`fit` trains sharded as ``sharding`` says."""
    token = _SHARDING.set(sharding)
    try:
        yield sharding
    finally:
        _SHARDING.reset(token)


class _PlainStep:
    """One optimisation step of the whole model with Adam in this process."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.model, self.device = model, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        logits = self.model(*(tensor.to(self.device) for tensor in inputs))
        loss = self.loss_fn(logits, labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


class _ShardedStep:
    """One step of a DMP / DDP-wrapped model on this rank's slice of the global batch."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, sharding: Sharding) -> None:
        from embbench.distributed import make_optimizers, shard_model, sharding_info

        self.wrapped = shard_model(
            model, sharding.sharding_type, sharding.embedding_optimizer, sharding.embedding_learning_rate, device
        )
        sharding.wrapped, sharding.info = self.wrapped, sharding_info(self.wrapped)
        self.optimizers = make_optimizers(self.wrapped, "adam", config.learning_rate)

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        from embbench.distributed import train_step

        return train_step(self.wrapped, self.optimizers, inputs, labels)

    def state(self) -> dict[str, Any]:
        from embbench.distributed import full_state_dict

        return full_state_dict(self.wrapped)

    def restore(self, state: dict[str, Any]) -> None:
        from embbench.distributed import load_full_state_dict

        load_full_state_dict(self.wrapped, state)


def fit(
    model: nn.Module,
    epoch_rows: Callable[[torch.Generator], EpochRows],
    evaluate_split: Callable[[str], dict[str, float]],
    config: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on the rows ``epoch_rows`` gives each epoch, in shuffled mini-batches
    (``model(*inputs)`` gives logits); early-stop on ``evaluate_split("validation")``; test the best epoch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    sharding = _SHARDING.get()
    step = _PlainStep(model, config, device) if sharding is None else _ShardedStep(model, config, device, sharding)
    sign = -1.0 if config.early_stopping in LOWER_IS_BETTER else 1.0
    embeddings = model.embedding_modules().values() if hasattr(model, "embedding_modules") else ()
    result = TrainResult()
    best_score, best_state, stale = -np.inf, None, 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        inputs, labels = epoch_rows(generator)
        order = torch.randperm(len(labels), generator=generator)
        total_loss, batches = 0.0, 0
        for batch in order.split(config.batch_size):
            if len(batch) == 1 and len(order) > 1:  # a lone last row: BatchNorm cannot train on one row
                continue
            total_loss += step(tuple(tensor[batch] for tensor in inputs), labels[batch])
            batches += 1
        for embedding in embeddings:
            hook = getattr(embedding, "on_epoch_end", None)
            if callable(hook):  # e.g. CCE re-clusters its tables between epochs
                hook(epoch)
        train_seconds = time.perf_counter() - started
        result.train_seconds += train_seconds
        result.train_examples += len(labels)
        started = time.perf_counter()
        validation = evaluate_split("validation")
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
        score = sign * validation[config.early_stopping]
        if score > best_score:
            best_score, stale = score, 0
            best_state = step.state()
            result.best_epoch, result.validation = epoch, validation
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        step.restore(best_state)
    started = time.perf_counter()
    result.test = evaluate_split("test")
    result.eval_seconds += time.perf_counter() - started
    return result


def train_and_evaluate(
    model: RecModel,
    split: Split,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Ranking: train ``model`` on ``split.train`` with sampled negatives, early-stop on validation, test the
    best epoch."""
    task = RankingTask(split)

    def evaluate_split(which: str) -> dict[str, float]:
        return evaluate(model, task, which, device, config.eval_batch_users)

    return fit(
        model, lambda generator: task.epoch_rows(config.num_negatives, generator), evaluate_split, config, seed,
        device, on_epoch,
    )
