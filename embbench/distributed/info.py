"""What shard_model made of a model: its :class:`ShardingInfo`, and the model inside the DMP / DDP wrapper."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

_INFO_ATTRIBUTE = "embbench_sharding"


@dataclass(frozen=True)
class ShardingInfo:
    """What ``shard_model`` did.

    ``wrapped`` is "dmp" (torchrec DistributedModelParallel) or "ddp" (no torchrec tables: plain DDP, recorded as
    data-parallel, and every parameter uses the dense optimizer, so ``embedding_optimizer`` is None).
    ``plan_summary`` maps each table, as ``<module path>.<table name>``, to "<sharding type> on ranks [...]".
    """

    sharding_type: str
    embedding_optimizer: str | None
    learning_rate: float
    world_size: int
    wrapped: str
    device: str
    plan_summary: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sharding_info(model: nn.Module) -> ShardingInfo:
    """The ShardingInfo of a model returned by ``shard_model``."""
    info = getattr(model, _INFO_ATTRIBUTE, None)
    if not isinstance(info, ShardingInfo):
        raise TypeError(f"{type(model).__name__} was not returned by shard_model")
    return info


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the DMP / DDP wrapper (with its tables sharded under DMP), e.g. to reach
    ``.user_embedding`` for ``distributed_forward``; train through the wrapper, not this."""
    from embbench.collection import torchrec_available

    if torchrec_available():
        from torchrec.distributed import DistributedModelParallel

        if isinstance(model, DistributedModelParallel):
            return model.module
    if isinstance(model, DistributedDataParallel):
        return model.module
    return model
