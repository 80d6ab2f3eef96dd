"""Multi-process training: torchrun launch and process groups (``launch``), sharding with torchrec's
DistributedModelParallel (``sharding``). Importing this package does not import torchrec.

``embbench.distributed.launch`` is the module (its ``launch(nproc, argv)`` starts torchrun); the other
public names of both modules are re-exported here.
"""

from embbench.distributed.launch import (
    barrier,
    destroy,
    init_from_env,
    is_distributed,
    is_main,
    local_device,
    rank,
    world_size,
)
from embbench.distributed.sharding import (
    DENSE_OPTIMIZERS,
    EMBEDDING_OPTIMIZERS,
    SHARDING_TYPES,
    Optimizers,
    ShardingInfo,
    dense_parameters,
    distributed_forward,
    embedding_parameters,
    full_state_dict,
    load_full_state_dict,
    local_indices,
    make_optimizers,
    shard_model,
    sharding_info,
    train_step,
    unwrap,
    validate,
)

__all__ = [
    "DENSE_OPTIMIZERS",
    "EMBEDDING_OPTIMIZERS",
    "SHARDING_TYPES",
    "Optimizers",
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
    "local_device",
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
