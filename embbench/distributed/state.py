"""Moving weights in and out of a sharded model: the full (unsharded) state on every rank, and loading one."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    pass

from embbench.distributed.info import _INFO_ATTRIBUTE, ShardingInfo, unwrap


def _is_sharded(tensor: object) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(tensor, ShardedTensor)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy unsharded weights (keys as the unwrapped model's ``state_dict``) into a sharded model's
    local shards and replicated tensors. Every rank passes the same full tensors."""
    with warnings.catch_warnings():  # torch deprecates ShardedTensor, which torchrec 1.8 still uses
        warnings.simplefilter("ignore", FutureWarning)
        _load_full_state_dict(model, state)


def _load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"state lacks {len(missing)} entries of the model, e.g. {missing[0]}")
    with torch.no_grad():
        for name, target in own.items():
            source = state[name]
            if _is_sharded(target):
                for shard in target.local_shards():
                    where = tuple(
                        slice(offset, offset + size)
                        for offset, size in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True)
                    )
                    shard.tensor.copy_(source[where])
            elif isinstance(target, torch.Tensor):
                target.copy_(source)
            else:
                raise TypeError(f"cannot load '{name}': unsupported state of type {type(target).__name__}")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state on every rank, on CPU, with the keys an unsharded model's ``state_dict`` has, so
    that a freshly built model can ``load_state_dict`` it. Every rank must call this.

    Sharded tables are gathered; every other tensor is rank 0's, as DDP treats it (buffers such as BatchNorm's
    running statistics are updated from each rank's local batch and may differ between ranks)."""
    with warnings.catch_warnings():  # torch deprecates ShardedTensor, which torchrec 1.8 still uses
        warnings.simplefilter("ignore", FutureWarning)
        return _full_state_dict(model)


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    distributed = dist.is_available() and dist.is_initialized()
    info = getattr(model, _INFO_ATTRIBUTE, None)
    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        if _is_sharded(tensor):
            # a rank may hold no shard of a table; collectives need the communication device on every rank
            device = torch.device(info.device) if isinstance(info, ShardingInfo) else torch.device("cpu")
            full = torch.zeros(tuple(tensor.size()), dtype=tensor.dtype, device=device)
            tensor.gather(dst=0, out=full if dist.get_rank() == 0 else None)
            dist.broadcast(full, src=0)
        else:
            full = tensor.detach().clone()
            if distributed:
                dist.broadcast(full, src=0)
        state[name] = full.cpu()
    return state
