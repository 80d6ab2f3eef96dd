"""Sharded training with torchrec's DistributedModelParallel (DMP) and a plan from torchrec's planner.

``shard_model`` wraps a model in DMP when it holds at least one torchrec ``EmbeddingBagCollection`` (the
``.ebc`` of every :class:`embbench.tables.EmbeddingTable`), every table sharded the one requested way, and in
plain DDP otherwise (network schemes such as DHE and TT-Rec; tables on the ``torch`` backend). Table updates
are fused into the backward pass (torchrec's ``apply_optimizer_in_backward``); the other parameters get an
ordinary optimizer (``make_optimizers``). ``train_step`` and ``distributed_forward`` take the same global
batch on every rank and work on the rank's slice of it; ``full_state_dict`` gathers the unsharded weights.

Gradient scaling (measured): with a global batch of B split over W ranks, DDP *averages* dense gradients over
ranks, and torchrec *also divides* sharded table gradients by W, in the backward of its all-to-all /
reduce-scatter (``torchrec.distributed.comm_ops`` gradient division, on by default; switched off, table
updates come out exactly W times those of one process, dense ones unchanged). So no learning-rate scaling is
needed. The rule implemented: each rank's loss is ``sum(its per-example losses) * W / B``, whose gradient,
averaged or divided by W, is exactly that of the mean loss over the global batch, also when W does not
divide B (ranks are padded to ceil(B / W) rows with zero-weight examples: row-wise sharding needs equal local
batches). ``train_step`` refuses to run with gradient division off. Measured with 2 gloo processes against
one process on the same global batches (tests/test_distributed.py): losses and predictions agree within
1.2e-7, weights within 2.4e-7, for table-wise, row-wise, column-wise, table-column-wise and data-parallel,
with SGD, Adagrad and row-wise Adagrad; 4 processes row-wise, and 3 table-wise (one rank holding no table),
likewise.

On CPU here (torch 2.13, torchrec 1.8.0, fbgemm-gpu-cpu 1.8.0, gloo):

* The planner offers data-parallel, table-wise, column-wise and table-column-wise for CPU, row-wise only for
  CUDA; yet row-wise trains correctly on CPU from a hand-built plan (``construct_module_sharding_plan`` with
  ``row_wise()``), which is what ``shard_model`` uses. A rank left without rows (blocks of ceil(rows / W)
  rows) crashes fbgemm's CPU kernel, so such tables are refused with a ValueError.
* Fused optimizers: SGD, Adagrad, row-wise Adagrad. Fused Adam fails ("Optimizer adam is not supported in CPU
  mode"). Row-wise Adagrad on tables split by columns keeps one accumulator per row of each column shard,
  which is not the unsharded optimizer (measured: weights differ by > 1e-3); ``shard_model`` warns.
* torchrec only splits columns in blocks of at least 128 by default, which leaves tables of up to 128
  columns whole (column-wise = table-wise); ``shard_model`` asks for the smallest block, a multiple of 4
  dividing the dimension, that spreads a table over the W ranks.
* Data-parallel tables are replicated, not fused: DDP averages their gradients and ``make_optimizers`` steps
  them with a regular optimizer of the requested kind. torch warns, once, that fbgemm's dense lookup has no
  autograd kernel; the gradients are nevertheless right (they match one process).
* DMP re-initialises tables when it shards them; ``shard_model`` copies the model's own seeded weights into
  the shards. Sharded lookups need contiguous IDs (an unsharded EBC does not); a pre-hook makes them so.
* BatchNorm (DHE's default) normalises over each rank's local batch under DDP, so it does not match one
  process; SyncBatchNorm would, but torch implements it only for GPUs.
* CUDA (nccl) takes the same code paths but was not run here (no GPU).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.types import ShardingPlan

SHARDING_TYPES = ("data-parallel", "table-wise", "row-wise", "column-wise", "table-column-wise")
#: fused table optimizers with CPU kernels (fused Adam has none)
EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise-adagrad")
DENSE_OPTIMIZERS = ("adam", "sgd", "adagrad")
#: Adagrad's epsilon, passed to both fused (fbgemm) and regular Adagrad so they compute the same update
ADAGRAD_EPS = 1e-8

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


def validate(sharding_type: str, embedding_optimizer: str) -> None:
    """Raise ValueError (one line) for a sharding type or table optimizer that is not offered."""
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding type '{sharding_type}'; expected one of: {', '.join(SHARDING_TYPES)}")
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"unknown embedding optimizer '{embedding_optimizer}'; expected one of: {', '.join(EMBEDDING_OPTIMIZERS)}"
        )


def embedding_collections(model: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    """The torchrec EmbeddingBagCollections in ``model`` (unsharded), with their module paths."""
    from embbench.tables import torchrec_available

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


def sharding_info(model: nn.Module) -> ShardingInfo:
    """The ShardingInfo of a model returned by ``shard_model``."""
    info = getattr(model, _INFO_ATTRIBUTE, None)
    if not isinstance(info, ShardingInfo):
        raise TypeError(f"{type(model).__name__} was not returned by shard_model")
    return info


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the DMP / DDP wrapper (with its tables sharded under DMP), e.g. to reach
    ``.user_embedding`` for ``distributed_forward``; train through the wrapper, not this."""
    from embbench.tables import torchrec_available

    if torchrec_available():
        from torchrec.distributed import DistributedModelParallel

        if isinstance(model, DistributedModelParallel):
            return model.module
    if isinstance(model, DistributedDataParallel):
        return model.module
    return model


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
    plan = _plan(model, collections, sharding_type, device)
    if embedding_optimizer == "rowwise-adagrad" and _splits_columns(plan):
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
    return sharded, _summarise(plan)


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


def _plan(
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
    constraints go by table name, and every EmbeddingTable's is "table", so one block, from the narrowest
    table, serves all: a wider table is cut into more blocks than ranks, several to a rank."""
    for block in range(4, dim, 4):
        if dim % block == 0 and block * world >= dim:
            return block
    return None


def _local_world_size(world: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def _splits_columns(plan: ShardingPlan) -> bool:
    return any(
        "column" in sharding.sharding_type and len(sharding.ranks or []) > 1
        for module_plan in plan.plan.values()
        for sharding in module_plan.values()  # type: ignore[attr-defined]
    )


def _summarise(plan: ShardingPlan) -> dict[str, str]:
    summary = {}
    for path, module_plan in plan.plan.items():
        for table, parameter_sharding in module_plan.items():  # type: ignore[attr-defined]
            kind = parameter_sharding.sharding_type.replace("_", "-")
            ranks = parameter_sharding.ranks if parameter_sharding.ranks is not None else "all"
            summary[f"{path}.{table}"] = f"{kind} on ranks {ranks}"
    return summary


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
    from embbench.tables import torchrec_available

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
    model: nn.Module, dense_optimizer: str = "adam", dense_learning_rate: float | None = None
) -> Optimizers:
    """Optimizers for a model returned by ``shard_model``: the fused table optimizer DMP holds, a regular
    optimizer for data-parallel tables, and ``dense_optimizer`` (adam, sgd or adagrad) at
    ``dense_learning_rate`` (default: the table learning rate) for everything else."""
    if dense_optimizer not in DENSE_OPTIMIZERS:
        raise ValueError(f"unknown dense optimizer '{dense_optimizer}'; expected one of: {', '.join(DENSE_OPTIMIZERS)}")
    info = sharding_info(model)
    lr = info.learning_rate if dense_learning_rate is None else dense_learning_rate
    dense_params = dense_parameters(model)
    dense = _regular_optimizer(dense_optimizer, dense_params, lr) if dense_params else None
    fused = replicated = None
    if info.wrapped == "dmp":
        if info.sharding_type == "data-parallel":
            assert info.embedding_optimizer is not None
            replicated = _regular_optimizer(info.embedding_optimizer, embedding_parameters(model), info.learning_rate)
        else:
            fused = model.fused_optimizer  # type: ignore[assignment]
    return Optimizers(fused, replicated, dense)


def _regular_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS)
    if name == "rowwise-adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad(params, lr=lr, eps=ADAGRAD_EPS)
    raise ValueError(f"unknown optimizer '{name}'")


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
