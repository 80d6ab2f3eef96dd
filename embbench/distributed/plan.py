"""Sharding plans: which sharding types exist, and the plan torchrec's planner (or, row-wise on a CPU, a
hand-built plan) gives a model's table collection over the process group. See docs/distributed.md."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.types import ShardingPlan

from embbench.collection import FUSED_OPTIMIZERS

SHARDING_TYPES = ("data-parallel", "table-wise", "row-wise", "column-wise", "table-column-wise")
#: fused table optimizers with CPU kernels (fused Adam has none)


EMBEDDING_OPTIMIZERS = FUSED_OPTIMIZERS["cpu"]


def validate(sharding_type: str, embedding_optimizer: str) -> None:
    """Raise ValueError (one line) for a sharding type or table optimizer that is not offered."""
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding type '{sharding_type}'; expected one of: {', '.join(SHARDING_TYPES)}")
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"unknown embedding optimizer '{embedding_optimizer}'; expected one of: {', '.join(EMBEDDING_OPTIMIZERS)}"
        )


def plan_sharding(
    model: nn.Module, collections: list[tuple[str, EmbeddingBagCollection]], sharding_type: str, device: torch.device
) -> ShardingPlan:
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, get_default_sharders, row_wise
    from torchrec.distributed.types import ShardingPlan

    world = dist.get_world_size()
    local = _local_world_size(world)
    if sharding_type == "row-wise" and device.type != "cuda":
        for path, collection in collections:
            for config in collection.embedding_bag_configs():
                rows = config.num_embeddings
                if -(-rows // world) * (world - 1) >= rows:  # torchrec's blocks of ceil(rows / W) rows
                    raise ValueError(
                        f"row-wise sharding of table '{path}.{config.name}' ({rows} rows) over {world} ranks in "
                        f"blocks of {-(-rows // world)} rows leaves a rank without rows, which fbgemm's CPU kernel "
                        "cannot hold; use table-wise, or fewer ranks"
                    )
        return ShardingPlan(
            {
                path: construct_module_sharding_plan(
                    collection,
                    {config.name: row_wise() for config in collection.embedding_bag_configs()},
                    local_size=local,
                    world_size=world,
                    device_type=device.type,
                )
                for path, collection in collections
            }
        )
    torchrec_type = sharding_type.replace("-", "_")
    configs = [config for _, collection in collections for config in collection.embedding_bag_configs()]
    min_partition = _column_block(min(c.embedding_dim for c in configs), world) if "column" in sharding_type else None
    constraints = {
        config.name: ParameterConstraints(sharding_types=[torchrec_type], min_partition=min_partition)
        for config in configs
    }
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world, local_world_size=local), kernel_config=KernelConfig(compute_device=device.type)
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        # torchrec's default (heuristic) reservation warns that it misjudges dense sizes; these models are small
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    try:
        return planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
    except Exception as error:  # the planner's own errors are long; say what was asked for first
        raise RuntimeError(
            f"torchrec's planner found no {sharding_type} plan for {len(configs)} table(s) on {world} "
            f"{device.type} rank(s): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error


def _column_block(dim: int, world: int) -> int | None:
    """The column block (torchrec's ``min_partition``) that splits a table of ``dim`` columns over ``world``
    ranks: the smallest multiple of 4 (fbgemm's granularity) dividing ``dim`` that is at least dim / world.
    torchrec's default (128) would leave every table of up to 128 columns whole, i.e. table-wise. The planner's
    constraints name tables, but one block, from the narrowest table, serves all: a wider table is cut into
    more blocks than ranks, several to a rank."""
    for block in range(4, dim, 4):
        if dim % block == 0 and block * world >= dim:
            return block
    return None


def _local_world_size(world: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def splits_columns(plan: ShardingPlan) -> bool:
    return any(
        "column" in sharding.sharding_type and len(sharding.ranks or []) > 1
        for module_plan in plan.plan.values()
        for sharding in module_plan.values()  # type: ignore[attr-defined]
    )


def summarise(plan: ShardingPlan) -> dict[str, str]:
    summary = {}
    for path, module_plan in plan.plan.items():
        for table, parameter_sharding in module_plan.items():  # type: ignore[attr-defined]
            kind = parameter_sharding.sharding_type.replace("_", "-")
            ranks = parameter_sharding.ranks if parameter_sharding.ranks is not None else "all"
            summary[f"{path}.{table}"] = f"{kind} on ranks {ranks}"
    return summary
