"""A model's embeddings: one module per feature, and the rows of all their tables in one collection that is
looked up once per batch, the way torchrec means it (a KeyedJaggedTensor -> an embedding-bag kernel ->
pooled rows), and trained by a fused or sparse table optimizer.

:class:`FeatureEmbeddings` maps a batch of IDs per feature to embeddings. Features whose scheme module is a
:class:`embbench.tables.TableBackedEmbedding` are looked up together: every lookup of every feature goes into
one jagged batch, one kernel call pools them, and each module combines its pooled rows. Other modules (DHE,
TT-Rec) are called as they are. Where the tables live and how they learn is a :class:`TableTraining`:

- **fused**: fbgemm's ``SplitTableBatchedEmbeddingBagsCodegen`` (torchrec's TBE); the optimizer runs inside
  the backward pass and touches only the rows a batch read (SGD, Adagrad, row-wise Adagrad; Adam on CUDA);
- **sparse**: ``nn.EmbeddingBag(sparse=True)``: row-sparse gradients stepped by a torch optimizer (SparseAdam,
  SGD, Adagrad, or a row-wise Adagrad) where no fused kernel exists;
- **dense**: dense gradients and Adam over every row (``dense-adam``: the protocol of papers that used it);
- **sharded**: a torchrec ``EmbeddingBagCollection``, for ``DistributedModelParallel`` to shard and fuse.

fbgemm's kernel takes rows whose width is a multiple of 4; a fused collection keeps other tables (ROBE's array
of width 1, say) in the sparse kernel with the same optimizer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from embbench.tables import EmbeddingTable, Lookup, TableBackedEmbedding

#: table optimizers a cell may choose; ``dense-adam`` steps every row with dense Adam
TABLE_OPTIMIZERS = ("adam", "sgd", "adagrad", "rowwise-adagrad", "dense-adam")
#: table optimizers fbgemm fuses into the backward pass, by device type
FUSED_OPTIMIZERS = {"cpu": ("sgd", "adagrad", "rowwise-adagrad"), "cuda": ("adam", "sgd", "adagrad", "rowwise-adagrad")}
KERNELS = ("fused", "sparse", "dense", "sharded", "quantized")
TABLE_BACKENDS = ("torchrec", "torch")
#: Adagrad's epsilon, the same for fused (fbgemm) and torch Adagrad so that they compute the same update
ADAGRAD_EPS = 1e-8
#: fbgemm's kernels take rows of a multiple of this many floats
FUSED_DIM_MULTIPLE = 4


@functools.cache
def torchrec_available() -> bool:
    """Whether torchrec and fbgemm import (and fbgemm's library loads)."""
    # torch.fx logs a deprecation warning when torchrec imports; it is not the user's concern.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except Exception:  # ImportError, or fbgemm failing to load its library
        return False
    return True


@dataclass(frozen=True)
class TableTraining:
    """How a model's tables are held and trained: the backend, the table optimizer and its learning rate,
    the device, and whether the tables will be sharded (torchrec DMP)."""

    backend: str = "torch"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False

    def __post_init__(self) -> None:
        if self.backend not in TABLE_BACKENDS:
            raise ValueError(f"table backend must be one of {', '.join(TABLE_BACKENDS)}, got '{self.backend}'")
        if self.optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got '{self.optimizer}'")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def kernel(self) -> str:
        """The kernel tables use (see the module docstring)."""
        if self.sharded:
            return "sharded"
        if self.optimizer == "dense-adam":
            return "dense"
        if self.backend == "torchrec" and self.optimizer in FUSED_OPTIMIZERS.get(self.device.type, ()):
            return "fused"
        return "sparse"


@dataclass(frozen=True)
class _TableSpec:
    key: str
    feature: str
    table: EmbeddingTable
    slots: tuple[str, ...]  # the KeyedJaggedTensor keys of the table's reads, in read order


class _Store(nn.Module):
    """Holds some of the collection's tables; pools the bags of their slots in one call."""

    kernel: str = ""

    def __init__(self, specs: Sequence[_TableSpec]) -> None:
        super().__init__()
        self.keys = [spec.key for spec in specs]
        self.slot_dims = [spec.table.dim for spec in specs for _ in spec.slots]
        self.weighted = any(spec.table.weighted for spec in specs)

    def pool(self, lookups: Sequence[Lookup | None], batch: int, device: torch.device) -> list[torch.Tensor]:
        """Pooled rows [batch, dim] of each slot's lookup (None: no reads, zeros), slots in store order."""
        raise NotImplementedError

    def weight(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def table_parameters(self) -> list[nn.Parameter]:
        """Parameters a torch optimizer steps (none where the kernel updates rows itself)."""
        return []

    def state_bytes(self) -> int:
        """Bytes of optimizer state the kernel itself keeps (fused kernels)."""
        return 0

    @staticmethod
    def _jagged(
        lookups: Sequence[Lookup | None], batch: int, device: torch.device, weighted: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The slots' reads as one jagged batch, slot after slot: values, lengths [slots * batch], weights."""
        values, lengths, weights = [], [], []
        for lookup in lookups:
            if lookup is None:
                bag_values = torch.empty(0, dtype=torch.int64, device=device)
                bag_lengths = torch.zeros(batch, dtype=torch.int64, device=device)
                bag_weights = None
            else:
                bag_values, bag_lengths, bag_weights = lookup.bags()
            values.append(bag_values)
            lengths.append(bag_lengths)
            if weighted:
                ones = torch.ones(bag_values.shape, device=device)
                weights.append(bag_weights.float() if bag_weights is not None else ones)
        if len(values) == 1:
            return values[0].contiguous(), lengths[0], weights[0].contiguous() if weighted else None
        return torch.cat(values), torch.cat(lengths), torch.cat(weights) if weighted else None


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


class _TorchStore(_Store):
    """``nn.EmbeddingBag`` per table, sparse or dense gradients; each table pools all its slots in one call."""

    def __init__(self, specs: Sequence[_TableSpec], sparse: bool) -> None:
        super().__init__(specs)
        self.kernel = "sparse" if sparse else "dense"
        self.slots_per_table = [len(spec.slots) for spec in specs]
        self.embedding_bags = nn.ModuleDict()
        for spec in specs:
            weight = spec.table.weight.detach()  # the bag takes over the rows: no copy
            self.embedding_bags[spec.key] = nn.EmbeddingBag(
                spec.table.num_rows, spec.table.dim, mode="sum", sparse=sparse, _weight=weight
            )

    def pool(self, lookups: Sequence[Lookup | None], batch: int, device: torch.device) -> list[torch.Tensor]:
        pooled: list[torch.Tensor] = []
        start = 0
        for bag, count in zip(self.embedding_bags.values(), self.slots_per_table, strict=True):
            mine = lookups[start : start + count]
            start += count
            if count == 1 and mine[0] is not None and mine[0].lengths is None:  # k rows per ID: no offsets needed
                lookup = mine[0]
                indices, weights = lookup.indices, lookup.weights
                if indices.dim() == 1:
                    indices, weights = indices.unsqueeze(1), None if weights is None else weights.unsqueeze(1)
                pooled.append(bag(indices, per_sample_weights=weights))
                continue
            if all(lookup is None for lookup in mine):
                pooled.extend(torch.zeros(batch, bag.embedding_dim, device=device) for _ in mine)
                continue
            weighted = any(lookup is not None and lookup.weights is not None for lookup in mine)
            values, lengths, weights = self._jagged(mine, batch, device, weighted)
            out = bag(values, _offsets(lengths)[:-1], per_sample_weights=weights)
            pooled.extend(out.chunk(count) if count > 1 else (out,))
        return pooled

    def weight(self, key: str) -> torch.Tensor:
        return self.embedding_bags[key].weight

    def table_parameters(self) -> list[nn.Parameter]:
        return [bag.weight for bag in self.embedding_bags.values()]


class _FusedStore(_Store):
    """fbgemm's table-batched kernel over all its tables, the optimizer fused into backward."""

    kernel = "fused"

    def __init__(self, specs: Sequence[_TableSpec], optimizer: str, learning_rate: float, device: torch.device) -> None:
        super().__init__(specs)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, EmbeddingLocation

        kind = {
            "sgd": EmbOptimType.EXACT_SGD,
            "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "rowwise-adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "adam": EmbOptimType.ADAM,
        }[optimizer]
        on_gpu = device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        feature_table_map = [index for index, spec in enumerate(specs) for _ in spec.slots]
        self.optimizer, self.learning_rate = optimizer, learning_rate
        self._specs_args = (
            [(spec.table.num_rows, spec.table.dim, location, compute) for spec in specs],
            feature_table_map,
            kind,
        )
        self._device = device
        self._tbe = [self._make_kernel()]  # a list: the kernel is not a submodule (see _save_to_state_dict)
        self._offsets_cache: torch.Tensor | None = None
        with torch.no_grad():
            for target, spec in zip(self.kernel_module.split_embedding_weights(), specs, strict=True):
                target.copy_(spec.table.weight)
        self._index = {key: index for index, key in enumerate(self.keys)}

    def _make_kernel(self) -> Any:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

        tables, feature_table_map, kind = self._specs_args
        return SplitTableBatchedEmbeddingBagsCodegen(
            tables,
            feature_table_map=feature_table_map,
            optimizer=kind,
            learning_rate=self.learning_rate,
            eps=ADAGRAD_EPS,
            pooling_mode=PoolingMode.SUM,
            device=self._device,
        )

    @property
    def kernel_module(self) -> Any:
        return self._tbe[0]

    def pool(self, lookups: Sequence[Lookup | None], batch: int, device: torch.device) -> list[torch.Tensor]:
        if not self.weighted and all(
            lookup is not None and lookup.lengths is None and lookup.indices.dim() == 1 for lookup in lookups
        ):  # one row per ID in every slot (most schemes): the offsets are 0, 1, 2, ...
            values = torch.cat([lookup.indices for lookup in lookups]) if len(lookups) > 1 else lookups[0].indices
            out = self.kernel_module(values.contiguous(), self._regular_offsets(values.shape[0], device))
        else:
            values, lengths, weights = self._jagged(lookups, batch, device, self.weighted)
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
            out = self.kernel_module(values, offsets, per_sample_weights=weights)
        return [out] if len(self.slot_dims) == 1 else list(out.split(self.slot_dims, dim=1))

    def _regular_offsets(self, count: int, device: torch.device) -> torch.Tensor:
        cached = self._offsets_cache
        if cached is None or cached.shape[0] != count + 1 or cached.device != device:
            cached = self._offsets_cache = torch.arange(count + 1, device=device)
        return cached

    def weight(self, key: str) -> torch.Tensor:
        return self.kernel_module.split_embedding_weights()[self._index[key]]

    def state_bytes(self) -> int:
        total = 0
        for states in self.kernel_module.split_optimizer_states():
            total += sum(state.numel() * state.element_size() for state in states)
        return total

    # The kernel keeps all rows in one flat buffer (and its optimizer state beside it); the state dict shows
    # each table's rows under its own key, as torchrec's fused collection does.
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key in self.keys:
            weight = self.weight(key)
            destination[f"{prefix}embedding_bags.{key}.weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        for key in self.keys:
            name = f"{prefix}embedding_bags.{key}.weight"
            if name not in state_dict:
                missing_keys.append(name)
                continue
            with torch.no_grad():
                self.weight(key).copy_(state_dict[name])
        known = {f"{prefix}embedding_bags.{key}.weight" for key in self.keys}
        if strict:  # the store has no other state: anything else under its prefix is unexpected
            unexpected_keys.extend(name for name in state_dict if name.startswith(prefix) and name not in known)

    def __deepcopy__(self, memo: dict[int, Any]) -> _FusedStore:
        copy = self.__class__.__new__(self.__class__)
        memo[id(self)] = copy
        nn.Module.__init__(copy)
        copy.keys, copy.slot_dims, copy.weighted = list(self.keys), list(self.slot_dims), self.weighted
        copy.optimizer, copy.learning_rate = self.optimizer, self.learning_rate
        copy._specs_args, copy._device, copy._index = self._specs_args, self._device, dict(self._index)
        copy._tbe = [copy._make_kernel()]
        copy._offsets_cache = None
        with torch.no_grad():
            for source, target in zip(
                self.kernel_module.split_embedding_weights(), copy.kernel_module.split_embedding_weights(), strict=True
            ):
                target.copy_(source)
            for sources, targets in zip(
                self.kernel_module.split_optimizer_states(), copy.kernel_module.split_optimizer_states(), strict=True
            ):
                for source, target in zip(sources, targets, strict=True):
                    target.copy_(source)
        copy.train(self.training)
        return copy

    def _apply(self, fn: Any, recurse: bool = True) -> _FusedStore:
        return self  # the kernel is built on its device; it does not move

    def extra_repr(self) -> str:
        return f"tables={len(self.keys)}, optimizer={self.optimizer}, lr={self.learning_rate}"


class _ShardableStore(_Store):
    """A torchrec ``EmbeddingBagCollection`` of the tables, for DistributedModelParallel to shard."""

    kernel = "sharded"

    def __init__(self, specs: Sequence[_TableSpec], device: torch.device) -> None:
        super().__init__(specs)
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        configs = [
            EmbeddingBagConfig(
                name=spec.key, embedding_dim=spec.table.dim, num_embeddings=spec.table.num_rows,
                feature_names=list(spec.slots),
            )
            for spec in specs
        ]
        self.slot_keys = [slot for spec in specs for slot in spec.slots]
        self.ebc = EmbeddingBagCollection(tables=configs, is_weighted=self.weighted, device=device)
        with torch.no_grad():
            for spec in specs:
                self.ebc.embedding_bags[spec.key].weight.copy_(spec.table.weight)

    def pool(self, lookups: Sequence[Lookup | None], batch: int, device: torch.device) -> list[torch.Tensor]:
        from torchrec import KeyedJaggedTensor

        values, lengths, weights = self._jagged(lookups, batch, device, self.weighted)
        features = KeyedJaggedTensor(keys=self.slot_keys, values=values, lengths=lengths, weights=weights)
        return list(self.ebc(features).values().split(self.slot_dims, dim=1))

    def weight(self, key: str) -> torch.Tensor:
        return self.ebc.embedding_bags[key].weight

    def table_parameters(self) -> list[nn.Parameter]:
        return list(self.ebc.parameters())


class TableCollection(nn.Module):
    """The tables of every table-backed feature module, held by one or two kernels (:class:`TableTraining`).

    Table keys are feature-qualified module paths (``user__table``, ``item__tables_0``); each read of a table
    is a slot of the jagged batch (``item__tables_0#0``). Building it hands every table's rows to the kernel
    (``EmbeddingTable.bind``).
    """

    def __init__(self, modules: Mapping[str, TableBackedEmbedding], training: TableTraining) -> None:
        super().__init__()
        self.training_config = training
        specs: list[_TableSpec] = []
        self._slots: dict[str, tuple[str, ...]] = {}  # table key -> its slot keys
        seen: set[int] = set()
        owners: dict[int, str] = {}
        for feature, module in modules.items():
            if id(module) in owners:
                raise ValueError(
                    f"one module is given for features '{owners[id(module)]}' and '{feature}'; build one module "
                    "per feature (each feature's IDs need tables of their own)"
                )
            owners[id(module)] = feature
            own: set[str] = set()
            for path, table in module.named_modules():
                if isinstance(table, EmbeddingTable) and id(table) not in seen:
                    seen.add(id(table))
                    key = f"{feature}__{path.replace('.', '_')}" if path else feature
                    slots = tuple(f"{key}#{read}" for read in range(table.lookups))
                    specs.append(_TableSpec(key, feature, table, slots))
                    self._slots[key] = slots
                if isinstance(table, EmbeddingTable):
                    own.add(f"{feature}__{path.replace('.', '_')}" if path else feature)
            # what this module may read: a plain attribute, so that a copy of the model keeps it
            object.__setattr__(module, "_embbench_tables", frozenset(own))
        kernel = training.kernel
        device = training.device
        if kernel == "fused":
            if not torchrec_available():
                raise RuntimeError("the fused table kernel needs fbgemm, which cannot be imported here; see README")
            fused = [spec for spec in specs if spec.table.dim % FUSED_DIM_MULTIPLE == 0]
            rest = [spec for spec in specs if spec.table.dim % FUSED_DIM_MULTIPLE != 0]
            groups: list[tuple[_Store, list[_TableSpec]]] = []
            if fused:
                groups.append((_FusedStore(fused, training.optimizer, training.learning_rate, device), fused))
            if rest:
                groups.append((_TorchStore(rest, sparse=True).to(device), rest))
        elif kernel == "sharded":
            if not torchrec_available():
                raise RuntimeError("sharded tables need torchrec, which cannot be imported here; see README")
            groups = [(_ShardableStore(specs, device), specs)]
        else:
            groups = [(_TorchStore(specs, sparse=kernel == "sparse").to(device), specs)] if specs else []
        self.specs = specs
        self.table_keys = [spec.key for spec in specs]
        # each module's reads of its last call and their slots: the structure is the same every call
        self._read_plans: dict[nn.Module, tuple[tuple[EmbeddingTable, tuple[int, int]], ...]] = {}
        self.stores = nn.ModuleList()
        self.replace_stores([store for store, _ in groups])
        for spec in specs:
            spec.table.bind(self, spec.key)

    def replace_stores(self, stores: Sequence[_Store]) -> None:
        """Hold the tables in ``stores`` (each store's ``keys`` say which; every table in exactly one)."""
        by_key = {spec.key: spec for spec in self.specs}
        held = sorted(key for store in stores for key in store.keys)
        if held != sorted(by_key):
            raise ValueError("the stores must hold every table of the collection exactly once")
        self.stores = nn.ModuleList(stores)
        self._store_of: dict[str, _Store] = {}
        self._position: dict[str, tuple[int, int]] = {}  # slot key -> (store index, slot index in the store)
        for index, store in enumerate(stores):
            slot_index = 0
            for key in store.keys:
                self._store_of[key] = store
                for slot in by_key[key].slots:
                    self._position[slot] = (index, slot_index)
                    slot_index += 1

    def store_of(self, key: str) -> _Store:
        """The store holding table ``key``."""
        return self._store_of[key]

    # -- rows ---------------------------------------------------------------------------------------------
    def weight(self, key: str) -> torch.Tensor:
        """The rows of table ``key`` [rows, dim], as the kernel holds them (writes go through)."""
        return self._store_of[key].weight(key)

    def pool_one(
        self, table: EmbeddingTable, values: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """One table's pooled rows outside the batched path (e.g. a scheme reading its rows between epochs)."""
        return functional.embedding_bag(
            values, self.weight(table._key or ""), _offsets(lengths)[:-1], mode="sum", per_sample_weights=weights
        )

    # -- the batched path ---------------------------------------------------------------------------------
    def embed_modules(self, calls: Sequence[tuple[TableBackedEmbedding, torch.Tensor]]) -> list[torch.Tensor]:
        """Embeddings of each (module, ids) pair, every table read of all of them pooled in one batch.

        All ``ids`` must have the same length (the batch); a table no module reads gets empty bags.
        """
        if not calls:
            return []
        batch = int(calls[0][1].shape[0])
        device = calls[0][1].device
        per_store: list[list[Any]] = [[None] * len(store.slot_dims) for store in self.stores]
        placed: list[list[tuple[int, int]]] = []
        for module, ids in calls:
            if int(ids.shape[0]) != batch:
                raise ValueError(f"features looked up together need one batch size, got {batch} and {ids.shape[0]}")
            lookups = module.lookups(ids)
            known = self._read_plans.get(module)
            if known is not None and len(known) == len(lookups) and all(
                lookup.table is table and lookup.batch_size == batch
                for lookup, (table, _) in zip(lookups, known, strict=True)
            ):  # the same reads as the last call (the usual case): their slots are known
                for lookup, (_, (store_index, slot_index)) in zip(lookups, known, strict=True):
                    per_store[store_index][slot_index] = lookup
                placed.append([where for _, where in known])
                continue
            reads: dict[int, int] = {}
            where = []
            for lookup in lookups:
                table = lookup.table
                if table._collection is not self or table._key not in getattr(module, "_embbench_tables", ()):
                    raise ValueError(f"{type(module).__name__}.lookups read a table that is not one of its own")
                slots = self._slots[table._key or ""]
                read = reads.get(id(table), 0)
                if read >= len(slots):
                    raise ValueError(
                        f"{type(module).__name__}.lookups read a table more often than its lookups={len(slots)}"
                    )
                reads[id(table)] = read + 1
                if lookup.batch_size != batch:
                    raise ValueError(
                        f"a lookup of {type(module).__name__} has {lookup.batch_size} bags for {batch} IDs"
                    )
                store_index, slot_index = self._position[slots[read]]
                per_store[store_index][slot_index] = lookup
                where.append((store_index, slot_index))
            self._read_plans[module] = tuple(
                (lookup.table, position) for lookup, position in zip(lookups, where, strict=True)
            )
            placed.append(where)
        pooled_per_store = [
            store.pool(lookups, batch, device) for store, lookups in zip(self.stores, per_store, strict=True)
        ]
        return [
            module.combine(ids, [pooled_per_store[s][i] for s, i in where])
            for (module, ids), where in zip(calls, placed, strict=True)
        ]

    def embed_module(self, module: TableBackedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_modules([(module, ids)])[0]

    # -- training -----------------------------------------------------------------------------------------
    @property
    def kernel(self) -> str:
        kernels = sorted({store.kernel for store in self.stores}, key=KERNELS.index)
        return "+".join(kernels) if kernels else "none"

    def table_parameters(self) -> list[nn.Parameter]:
        """Table parameters a torch optimizer steps (sparse or dense kernels)."""
        return [parameter for store in self.stores for parameter in store.table_parameters()]

    def kernel_state_bytes(self) -> int:
        """Optimizer state held inside fused kernels."""
        return sum(store.state_bytes() for store in self.stores)

    def describe(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "tables": len(self.table_keys),
            "slots": sum(len(store.slot_dims) for store in self.stores),
            "kernel_calls_per_batch": len(self.stores),
            "tables_per_kernel": {store.kernel: len(store.keys) for store in self.stores},
        }


class FeatureEmbeddings(nn.Module):
    """Each feature's embedding module, and (given a :class:`TableTraining`) their tables in one collection.

    ``forward({feature: ids [B]})`` -> ``{feature: embeddings [B, dim]}``: table-backed features are looked up
    together (one kernel call per batch), other modules called as they are. ``embed(feature, ids)`` embeds one
    feature. Without ``training`` each module runs standalone (as in tests and ``embbench size``).
    """

    def __init__(self, modules: Mapping[str, nn.Module], training: TableTraining | None = None) -> None:
        super().__init__()
        if not modules:
            raise ValueError("FeatureEmbeddings needs at least one feature")
        self.features = nn.ModuleDict(dict(modules))
        table_backed = {
            name: module for name, module in self.features.items() if isinstance(module, TableBackedEmbedding)
        }
        self.tables = TableCollection(table_backed, training) if training is not None and table_backed else None
        self.table_training = training
        # Tables of modules that do not split their forward (a third-party scheme calling its tables directly)
        # are read one by one; they still get sparse gradients unless the optimizer is dense Adam.
        self._loose_tables = [
            table
            for name, module in self.features.items()
            if name not in table_backed
            for table in module.modules()
            if isinstance(table, EmbeddingTable)
        ]
        if training is not None:
            for table in self._loose_tables:
                table.sparse_gradients = training.optimizer != "dense-adam"

    def __getitem__(self, feature: str) -> nn.Module:
        return self.features[feature]

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    def names(self) -> list[str]:
        return list(self.features)

    def forward(self, ids: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        together: list[tuple[str, TableBackedEmbedding, torch.Tensor]] = []
        for name, batch in ids.items():
            module = self.features[name]
            if self.tables is not None and isinstance(module, TableBackedEmbedding):
                together.append((name, module, batch))
            else:
                out[name] = module(batch)
        if together:
            # features of one batch size share a kernel call (all of them, in training)
            by_size: dict[int, list[tuple[str, TableBackedEmbedding, torch.Tensor]]] = {}
            for item in together:
                by_size.setdefault(int(item[2].shape[0]), []).append(item)
            assert self.tables is not None
            for group in by_size.values():
                vectors = self.tables.embed_modules([(module, batch) for _, module, batch in group])
                out.update({name: vector for (name, _, _), vector in zip(group, vectors, strict=True)})
        return {name: out[name] for name in ids}

    def embed(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, dim] of one feature's IDs."""
        return self.forward({feature: ids})[feature]

    # -- training -----------------------------------------------------------------------------------------
    def table_parameters(self) -> list[nn.Parameter]:
        """Table rows a torch table optimizer steps: the sparse or dense kernel's, and loose tables'."""
        parameters = self.tables.table_parameters() if self.tables is not None else []
        return parameters + [table.weight for table in self._loose_tables if not table.bound]

    @property
    def kernel(self) -> str:
        """The table kernel that ran ('fused', 'sparse', 'dense', 'sharded', joined by '+' when mixed)."""
        kernels = set()
        if self.tables is not None:
            kernels.update(store.kernel for store in self.tables.stores)
        if self._loose_tables:
            optimizer = self.table_training.optimizer if self.table_training is not None else "dense-adam"
            kernels.add("dense" if optimizer == "dense-adam" else "sparse")
        return "+".join(sorted(kernels, key=KERNELS.index)) if kernels else "none"
