"""Training with early stopping, the one loop every task shares (:func:`fit`), and the training step of one
process (:class:`PlainStep`).

:func:`fit` trains on the rows an epoch provides, in shuffled mini-batches with binary cross-entropy, through a
training step the caller chose (:class:`PlainStep` here; a sharded step under torchrun, from
:mod:`embbench.distributed`), evaluates validation after every epoch, stops when the validation metric has not
improved for ``patience`` epochs, and tests the best epoch's weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from embbench.errors import Diverged
from embbench.metrics import require_finite_metrics
from embbench.optimizers import Optimizers, make_optimizers

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
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay of the dense parameters
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
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
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


class TrainStep(Protocol):
    """One optimisation step on a batch, and the weights to keep for the best epoch."""

    device: torch.device

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        """Train on one batch; the batch's mean loss."""

    def state(self) -> dict[str, Any]:
        """A copy of the weights (to restore the best epoch)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Load weights ``state`` returned."""


class PlainStep:
    """One step of the whole model in this process: table rows by the model's table optimizer (fused into the
    backward pass, or a torch optimizer of row-sparse gradients, see :mod:`embbench.collection`), every other
    parameter by Adam (AdamW with ``config.weight_decay``) at ``config.learning_rate``."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: torch.device,
        after_first_step: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.device = model, device
        self.optimizers: Optimizers = make_optimizers(model, config.learning_rate, config.weight_decay)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self._after_first_step = after_first_step

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        logits = self.model(*(tensor.to(self.device) for tensor in inputs))
        loss = self.loss_fn(logits, labels.to(self.device))
        self.optimizers.zero_grad()
        loss.backward()
        self.optimizers.step()
        if self._after_first_step is not None:  # e.g. to measure memory once the optimizer state exists
            self._after_first_step()
            self._after_first_step = None
        return loss.item()

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


def fit(
    model: nn.Module,
    epoch_rows: Callable[[torch.Generator], EpochRows],
    evaluate_split: Callable[[str], dict[str, float]],
    config: TrainConfig,
    seed: int,
    step: TrainStep,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` with ``step`` on the rows ``epoch_rows`` gives each epoch, in shuffled mini-batches
    (``model(*inputs)`` gives logits); early-stop on ``evaluate_split("validation")``; test the best epoch.

    Raises :class:`~embbench.errors.Diverged` as soon as a batch's loss, or a metric, is NaN or infinite (and
    passes on the one an evaluation raises for non-finite scores), with the epoch and the last finite loss:
    a diverged run gives no result."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sign = -1.0 if config.early_stopping in LOWER_IS_BETTER else 1.0
    embeddings = model.embedding_modules().values() if hasattr(model, "embedding_modules") else ()
    result = TrainResult()
    best_score, best_state, stale = -np.inf, None, 0
    last_loss: float | None = None

    def evaluated(split: str, epoch: int) -> dict[str, float]:
        try:
            return require_finite_metrics(evaluate_split(split), split)
        except Diverged as exc:  # from the scores or the metrics: add where training stood
            raise Diverged(exc.what, epoch, last_loss, result.history) from None

    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        inputs, labels = epoch_rows(generator)
        order = torch.randperm(len(labels), generator=generator)
        total_loss, batches = 0.0, 0
        for batch in order.split(config.batch_size):
            if len(batch) == 1 and len(order) > 1:  # a lone last row: BatchNorm cannot train on one row
                continue
            loss = step(tuple(tensor[batch] for tensor in inputs), labels[batch])
            if not math.isfinite(loss):
                raise Diverged(f"the training loss of batch {batches + 1} is {loss}", epoch, last_loss, result.history)
            last_loss = loss
            total_loss += loss
            batches += 1
        for embedding in embeddings:
            hook = getattr(embedding, "on_epoch_end", None)
            if callable(hook):  # e.g. CCE re-clusters its tables between epochs
                hook(epoch)
        train_seconds = time.perf_counter() - started
        result.train_seconds += train_seconds
        result.train_examples += len(labels)
        started = time.perf_counter()
        validation = evaluated("validation", epoch)
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
    result.test = evaluated("test", result.best_epoch)
    result.eval_seconds += time.perf_counter() - started
    return result
