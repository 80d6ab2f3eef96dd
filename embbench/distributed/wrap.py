"""Wrapping a model for sharded training: torchrec DistributedModelParallel around its table collection (the
tables' optimizer fused into the backward pass), plain DDP where it has no torchrec tables."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from torchrec import EmbeddingBagCollection

from embbench.distributed.info import _INFO_ATTRIBUTE, ShardingInfo, unwrap
from embbench.distributed.plan import plan_sharding, splits_columns, summarise, validate
from embbench.distributed.state import load_full_state_dict
from embbench.kernels import ADAGRAD_EPS


def embedding_collections(model: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    """The torchrec EmbeddingBagCollections in ``model`` (unsharded), with their module paths."""
    from embbench.collection import torchrec_available

    if not torchrec_available():
        return []
    from torchrec import EmbeddingBagCollection

    return [(name, module) for name, module in model.named_modules() if isinstance(module, EmbeddingBagCollection)]


def shard_model(
    model: nn.Module,
    sharding_type: str,
    embedding_optimizer: str,
    learning_rate: float,
    device: torch.device | str,
) -> nn.Module:
    """Shard ``model`` over the initialised process group; return the wrapper (DMP or DDP) to train.

    Every rank must call this with an identically built model (same seed). Table weights are updated in the
    backward pass by the fused ``embedding_optimizer`` at ``learning_rate``; step the rest with
    ``make_optimizers``. ``sharding_info(result)`` says what was done. The model's own modules are reused, so
    build a fresh model if an unsharded copy is needed later (``full_state_dict`` gives its trained weights).
    """
    validate(sharding_type, embedding_optimizer)
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "shard_model needs an initialised process group: launch with torchrun and call "
            "embbench.distributed.init_from_env(device) first"
        )
    device = torch.device(device)
    world = dist.get_world_size()
    collections = embedding_collections(model)
    if not collections:
        wrapped = _wrap_ddp(model, device)
        info = ShardingInfo("data-parallel", None, learning_rate, world, "ddp", str(device))
    else:
        wrapped, summary = _wrap_dmp(model, collections, sharding_type, embedding_optimizer, learning_rate, device)
        info = ShardingInfo(sharding_type, embedding_optimizer, learning_rate, world, "dmp", str(device), summary)
    object.__setattr__(wrapped, _INFO_ATTRIBUTE, info)
    return wrapped


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type != "cuda":
        return DistributedDataParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(model, device_ids=[index])


def _fused_optimizer_class(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, float]]:
    if name == "sgd":
        return torch.optim.SGD, {}
    if name == "adagrad":
        return torch.optim.Adagrad, {"eps": ADAGRAD_EPS}
    from torchrec.optim import RowWiseAdagrad

    return RowWiseAdagrad, {"eps": ADAGRAD_EPS}


def _wrap_dmp(
    model: nn.Module,
    collections: list[tuple[str, EmbeddingBagCollection]],
    sharding_type: str,
    embedding_optimizer: str,
    learning_rate: float,
    device: torch.device,
) -> tuple[nn.Module, dict[str, str]]:
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    model = model.to(device)
    initial = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    optimizer_class, extra = _fused_optimizer_class(embedding_optimizer)
    with warnings.catch_warnings():  # torchrec's wrapper of torch's private _apply_optimizer_in_backward warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for _, collection in collections:
            apply_optimizer_in_backward(optimizer_class, collection.parameters(), {"lr": learning_rate, **extra})
    plan = plan_sharding(model, collections, sharding_type, device)
    if embedding_optimizer == "rowwise-adagrad" and splits_columns(plan):
        warnings.warn(
            "row-wise Adagrad on column-split tables keeps one accumulator per row of each column shard, so it "
            "does not train like unsharded row-wise Adagrad; use adagrad or sgd for column-wise sharding",
            stacklevel=3,
        )
    with warnings.catch_warnings():  # DMP's own DDP call uses a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        sharded = DistributedModelParallel(model, device=device, plan=plan)
    # torchrec's sharded lookups call collectives that torch deprecates under new names: once per rank and
    # call site, nothing the caller can act on
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning
    )
    load_full_state_dict(sharded, initial)
    _make_lookups_contiguous(sharded)
    return sharded, summarise(plan)


def _make_lookups_contiguous(model: nn.Module) -> None:
    """Sharded lookups send their IDs through all-to-all, which needs contiguous tensors; an unsharded EBC
    accepts strided ones, and a scheme may look up a column of an [N, k] index tensor (multi-hashing does)."""
    from torchrec import KeyedJaggedTensor
    from torchrec.distributed.types import ShardedModule

    def contiguous(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        features = args[0] if args else None
        if not isinstance(features, KeyedJaggedTensor):
            return None
        weights = features.weights_or_none()
        if features.values().is_contiguous() and (weights is None or weights.is_contiguous()):
            return None
        rebuilt = KeyedJaggedTensor(
            keys=features.keys(),
            values=features.values().contiguous(),
            lengths=features.lengths().contiguous(),
            weights=None if weights is None else weights.contiguous(),
        )
        return (rebuilt, *args[1:])

    for module in unwrap(model).modules():
        if isinstance(module, ShardedModule):
            module.register_forward_pre_hook(contiguous)
