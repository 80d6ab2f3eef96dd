"""Training steps of a sharded model: each rank's slice of every global batch, the optimizers, and forward
passes computed in slices over the ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    pass

from embbench.distributed.info import ShardingInfo, sharding_info, unwrap
from embbench.distributed.state import full_state_dict, load_full_state_dict
from embbench.distributed.wrap import shard_model
from embbench.optimizers import LearningRateScale, dense_adam, torch_optimizer

DENSE_OPTIMIZERS = ("adam", "sgd", "adagrad")


class Optimizers:
    """The optimizers of a sharded model; ``zero_grad()`` and ``step()`` act on all of them.

    * ``fused``: DMP's ``fused_optimizer`` (tables sharded other than data-parallel). Its updates happen during
      ``backward()``; ``step()`` only pushes a changed learning rate (``param_groups``) to the kernels.
    * ``replicated``: data-parallel tables, whose gradients DDP averages, with a regular optimizer of the
      requested embedding kind and learning rate.
    * ``dense``: every other parameter (the interaction layers, and all of a DDP-wrapped network scheme).
    """

    def __init__(
        self,
        fused: torch.optim.Optimizer | None,
        replicated: torch.optim.Optimizer | None,
        dense: torch.optim.Optimizer | None,
    ) -> None:
        self.fused, self.replicated, self.dense = fused, replicated, dense

    def all(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.fused, self.replicated, self.dense) if o is not None]

    def zero_grad(self) -> None:
        for optimizer in self.all():
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.all():
            optimizer.step()


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The table parameters of a model returned by ``shard_model`` (those of its sharded collections)."""
    from embbench.collection import torchrec_available

    if not torchrec_available():
        return []
    from torchrec.distributed.types import ShardedModule

    seen: dict[int, nn.Parameter] = {}
    for module in unwrap(model).modules():
        if isinstance(module, ShardedModule):
            for parameter in module.parameters():
                seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a sharded model outside its tables: those a regular (dense) optimizer steps."""
    tables = {id(p) for p in embedding_parameters(model)}
    return [p for p in unwrap(model).parameters() if id(p) not in tables and p.requires_grad]


def make_optimizers(
    model: nn.Module, dense_optimizer: str = "adam", dense_learning_rate: float | None = None,
    weight_decay: float = 0.0, decay: str = "adamw",
) -> Optimizers:
    """Optimizers for a model returned by ``shard_model``: the fused table optimizer DMP holds, a regular
    optimizer for data-parallel tables, and ``dense_optimizer`` (adam, sgd or adagrad) at
    ``dense_learning_rate`` (default: the table learning rate) for everything else (Adam's ``weight_decay``
    decoupled under ``decay`` adamw, L2 under adam: :func:`embbench.optimizers.dense_adam`)."""
    if dense_optimizer not in DENSE_OPTIMIZERS:
        raise ValueError(f"unknown dense optimizer '{dense_optimizer}'; expected one of: {', '.join(DENSE_OPTIMIZERS)}")
    info = sharding_info(model)
    lr = info.learning_rate if dense_learning_rate is None else dense_learning_rate
    dense_params = dense_parameters(model)
    if dense_optimizer == "adam" and dense_params:
        dense = dense_adam([{"params": dense_params, "lr": lr}], weight_decay, decay)
    else:
        dense = torch_optimizer(dense_optimizer, dense_params, lr, sparse_gradients=False) if dense_params else None
    fused = replicated = None
    if info.wrapped == "dmp":
        if info.sharding_type == "data-parallel":
            assert info.embedding_optimizer is not None
            replicated = torch_optimizer(
                info.embedding_optimizer, embedding_parameters(model), info.learning_rate, sparse_gradients=False
            )
        else:
            fused = model.fused_optimizer  # type: ignore[assignment]
    return Optimizers(fused, replicated, dense)


def local_indices(batch_size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch, padded so that every rank has ceil(B / W) rows.

    Returns (indices [ceil(B/W)] into the global batch, weights: 1.0 for real rows, 0.0 for padding, which
    repeats row 0). Rank r takes the contiguous rows [r * ceil(B/W), (r + 1) * ceil(B/W)) ∩ [0, B).
    """
    if batch_size < 1:
        raise ValueError(f"a batch needs at least one row, got {batch_size}")
    per_rank = -(-batch_size // world_size)
    indices = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    real = indices < batch_size
    return torch.where(real, indices, torch.zeros_like(indices)), real.float()


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")


def train_step(
    model: nn.Module,
    optimizers: Optimizers,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _bce,
) -> float:
    """One step on this rank's slice of a global batch; returns the mean loss over the global batch.

    Every rank passes the same global ``inputs`` (e.g. users [B], items [B]) and ``labels`` [B], on CPU or the
    model's device. ``loss_fn(outputs, labels)`` gives per-example losses (default: binary cross-entropy with
    logits). The local loss is ``sum(per-example losses) * W / B`` (see the module docstring).
    """
    info = sharding_info(model)
    batch = labels.shape[0]
    if any(x.shape[0] != batch for x in inputs):
        raise ValueError(f"inputs and labels must have the same batch size {batch}, got {[x.shape[0] for x in inputs]}")
    _check_gradient_division(info)
    world, me = dist.get_world_size(), dist.get_rank()
    device = torch.device(info.device)
    indices, weights = local_indices(batch, me, world)
    local = [x[indices.to(x.device)].to(device) for x in inputs]
    local_labels = labels[indices.to(labels.device)].to(device)
    weights = weights.to(device)
    losses = loss_fn(model(*local), local_labels)
    weighted = (losses * weights).sum()
    optimizers.zero_grad()
    (weighted * (world / batch)).backward()
    optimizers.step()
    total = weighted.detach().clone()
    dist.all_reduce(total)
    return total.item() / batch


def _check_gradient_division(info: ShardingInfo) -> None:
    if info.wrapped != "dmp":
        return
    from torchrec.distributed.comm_ops import get_gradient_division

    if not get_gradient_division():
        raise RuntimeError(
            "torchrec gradient division is off (comm_ops.set_gradient_division(False)): sharded table gradients "
            "would be summed over ranks, not averaged; train_step assumes the default (on)"
        )


def distributed_forward(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    device: torch.device | str,
    chunk_size: int = 1 << 16,
) -> torch.Tensor:
    """``fn(*inputs)`` for a global batch, computed in slices over the ranks; the full result on every rank.

    ``fn`` is the sharded model or one of its parts (``unwrap(model).item_embedding``); every rank calls this
    collectively with the same inputs, in chunks of ``chunk_size`` rows (each rank forwards ceil(chunk / W)
    rows, padded alike, since sharded lookups need equal batches). Runs under ``torch.no_grad()``; the result
    is on ``device``. Without a process group it is ``fn`` over the chunks.
    """
    if not inputs:
        raise ValueError("distributed_forward needs at least one input tensor")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = torch.device(device)
    total = inputs[0].shape[0]
    distributed = dist.is_available() and dist.is_initialized()
    world, me = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    outputs = []
    with torch.no_grad():
        for start in range(0, max(total, 1), chunk_size):
            chunk = [x[start : start + chunk_size] for x in inputs]
            rows = chunk[0].shape[0]
            if rows == 0:
                break
            if world == 1:
                outputs.append(fn(*[x.to(device) for x in chunk]))
                continue
            indices, _ = local_indices(rows, me, world)
            out = fn(*[x[indices.to(x.device)].to(device) for x in chunk]).contiguous()
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            outputs.append(torch.cat(gathered)[:rows])
    if not outputs:
        raise ValueError("distributed_forward got an empty batch")
    return torch.cat(outputs)


class ShardedStep:
    """One step of a sharded model (``embbench.training.TrainStep``): the model is wrapped by
    :func:`embbench.distributed.wrap.shard_model` over the process group, its tables trained by the placement's
    fused table optimizer, every other parameter by Adam at ``learning_rate``; every rank steps through the
    same global batches and trains on its slice of each. The model's own table modules become the shards, so
    evaluation through it is collective: every rank evaluates the same rows in the same order."""

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        placement: Any,
        after_first_step: Callable[[], None] | None = None,
    ) -> None:
        tables = placement.tables
        self.device = placement.device
        self.wrapped = shard_model(model, placement.sharding, tables.optimizer, tables.learning_rate, self.device)
        self.info = sharding_info(self.wrapped)
        self.optimizers = make_optimizers(
            self.wrapped, "adam", config.learning_rate, config.weight_decay, getattr(config, "optimizer", "adamw")
        )
        self._learning_rates = LearningRateScale(self.optimizers.all())
        self._after_first_step = after_first_step

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        loss = train_step(self.wrapped, self.optimizers, inputs, labels)
        if self._after_first_step is not None:
            self._after_first_step()
            self._after_first_step = None
        return loss

    def state(self) -> dict[str, Any]:
        return full_state_dict(self.wrapped)

    def restore(self, state: dict[str, Any]) -> None:
        load_full_state_dict(self.wrapped, state)

    def set_learning_rate_scale(self, scale: float) -> None:
        """Every learning rate at its initial value times ``scale`` (the fused tables' handed to their kernels by
        their optimizer's ``step()``, which does nothing else: the rows were updated in backward)."""
        self._learning_rates.set_scale(scale)
        if self.optimizers.fused is not None:
            self.optimizers.fused.step()
