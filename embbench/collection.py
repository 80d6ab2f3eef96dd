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

from embbench.bags import BagIndex, Bags, bag_route, combine_reads, embed_bags, request_size, table_reads
from embbench.kernels import FusedStore, ShardableStore, TableSpec, TableStore, TorchStore, offsets_of
from embbench.tables import EmbeddingTable, TableBackedEmbedding

#: table optimizers a cell may choose; ``dense-adam`` steps every row with dense Adam
TABLE_OPTIMIZERS = ("adam", "sgd", "adagrad", "rowwise-adagrad", "dense-adam")
#: table optimizers fbgemm fuses into the backward pass, by device type
FUSED_OPTIMIZERS = {"cpu": ("sgd", "adagrad", "rowwise-adagrad"), "cuda": ("adam", "sgd", "adagrad", "rowwise-adagrad")}
KERNELS = ("fused", "sparse", "dense", "sharded", "quantized")
TABLE_BACKENDS = ("torchrec", "torch")
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


class TableCollection(nn.Module):
    """The tables of every table-backed feature module, held by one or two kernels (:class:`TableTraining`).

    Table keys are feature-qualified module paths (``user__table``, ``item__tables_0``); each read of a table
    is a slot of the jagged batch (``item__tables_0#0``). Building it hands every table's rows to the kernel
    (``EmbeddingTable.bind``).
    """

    def __init__(self, modules: Mapping[str, TableBackedEmbedding], training: TableTraining) -> None:
        super().__init__()
        self.training_config = training
        specs: list[TableSpec] = []
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
                    specs.append(TableSpec(key, feature, table, slots))
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
            groups: list[tuple[TableStore, list[TableSpec]]] = []
            if fused:
                groups.append((FusedStore(fused, training.optimizer, training.learning_rate, device), fused))
            if rest:
                groups.append((TorchStore(rest, sparse=True).to(device), rest))
        elif kernel == "sharded":
            if not torchrec_available():
                raise RuntimeError("sharded tables need torchrec, which cannot be imported here; see README")
            groups = [(ShardableStore(specs, device), specs)]
        else:
            groups = [(TorchStore(specs, sparse=kernel == "sparse").to(device), specs)] if specs else []
        self.specs = specs
        self.table_keys = [spec.key for spec in specs]
        # each module's reads of its last call and their slots: the structure is the same every call
        self._read_plans: dict[nn.Module, tuple[tuple[EmbeddingTable, tuple[int, int]], ...]] = {}
        self.stores = nn.ModuleList()
        self.replace_stores([store for store, _ in groups])
        for spec in specs:
            spec.table.bind(self, spec.key)

    def replace_stores(self, stores: Sequence[TableStore]) -> None:
        """Hold the tables in ``stores`` (each store's ``keys`` say which; every table in exactly one)."""
        by_key = {spec.key: spec for spec in self.specs}
        held = sorted(key for store in stores for key in store.keys)
        if held != sorted(by_key):
            raise ValueError("the stores must hold every table of the collection exactly once")
        self.stores = nn.ModuleList(stores)
        self._store_of: dict[str, TableStore] = {}
        self._position: dict[str, tuple[int, int]] = {}  # slot key -> (store index, slot index in the store)
        for index, store in enumerate(stores):
            slot_index = 0
            for key in store.keys:
                self._store_of[key] = store
                for slot in by_key[key].slots:
                    self._position[slot] = (index, slot_index)
                    slot_index += 1

    def store_of(self, key: str) -> TableStore:
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
            values, self.weight(table._key or ""), offsets_of(lengths)[:-1], mode="sum", per_sample_weights=weights
        )

    # -- the batched path ---------------------------------------------------------------------------------
    def embed_modules(
        self, calls: Sequence[tuple[TableBackedEmbedding, torch.Tensor | Bags]]
    ) -> list[torch.Tensor]:
        """Embeddings of each (module, ids) pair, every table read of all of them pooled in one batch.

        All ``ids`` must have the same length (the batch); a table no module reads gets empty bags. In place of
        IDs, a module whose ``combine_is_linear`` may be given :class:`~embbench.bags.Bags` (one embedding per
        bag: its IDs' rows pooled in the kernel).
        """
        if not calls:
            return []
        batch = request_size(calls[0][1])
        device = calls[0][1].device
        per_store: list[list[Any]] = [[None] * len(store.slot_dims) for store in self.stores]
        placed: list[list[tuple[int, int]]] = []
        for module, ids in calls:
            if request_size(ids) != batch:
                raise ValueError(
                    f"features looked up together need one batch size, got {batch} and {request_size(ids)}"
                )
            lookups = table_reads(module, ids)
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
            combine_reads(module, ids, [pooled_per_store[s][i] for s, i in where])
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

    ``bags`` makes features bag features (:mod:`embbench.bags`): feature ``name``'s :class:`BagIndex` maps the
    IDs of its owner feature to bags of ``name``'s IDs. ``forward`` then also gives, for every owner in its
    input, each of its bag features' pooled embeddings [B, dim] under the bag feature's name, looked up in the
    same kernel call (:func:`embbench.bags.bag_route` says where each scheme pools); ``with_bags=False`` leaves
    them out.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        training: TableTraining | None = None,
        bags: Mapping[str, BagIndex] | None = None,
    ) -> None:
        super().__init__()
        if not modules:
            raise ValueError("FeatureEmbeddings needs at least one feature")
        self.features = nn.ModuleDict(dict(modules))
        bags = dict(bags or {})
        for name, index in bags.items():
            if name not in self.features or index.owner not in self.features or index.owner in bags:
                raise ValueError(
                    f"bag feature '{name}' of '{index.owner}' needs a module of its own and an owner feature that is "
                    f"not a bag, among {', '.join(self.features)}"
                )
        self.bags = nn.ModuleDict(bags)
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

    def forward(self, ids: Mapping[str, torch.Tensor], with_bags: bool = True) -> dict[str, torch.Tensor]:
        requests: dict[str, torch.Tensor | Bags] = dict(ids)
        if with_bags:
            requests.update({name: index(ids[index.owner]) for name, index in self.bags.items() if index.owner in ids})
        out: dict[str, torch.Tensor] = {}
        pool_after: dict[str, Bags] = {}  # bags of modules that embed each ID: pooled once their IDs are embedded
        together: list[tuple[str, TableBackedEmbedding, torch.Tensor | Bags]] = []
        for name, request in requests.items():
            module = self.features[name]
            in_tables = self.tables is not None and isinstance(module, TableBackedEmbedding)
            if isinstance(request, Bags):
                route = bag_route(module)
                if route == "own" or not in_tables:
                    out[name] = embed_bags(module, request)
                    continue
                if route == "each":
                    pool_after[name], request = request, request.values
            if in_tables:
                together.append((name, module, request))
            else:
                out[name] = module(request)
        if together:
            # features of one batch size share a kernel call (all of them, in training)
            by_size: dict[int, list[tuple[str, TableBackedEmbedding, torch.Tensor | Bags]]] = {}
            for item in together:
                by_size.setdefault(request_size(item[2]), []).append(item)
            assert self.tables is not None
            for group in by_size.values():
                vectors = self.tables.embed_modules([(module, batch) for _, module, batch in group])
                out.update({name: vector for (name, _, _), vector in zip(group, vectors, strict=True)})
        out.update({name: bags.pool(out[name]) for name, bags in pool_after.items()})
        return {name: out[name] for name in requests}

    def embed(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, dim] of one feature's IDs."""
        return self.forward({feature: ids}, with_bags=False)[feature]

    def embed_bags(self, feature: str, bags: Bags) -> torch.Tensor:
        """Embeddings [B, dim] of bags of one feature's IDs: each the pool of its IDs' embeddings
        (:func:`embbench.bags.embed_bags`)."""
        return embed_bags(self.features[feature], bags)

    def bags_of(self, owner: str) -> list[str]:
        """The bag features whose bags the IDs of ``owner`` name."""
        return [name for name, index in self.bags.items() if index.owner == owner]

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
