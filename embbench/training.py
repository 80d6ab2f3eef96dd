"""Training with early stopping, the one loop every task shares (:func:`fit`), and the training step of one
process (:class:`PlainStep`).

:func:`fit` trains on the rows an epoch provides, in shuffled mini-batches with binary cross-entropy, through a
training step the caller chose (:class:`PlainStep` here; a sharded step under torchrun, from
:mod:`embbench.distributed`), evaluates validation after every epoch, stops when the validation metric has not
improved for ``patience`` epochs (or trains every epoch, ``early_stopping = "none"``), and tests the chosen
epoch's weights; it also tests the model after epoch 1 (the one-epoch regime), can lower the learning rate on a
plateau of the validation metric, and finds when that metric first reached a target.
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
from embbench.optimizers import ADAM_VARIANTS, LearningRateScale, Optimizers, fused_kernels, make_optimizers

#: an epoch's training rows: the model's input tensors (row-aligned) and the 0/1 labels
EpochRows = tuple[tuple[torch.Tensor, ...], torch.Tensor]
#: validation metrics training can stop on; logloss is the one where lower is better
EARLY_STOPPING_METRICS = ("auc", "hr@10", "logloss")
LOWER_IS_BETTER = ("logloss",)
#: early_stopping "none": train every epoch, test the last epoch's weights
NO_EARLY_STOPPING = "none"
EARLY_STOPPING = (*EARLY_STOPPING_METRICS, NO_EARLY_STOPPING)
#: the validation metric the schedule and the target watch when early stopping is off
DEFAULT_MONITOR = "auc"
#: learning-rate schedules: "reduce-on-plateau" multiplies every learning rate by ``lr_plateau_factor`` after
#: ``lr_plateau_patience`` epochs without improvement of the watched validation metric
LR_SCHEDULES = ("none", "reduce-on-plateau")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 1e-3
    num_negatives: int = 4
    patience: int = 2
    weight_decay: float = 0.0  # weight decay of the dense parameters (decoupled or L2: ``optimizer``)
    early_stopping: str = "auc"  # the validation metric: "auc", "hr@10" (ranking) or "logloss"; or "none"
    eval_batch_users: int = 1024
    optimizer: str = "adamw"  # of the dense parameters: "adamw" (decoupled decay) or "adam" (L2 decay)
    lr_schedule: str = "none"  # or "reduce-on-plateau"
    lr_plateau_factor: float = 0.5
    lr_plateau_patience: int = 1
    target_val_metric: float | None = None  # of the watched validation metric (:attr:`monitor`)
    #: False for a tuning trial: selected on validation only, the test split is never evaluated (test metrics empty)
    evaluate_test: bool = True

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "num_negatives": self.num_negatives >= 1,
            "patience": self.patience >= 1,
            "eval_batch_users": self.eval_batch_users >= 1,
            "lr_plateau_factor": self.lr_plateau_factor > 0,
            "lr_plateau_patience": self.lr_plateau_patience >= 1,
        }
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        choices = {"early_stopping": EARLY_STOPPING, "optimizer": ADAM_VARIANTS, "lr_schedule": LR_SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if not self.lr_plateau_factor <= 1:
            raise ValueError(f"lr_plateau_factor must be in (0, 1], got {self.lr_plateau_factor}")
        if self.target_val_metric is not None and not math.isfinite(self.target_val_metric):
            raise ValueError(f"target_val_metric must be a finite number or None, got {self.target_val_metric}")

    @property
    def monitor(self) -> str:
        """The validation metric early stopping, the learning-rate schedule and the target watch: the
        early-stopping metric, or auc when early stopping is off."""
        return DEFAULT_MONITOR if self.early_stopping == NO_EARLY_STOPPING else self.early_stopping

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TargetReached:
    """When the watched validation metric first reached the target: the epoch, the training seconds and the
    optimizer steps up to the end of that epoch."""

    epochs: int
    seconds: float
    steps: int


def time_to_target(
    history: list[dict[str, float]], metric: str, target: float | None
) -> TargetReached | None:
    """The first epoch of ``history`` whose validation ``metric`` (``val_<metric>``) reaches ``target`` (at least
    it; at most it for log-loss), with the training seconds and steps until then; None when no epoch does or
    there is no target."""
    if target is None:
        return None
    seconds, steps = 0.0, 0
    for record in history:
        seconds += record["train_seconds"]
        steps += int(record.get("steps", 0))
        value = record.get(f"val_{metric}")
        if value is not None and (value <= target if metric in LOWER_IS_BETTER else value >= target):
            return TargetReached(int(record["epoch"]), seconds, steps)
    return None


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    best_epoch: int = 0
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_examples: int = 0  # (user, item, label) examples trained on, over all epochs
    steps: int = 0  # optimizer steps, over all epochs
    #: the one-epoch regime: validation and test of the weights right after epoch 1 (a regime, not a selection)
    one_epoch_validation: dict[str, float] = field(default_factory=dict)
    one_epoch_test: dict[str, float] = field(default_factory=dict)
    #: when the watched validation metric first reached ``TrainConfig.target_val_metric`` (None: never, or no target)
    target: TargetReached | None = None

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

    # A step may also have ``set_learning_rate_scale(scale: float)``: every learning rate (dense and tables) set
    # to its initial value times ``scale``; ``fit`` needs it for a learning-rate schedule.


class PlainStep:
    """One step of the whole model in this process: table rows by the model's table optimizer (fused into the
    backward pass, or a torch optimizer of row-sparse gradients, see :mod:`embbench.collection`), every other
    parameter by Adam at ``config.learning_rate`` (with ``config.weight_decay``: decoupled under ``adamw``, L2
    under ``adam``)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: torch.device,
        after_first_step: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.device = model, device
        self.optimizers: Optimizers = make_optimizers(
            model, config.learning_rate, config.weight_decay, config.optimizer
        )
        self._learning_rates = LearningRateScale(self.optimizers.all(), fused_kernels(model))
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

    def set_learning_rate_scale(self, scale: float) -> None:
        """Every learning rate, dense and tables (fused kernels too), at its initial value times ``scale``."""
        self._learning_rates.set_scale(scale)


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
    (``model(*inputs)`` gives logits); early-stop on ``evaluate_split("validation")`` and test the best epoch,
    or (``early_stopping = "none"``) train every epoch and test the last.

    The model right after epoch 1 is tested too (``one_epoch_test``, the one-epoch regime). Each epoch's record
    in ``history`` holds its mean loss, training seconds, optimizer steps, dense learning rate and validation
    metrics. A ``reduce-on-plateau`` schedule multiplies every learning rate by ``lr_plateau_factor`` once the
    watched metric (:attr:`TrainConfig.monitor`) has not improved for ``lr_plateau_patience`` epochs.

    Raises :class:`~embbench.errors.Diverged` as soon as a batch's loss, or a metric, is NaN or infinite (and
    passes on the one an evaluation raises for non-finite scores), with the epoch and the last finite loss:
    a diverged run gives no result."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    monitor = config.monitor
    sign = -1.0 if monitor in LOWER_IS_BETTER else 1.0
    stopping = config.early_stopping != NO_EARLY_STOPPING
    set_scale = getattr(step, "set_learning_rate_scale", None)
    if config.lr_schedule != "none" and not callable(set_scale):
        raise TypeError(f"lr_schedule '{config.lr_schedule}' needs a step with set_learning_rate_scale(scale)")
    embeddings = model.embedding_modules().values() if hasattr(model, "embedding_modules") else ()
    result = TrainResult()
    best_score, best_state, stale = -np.inf, None, 0
    scale, plateau = 1.0, 0  # the learning rates' factor; epochs without improvement since the last change
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
        train_seconds = time.perf_counter() - started
        result.train_seconds += train_seconds
        result.train_examples += len(labels)
        result.steps += batches
        started = time.perf_counter()
        validation = evaluated("validation", epoch)
        if epoch == 1:  # the one-epoch regime: tested once, whatever epoch is chosen later
            result.one_epoch_validation = validation
            result.one_epoch_test = evaluated("test", epoch) if config.evaluate_test else {}
        result.eval_seconds += time.perf_counter() - started
        record = {
            "epoch": epoch,
            "loss": total_loss / max(batches, 1),
            "train_seconds": train_seconds,
            "steps": batches,
            "learning_rate": config.learning_rate * scale,  # the dense one; table rates move by the same factor
            **{f"val_{k}": v for k, v in validation.items()},
        }
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        score = sign * validation[monitor]
        improved = score > best_score
        if improved:
            best_score, stale, plateau = score, 0, 0
        else:
            stale, plateau = stale + 1, plateau + 1
        if not stopping:  # every epoch runs; the last one's weights are tested
            result.best_epoch, result.validation = epoch, validation
        elif improved:
            best_state = step.state()
            result.best_epoch, result.validation = epoch, validation
        elif stale >= config.patience:
            break
        if config.lr_schedule == "reduce-on-plateau" and plateau >= config.lr_plateau_patience:
            scale, plateau = scale * config.lr_plateau_factor, 0
            set_scale(scale)  # type: ignore[misc]
        if epoch < config.epochs:
            # Between epochs, after validation (as CCE's authors re-cluster): the validated, and maybe kept, weights
            # are the trained ones; the hook's time is training time.
            hook_started = time.perf_counter()
            for embedding in embeddings:
                hook = getattr(embedding, "on_epoch_end", None)
                if callable(hook):  # e.g. CCE re-clusters its tables
                    hook(epoch)
            hook_seconds = time.perf_counter() - hook_started
            result.train_seconds += hook_seconds
            record["train_seconds"] += hook_seconds
    if best_state is not None:
        step.restore(best_state)
    if not config.evaluate_test:
        result.test = {}
    elif result.best_epoch == 1:  # the same weights the one-epoch regime tested
        result.test = dict(result.one_epoch_test)
    else:
        started = time.perf_counter()
        result.test = evaluated("test", result.best_epoch)
        result.eval_seconds += time.perf_counter() - started
    result.target = time_to_target(result.history, monitor, config.target_val_metric)
    return result
