"""Resolving a suite's cells once, before anything runs: each training run becomes one explicit value
(:class:`Run`) holding the scheme instance, every feature's plan, the model class, the training configuration,
the placement (device, processes, sharding, how tables are held and trained) and what to measure, or the
reason it cannot run here. Nothing downstream re-parses, re-plans or reads the environment to learn how to run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from embbench import registry
from embbench.bags import select_bags
from embbench.collection import FUSED_OPTIMIZERS, TableTraining, torchrec_available
from embbench.errors import BudgetTooSmall, ConfigError, EmbbenchError, PluginError
from embbench.run.cells import Cell
from embbench.run.settings import BASE_PRECISION, BUDGET_SPLITS
from embbench.schemes import Budget, FeatureSpec, Scheme, SchemePlan, distinct_plans, full_table_bytes
from embbench.tasks import Task, TaskData
from embbench.training import TrainConfig

#: the share of the available memory a cell's embeddings may take while training; the rest is for the data,
#: activations, the allocator's slack and the rest of the system
MEMORY_HEADROOM = 0.8


def allocate(budget: Budget, features: Mapping[str, FeatureSpec], split: str = "proportional") -> dict[str, int]:
    """Bytes for each feature of ``budget`` over all ``features`` together.

    ``proportional`` is :meth:`Budget.allocate` (a fraction of each feature's full table; bytes in proportion to
    the full tables). ``equal`` gives every feature the same bytes: absolute bytes, or the fraction of the sum of
    the full tables, divided by the number of features; a feature whose full table is smaller keeps its full
    table's size, and what it leaves is not handed to the others (a reference's "parameters per dimension":
    the same table size for every feature, capped at its vocabulary).
    """
    if split == "proportional":
        return budget.allocate(features)
    if split != "equal":
        raise ValueError(f"budget split must be one of {', '.join(BUDGET_SPLITS)}, got '{split}'")
    full = {name: full_table_bytes(f.vocabulary, f.dim) for name, f in features.items()}
    if budget.absolute_bytes is not None:
        total = budget.absolute_bytes
    else:
        assert budget.fraction is not None
        total = math.floor(sum(full.values()) * budget.fraction)
    each = total // max(len(features), 1)
    return {name: min(each, size) for name, size in full.items()}


def plan_features(
    scheme: Scheme, features: Mapping[str, FeatureSpec], budget: Budget, split: str = "proportional"
) -> dict[str, SchemePlan]:
    """Plans of ``scheme`` for every feature within ``budget`` for all of them together.

    Each feature first gets its share (:func:`allocate`: ``split`` proportional or equal). A feature whose share
    is below the scheme's smallest module (a field of three IDs, say) gets that minimum instead, and the other
    features share what is left in the same proportions; repeated until every feature fits, or the budget
    cannot hold the minimums (BudgetTooSmall). A plan that raises anything else is one clean error naming the
    scheme.

    A scheme that :attr:`~embbench.schemes.Scheme.shares_features` plans one module for all the features (two or
    more) within the sum of their shares; every feature holds that one plan.
    """
    shares = allocate(budget, features, split)
    if getattr(scheme, "shares_features", False) and len(features) > 1:
        return _plan_shared(scheme, features, sum(shares.values()))
    total = sum(shares.values())
    floors: dict[str, int] = {}
    for _ in range(len(features) + 1):
        plans, below = {}, {}
        for name, feature in features.items():
            try:
                plans[name] = _plan(scheme, feature, floors.get(name, shares[name]))
            except BudgetTooSmall as exc:
                if name in floors:  # even its stated minimum does not fit: a bug in the scheme, or odd input
                    raise
                below[name] = exc
        if not below:
            return plans
        floors.update({name: exc.minimum_bytes for name, exc in below.items()})
        rest = {name: shares[name] for name in features if name not in floors}
        remaining = total - sum(floors.values())
        if remaining <= 0 or not rest:
            name, exc = next(iter(below.items()))
            raise BudgetTooSmall(
                exc.scheme, total, sum(floors.values()) + len(rest),
                f"the smallest modules of {len(floors)} of {len(features)} features, e.g. '{name}' "
                f"({features[name].vocabulary:,} IDs) needs {exc.minimum_bytes:,} bytes",
            ) from None
        weight = sum(rest.values())
        shares.update({name: remaining * share // weight for name, share in rest.items()})
    raise AssertionError("unreachable: every round floors at least one more feature")


def _plan(scheme: Scheme, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
    return _checked_plan(scheme, lambda: scheme.plan(feature, budget_bytes), f"feature '{feature.name}'",
                         budget_bytes, "plan")


def _plan_shared(scheme: Scheme, features: Mapping[str, FeatureSpec], budget_bytes: int) -> dict[str, SchemePlan]:
    """The one plan of ``scheme``'s module shared by all ``features``, for each of them."""
    names = tuple(features)
    plan = _checked_plan(scheme, lambda: scheme.plan_shared(list(features.values()), budget_bytes),
                         f"features {', '.join(names)}", budget_bytes, "plan_shared")
    if plan.shared_by != names:
        raise PluginError(f"scheme '{plan.scheme}'.plan_shared states shared_by={plan.shared_by}, not {names}")
    return {name: plan for name in names}


def _checked_plan(
    scheme: Scheme, planning: Callable[[], SchemePlan], what: str, budget_bytes: int, method: str
) -> SchemePlan:
    name = getattr(scheme, "name", "") or type(scheme).__name__
    try:
        plan = planning()
    except (BudgetTooSmall, EmbbenchError):
        raise
    except ValueError as exc:
        raise ConfigError(f"scheme '{name}': {exc}") from None
    except (Exception, SystemExit) as exc:  # a plugin's bug (or its sys.exit) must not become a traceback
        raise PluginError(f"scheme '{name}' failed to plan {what}: {type(exc).__name__}: {exc}") from None
    if not isinstance(plan, SchemePlan):
        raise PluginError(f"scheme '{name}'.{method} returned {type(plan).__name__}, not a SchemePlan")
    if plan.size_bytes > budget_bytes:
        raise BudgetTooSmall(name, budget_bytes, plan.size_bytes)
    return plan


#: bytes held while training, per byte of table state, by table optimizer (and kernel): the rows, and the
#: optimizer's state (Adam: two moments; Adagrad: one; row-wise Adagrad: one per row), plus dense gradients
#: for dense Adam, and the copy into a fused kernel while it is built
_TRAINING_MEMORY = {
    ("dense-adam", "dense"): 4.0, ("adam", "sparse"): 3.0, ("adam", "fused"): 3.0,
    ("adagrad", "sparse"): 2.0, ("adagrad", "fused"): 2.0, ("rowwise-adagrad", "sparse"): 1.1,
    ("rowwise-adagrad", "fused"): 2.0, ("sgd", "sparse"): 1.0, ("sgd", "fused"): 2.0,
}


def training_memory_factor(tables: TableTraining) -> float:
    """Bytes a cell holds while training per byte of its embeddings (see ``_TRAINING_MEMORY``)."""
    kernel = "fused" if tables.kernel == "sharded" else tables.kernel
    return _TRAINING_MEMORY.get((tables.optimizer, kernel), 4.0)


@dataclass(frozen=True)
class Placement:
    """Where and how a training run runs: its device, processes, sharding type (None: unsharded) and how its
    tables are held and trained."""

    device: torch.device
    world_size: int
    sharding: str | None
    tables: TableTraining

    @property
    def table_backend(self) -> str:
        """Where the tables live: torchrec (fbgemm kernels) or torch."""
        return "torchrec" if self.tables.kernel in ("fused", "sharded") else "torch"


@dataclass(frozen=True)
class Run:
    """One training run, resolved: the fp32 cell that trains (``trained``), the suite's cells it gives rows for
    (``cells``: its precisions, fp32 first where the suite has it), and everything needed to train and measure
    it. ``refusal`` says why it is stored as skipped instead of run."""

    trained: Cell
    cells: tuple[Cell, ...]
    scheme: Scheme
    plans: dict[str, SchemePlan]
    model_class: type
    model_params: dict[str, Any]
    training: TrainConfig
    placement: Placement | None
    feature_seeds: dict[str, int]
    latency_batch_sizes: tuple[int, ...]
    refusal: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str, world_size: int) -> tuple[torch.device | None, str | None]:
    """The torch device for a suite device name, or (None, why) when it is not available here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            return None, "CUDA is not available on this machine (torch.cuda.is_available() is False)"
        if world_size > 1 and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"])), None
    return torch.device(name), None


def place(cell: Cell, device: torch.device, where: str) -> tuple[Placement | None, str | None]:
    """The cell's placement on ``device``, or (None, why) when this installation cannot run it. Raises
    ConfigError for combinations no installation can run."""
    optimizer = cell["embedding_optimizer"]
    backend = cell["backend"]
    fused = optimizer in FUSED_OPTIMIZERS.get(device.type, ())
    sharding = cell.sharding_type
    if sharding is not None:
        if optimizer == "dense-adam" or not fused:
            how = f"--nproc {cell.world_size}" if cell.world_size > 1 else f"sharding '{sharding}'"
            raise ConfigError(
                f"{where}: embedding_optimizer '{optimizer}' has no fused kernel on {device.type}, which sharded "
                f"training ({how}) needs; use one of {', '.join(FUSED_OPTIMIZERS.get(device.type, ()))}"
            )
        if backend == "torch":
            raise ConfigError(f"{where}: sharded training needs torchrec tables; use backends 'auto' or 'torchrec'")
        if not torchrec_available():
            return None, "sharded training needs torchrec and fbgemm, which cannot be imported here (see README)"
        tables = TableTraining("torchrec", optimizer, cell["embedding_learning_rate"], device, sharded=True)
        return Placement(device, cell.world_size, sharding, tables), None
    if backend == "torchrec":
        if not torchrec_available():
            return None, "backend 'torchrec' needs torchrec and fbgemm, which cannot be imported here (see README)"
        if not fused:
            return None, (
                f"fbgemm has no fused '{optimizer}' table kernel on {device.type}; tables with this optimizer run on "
                "the torch backend ('auto' chooses it)"
            )
    chosen = "torchrec" if backend != "torch" and fused and torchrec_available() else "torch"
    tables = TableTraining(chosen, optimizer, cell["embedding_learning_rate"], device)
    return Placement(device, 1, None, tables), None


def memory_refusal(plans: Mapping[str, SchemePlan], tables: TableTraining, available: int | None) -> str | None:
    """Why the cell's embeddings cannot be trained in ``available`` bytes, or None when they fit."""
    size = sum(plan.size_bytes for plan in distinct_plans(plans))
    factor = training_memory_factor(tables)
    needed = int(size * factor)
    if available is None or needed <= available * MEMORY_HEADROOM:
        return None
    return (
        f"refused before building: the embeddings store {_size_text(size)}, about {_size_text(needed)} while "
        f"training ({factor:g}x with {tables.optimizer} on the {tables.kernel} kernel), more than "
        f"{MEMORY_HEADROOM:.0%} of the {_size_text(available)} this machine has available; use a smaller "
        "vocabulary or budget, a compressed scheme, or a table optimizer with less state"
    )


def _size_text(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def resolve_runs(
    cells: Sequence[Cell],
    task: Task,
    data: Mapping[str, TaskData],
    available_memory: int | None,
) -> list[Run]:
    """Every training run of ``cells`` resolved (cells that differ only in precision share one), in order.

    Scheme instances are created once per entry and plans once per (entry, budget, dataset); a budget a
    scheme cannot meet is a ConfigError naming the entry, the budget and the dataset.
    """
    schemes: dict[str, Scheme] = {}
    plans: dict[tuple[str, str, str, str, tuple[str, ...]], dict[str, SchemePlan]] = {}
    runs: dict[str, list[Cell]] = {}
    for cell in cells:
        runs.setdefault(cell.trained.key, []).append(cell)
    resolved = []
    for group in runs.values():
        cell = group[0].trained
        entry = cell.scheme
        if entry.where not in schemes:
            schemes[entry.where] = registry.create("schemes", entry.name, where=entry.where, **entry.params)
        scheme = schemes[entry.where]
        features = select_bags(data[cell.dataset.label], cell["bags"]).features
        split = cell["budget_split"]
        plan_key = (entry.where, cell.budget, cell.dataset.label, split, tuple(cell["bags"]))
        if plan_key not in plans:
            try:
                plans[plan_key] = plan_features(scheme, features, Budget.parse(cell.budget), split)
            except BudgetTooSmall as exc:
                raise ConfigError(f"{entry.where} at budget {cell.budget} on {cell.dataset.label}: {exc}") from None
            except EmbbenchError as exc:
                raise type(exc)(f"{entry.where}: {exc}") from None
        device, refusal = resolve_device(cell.device, cell.world_size)
        placement = None
        if device is not None:
            placement, refusal = place(cell, device, f"{cell.scheme.where} ({cell.describe()})")
        if placement is not None and device.type != "cuda":  # GPU memory is checked when the cell runs
            refusal = memory_refusal(plans[plan_key], placement.tables, available_memory)
        ordered = sorted(group, key=lambda c: c.precision != BASE_PRECISION)
        resolved.append(
            Run(
                trained=cell,
                cells=tuple(ordered),
                scheme=scheme,
                plans=plans[plan_key],
                model_class=registry.get_plugin("models", cell.model.name),
                model_params=dict(cell.model.params),
                training=cell.training_config(),
                placement=placement,
                feature_seeds={name: cell.seed * 1000 + offset + 1 for offset, name in enumerate(features)},
                latency_batch_sizes=tuple(cell["latency_batch_sizes"]),
                refusal=refusal,
            )
        )
    return resolved
