"""Multi-process training: torchrun launch and process groups (``launch``), sharding plans (``plan``), wrapping a
model in DMP / DDP (``wrap``, ``info``), sharded training steps (``step``) and moving weights in and out of
shards (``state``). Importing this package does not import torchrec. How it works and what was measured:
docs/distributed.md.
"""

from embbench.distributed.info import ShardingInfo, sharding_info, unwrap
from embbench.distributed.launch import barrier, destroy, init_from_env, is_distributed, is_main, rank, world_size
from embbench.distributed.plan import EMBEDDING_OPTIMIZERS, SHARDING_TYPES, validate
from embbench.distributed.state import full_state_dict, load_full_state_dict
from embbench.distributed.step import (
    DENSE_OPTIMIZERS,
    Optimizers,
    ShardedStep,
    dense_parameters,
    distributed_forward,
    embedding_parameters,
    local_indices,
    make_optimizers,
    train_step,
)
from embbench.distributed.wrap import shard_model

__all__ = [
    "DENSE_OPTIMIZERS",
    "EMBEDDING_OPTIMIZERS",
    "SHARDING_TYPES",
    "Optimizers",
    "ShardedStep",
    "ShardingInfo",
    "barrier",
    "dense_parameters",
    "destroy",
    "distributed_forward",
    "embedding_parameters",
    "full_state_dict",
    "init_from_env",
    "is_distributed",
    "is_main",
    "load_full_state_dict",
    "local_indices",
    "make_optimizers",
    "rank",
    "shard_model",
    "sharding_info",
    "train_step",
    "unwrap",
    "validate",
    "world_size",
]
