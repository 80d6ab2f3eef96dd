"""The optimizers of an unsharded model: a table optimizer for rows a torch optimizer steps (sparse or dense
table kernels; fused kernels update their rows in the backward pass), Adam or AdamW for everything else, the
bytes of state each keeps, and scaling all their learning rates (a schedule).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embbench.collection import FeatureEmbeddings
from embbench.kernels import ADAGRAD_EPS

#: optimizers of the dense parameters: "adamw" decays decoupled from the gradient (Loshchilov & Hutter; what
#: weight_decay meant before the choice existed, hence the default), "adam" adds weight_decay * w to the gradient
ADAM_VARIANTS = ("adamw", "adam")


class SparseRowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for row-sparse gradients: one accumulator per row, the mean of the row's squared
    gradient added each step, ``row -= lr * grad / (sqrt(accumulator) + eps)``; only rows a batch read move.

    fbgemm's fused kernel computes this update; it is used for tables that kernel cannot hold (rows whose width
    is not a multiple of 4) and on the torch backend, where torch has no row-wise Adagrad of its own.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.01, eps: float = ADAGRAD_EPS) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                state = self.state[parameter]
                if "sum" not in state:
                    state["sum"] = torch.zeros(parameter.shape[0], dtype=parameter.dtype, device=parameter.device)
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows = torch.arange(parameter.shape[0], device=parameter.device)
                    values = grad
                state["sum"].index_add_(0, rows, values.pow(2).mean(dim=1))
                scale = group["lr"] / (state["sum"][rows].sqrt() + group["eps"])
                parameter.index_add_(0, rows, -values * scale.unsqueeze(1))


def torch_optimizer(
    name: str, parameters: list[nn.Parameter], learning_rate: float, sparse_gradients: bool = True
) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` (adam, sgd, adagrad, rowwise-adagrad) for parameters whose gradients are
    row-sparse (table rows) or dense; the update is the one fbgemm's fused kernel of the same name computes."""
    if name == "adam":
        adam = torch.optim.SparseAdam if sparse_gradients else torch.optim.Adam
        return adam(parameters, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=learning_rate, eps=ADAGRAD_EPS)
    if name == "rowwise-adagrad":
        return SparseRowWiseAdagrad(parameters, lr=learning_rate)
    raise ValueError(f"unknown optimizer '{name}'")


@dataclass
class Optimizers:
    """The optimizers of one unsharded model. ``tables`` steps table rows with torch (sparse kernels, or
    dense Adam's table group), ``dense`` everything else; fused kernels need neither for their rows."""

    dense: torch.optim.Optimizer | None
    tables: torch.optim.Optimizer | None

    def all(self) -> list[torch.optim.Optimizer]:
        return [optimizer for optimizer in (self.dense, self.tables) if optimizer is not None]

    def zero_grad(self) -> None:
        for optimizer in self.all():
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.all():
            optimizer.step()


def model_embeddings(model: nn.Module) -> FeatureEmbeddings | None:
    """The model's FeatureEmbeddings (its ``embeddings`` attribute), or None."""
    embeddings = getattr(model, "embeddings", None)
    return embeddings if isinstance(embeddings, FeatureEmbeddings) else None


def dense_adam(
    groups: list[dict[str, Any]], weight_decay: float = 0.0, optimizer: str = "adamw"
) -> torch.optim.Optimizer:
    """The dense parameters' Adam (a group may set its own ``weight_decay``): with ``weight_decay`` > 0, AdamW's
    decoupled decay under ``adamw`` and Adam's L2 decay (added to the gradient) under ``adam``; without decay
    both are plain ``torch.optim.Adam``."""
    if optimizer not in ADAM_VARIANTS:
        raise ValueError(f"dense optimizer must be one of {', '.join(ADAM_VARIANTS)}, got '{optimizer}'")
    if weight_decay > 0 and optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if weight_decay > 0:
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    return torch.optim.Adam(groups)


def make_optimizers(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.0, optimizer: str = "adamw"
) -> Optimizers:
    """``optimizer`` (adamw or adam, see :func:`dense_adam`) at ``learning_rate`` with ``weight_decay`` for the
    dense parameters, and the table optimizer the model's :class:`embbench.collection.TableTraining` names for
    table rows a torch optimizer steps (tables never decay, also dense Adam's)."""
    embeddings = model_embeddings(model)
    training = embeddings.table_training if embeddings is not None else None
    tables = embeddings.table_parameters() if embeddings is not None and training is not None else []
    table_ids = {id(parameter) for parameter in tables}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    dense_groups = [{"params": dense, "lr": learning_rate}] if dense else []
    if training is None or not tables:
        return Optimizers(dense_adam(dense_groups, weight_decay, optimizer) if dense else None, None)
    if training.optimizer == "dense-adam":
        table_group = {"params": tables, "lr": training.learning_rate, "weight_decay": 0.0}
        return Optimizers(dense_adam([*dense_groups, table_group], weight_decay, optimizer), None)
    return Optimizers(
        dense_adam(dense_groups, weight_decay, optimizer) if dense else None,
        torch_optimizer(training.optimizer, tables, training.learning_rate),
    )


def fused_kernels(model: nn.Module) -> list[Any]:
    """The fbgemm kernels of the model's collection whose table optimizer is fused into backward (they have a
    learning rate of their own, outside every torch optimizer)."""
    embeddings = model_embeddings(model)
    if embeddings is None or embeddings.tables is None:
        return []
    return [store.kernel_module for store in embeddings.tables.stores if getattr(store, "kernel", "") == "fused"]


class LearningRateScale:
    """Every learning rate of a model's optimizers at its initial value times a factor (a learning-rate
    schedule): each param group of ``optimizers`` (DMP's fused optimizer too: its ``step()`` hands the rate to
    its kernels) and each fused fbgemm kernel in ``kernels`` (``set_learning_rate``)."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], kernels: Iterable[Any] = ()) -> None:
        self._groups = [(group, group["lr"]) for optimizer in optimizers for group in optimizer.param_groups]
        self._kernels = [(kernel, kernel.get_learning_rate()) for kernel in kernels]

    def set_scale(self, scale: float) -> None:
        for group, initial in self._groups:
            group["lr"] = initial * scale
        for kernel, initial in self._kernels:
            kernel.set_learning_rate(initial * scale)


def state_bytes(optimizer: torch.optim.Optimizer | None, parameters: Iterable[nn.Parameter] | None = None) -> int:
    """Bytes of the tensors ``optimizer`` keeps as state (of ``parameters`` only, when given)."""
    if optimizer is None:
        return 0
    wanted = None if parameters is None else {id(p) for p in parameters}
    total = 0
    for parameter, state in optimizer.state.items():
        if wanted is not None and id(parameter) not in wanted:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes of optimizer state a trained model keeps: for its tables (in fused kernels or torch optimizers)
    and for its dense parameters."""

    table_bytes: int
    dense_bytes: int


def optimizer_memory(model: nn.Module, optimizers: Optimizers) -> OptimizerMemory:
    """What the optimizers of ``model`` hold now (call after a step: torch optimizers create state lazily)."""
    embeddings = model_embeddings(model)
    tables = embeddings.table_parameters() if embeddings is not None else []
    table_ids = {id(p) for p in tables}
    kernel = embeddings.tables.kernel_state_bytes() if embeddings is not None and embeddings.tables else 0
    dense_params = [p for p in model.parameters() if id(p) not in table_ids]
    table_bytes = kernel + sum(state_bytes(o, tables) for o in optimizers.all())
    dense_bytes = sum(state_bytes(o, dense_params) for o in optimizers.all())
    return OptimizerMemory(table_bytes, dense_bytes)
