"""Where a collection's table rows live and how one batch of table reads is pooled, one class per kernel:
``nn.EmbeddingBag`` (sparse or dense gradients), fbgemm's table-batched kernel with the optimizer fused into
the backward pass, and a torchrec ``EmbeddingBagCollection`` for ``DistributedModelParallel`` to shard. A store
holds some of a :class:`embbench.collection.TableCollection`'s tables; each read of a table is a slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from embbench.tables import EmbeddingTable, Lookup

#: Adagrad's epsilon, the same for fused (fbgemm) and torch Adagrad so that they compute the same update
ADAGRAD_EPS = 1e-8


@dataclass(frozen=True)
class TableSpec:
    key: str
    feature: str
    table: EmbeddingTable
    slots: tuple[str, ...]  # the KeyedJaggedTensor keys of the table's reads, in read order


class TableStore(nn.Module):
    """Holds some of the collection's tables; pools the bags of their slots in one call."""

    kernel: str = ""

    def __init__(self, specs: Sequence[TableSpec]) -> None:
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


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


class PerTableState(TableStore):
    """A store whose rows live in its own buffers (stacked weights, a kernel's flat buffer): its state dict
    shows each table's rows under its own key, ``embedding_bags.<table>.weight``, as torchrec's collections
    do, whatever the layout behind them; it has no other state."""

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key in self.keys:
            weight = self.weight(key)
            destination[f"{prefix}embedding_bags.{key}.weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        known = set()
        for key in self.keys:
            name = f"{prefix}embedding_bags.{key}.weight"
            known.add(name)
            if name not in state_dict:
                missing_keys.append(name)
                continue
            with torch.no_grad():
                self.weight(key).copy_(state_dict[name])
        if strict:  # anything else under the store's prefix is unexpected
            unexpected_keys.extend(name for name in state_dict if name.startswith(prefix) and name not in known)


class TorchStore(PerTableState):
    """The tables in plain torch, one weight per row width: the tables of one width are stacked in one
    ``[rows, dim]`` parameter, and all their reads of a batch are one ``embedding_bag`` call, with row-sparse
    (``sparse``) or dense gradients. The state dict shows each table's rows under its own key."""

    def __init__(self, specs: Sequence[TableSpec], sparse: bool) -> None:
        super().__init__(specs)
        self.kernel = "sparse" if sparse else "dense"
        self.sparse = sparse
        widths: list[int] = []
        stacked: list[list[torch.Tensor]] = []
        self._rows: dict[str, tuple[int, int, int]] = {}  # table key -> (group, first row, rows)
        self._slot_start: list[int] = []  # each slot's first row in its group's weight
        self._group_slots: list[list[int]] = []  # the slots of each group, in store order
        slot = 0
        for spec in specs:
            if spec.table.dim not in widths:
                widths.append(spec.table.dim)
                stacked.append([])
                self._group_slots.append([])
            group = widths.index(spec.table.dim)
            start = sum(part.shape[0] for part in stacked[group])
            stacked[group].append(spec.table.weight.detach())
            self._rows[spec.key] = (group, start, spec.table.num_rows)
            for _ in spec.slots:
                self._slot_start.append(start)
                self._group_slots[group].append(slot)
                slot += 1
        for group, parts in enumerate(stacked):
            weight = parts[0] if len(parts) == 1 else torch.cat(parts)  # one table: taken over, no copy
            self.register_parameter(f"rows_{group}", nn.Parameter(weight))

    def _weight_of(self, group: int) -> nn.Parameter:
        return self._parameters[f"rows_{group}"]  # type: ignore[return-value]

    def pool(self, lookups: Sequence[Lookup | None], batch: int, device: torch.device) -> list[torch.Tensor]:
        pooled: list[Any] = [None] * len(lookups)
        for group, slots in enumerate(self._group_slots):
            weight = self._weight_of(group)
            mine = [lookups[slot] for slot in slots]
            if all(lookup is None for lookup in mine):
                for slot in slots:
                    pooled[slot] = torch.zeros(batch, weight.shape[1], device=device)
                continue
            if all(
                lookup is not None and lookup.lengths is None and lookup.indices.dim() == 1 and lookup.weights is None
                for lookup in mine
            ):  # one row per ID in every slot: a [slots * batch, 1] input, no offsets
                rows = [lookup.indices + self._slot_start[slot] if self._slot_start[slot] else lookup.indices
                        for slot, lookup in zip(slots, mine, strict=True)]
                values = torch.cat(rows) if len(rows) > 1 else rows[0]
                out = functional.embedding_bag(values.unsqueeze(1), weight, mode="sum", sparse=self.sparse)
            else:
                bags = []
                for slot, lookup in zip(slots, mine, strict=True):
                    if lookup is None:
                        bags.append((torch.empty(0, dtype=torch.int64, device=device),
                                     torch.zeros(batch, dtype=torch.int64, device=device), None))
                    else:
                        values, lengths, weights = lookup.bags()
                        bags.append((values + self._slot_start[slot], lengths, weights))
                weighted = any(bag[2] is not None for bag in bags)
                values = torch.cat([bag[0] for bag in bags])
                lengths = torch.cat([bag[1] for bag in bags])
                weights = torch.cat([
                    bag[2].float() if bag[2] is not None else torch.ones(bag[0].shape, device=device) for bag in bags
                ]) if weighted else None
                out = functional.embedding_bag(
                    values, weight, offsets_of(lengths)[:-1], mode="sum", per_sample_weights=weights,
                    sparse=self.sparse,
                )
            for slot, part in zip(slots, out.split(batch), strict=True):
                pooled[slot] = part
        return pooled

    def weight(self, key: str) -> torch.Tensor:
        parameter, rows = self.parameter_rows(key)
        return parameter[rows]

    def parameter_rows(self, key: str) -> tuple[nn.Parameter, slice]:
        """The stacked parameter that holds table ``key``, and the table's rows in it."""
        group, start, rows = self._rows[key]
        return self._weight_of(group), slice(start, start + rows)

    def table_parameters(self) -> list[nn.Parameter]:
        return [self._weight_of(group) for group in range(len(self._group_slots))]


class FusedStore(PerTableState):
    """fbgemm's table-batched kernel over all its tables, the optimizer fused into backward."""

    kernel = "fused"

    def __init__(self, specs: Sequence[TableSpec], optimizer: str, learning_rate: float, device: torch.device) -> None:
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
        self._tbe = [self._make_kernel()]  # a list: the kernel is not a submodule (see PerTableState)
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

    def __deepcopy__(self, memo: dict[int, Any]) -> FusedStore:
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

    def _apply(self, fn: Any, recurse: bool = True) -> FusedStore:
        return self  # the kernel is built on its device; it does not move

    def extra_repr(self) -> str:
        return f"tables={len(self.keys)}, optimizer={self.optimizer}, lr={self.learning_rate}"


class ShardableStore(TableStore):
    """A torchrec ``EmbeddingBagCollection`` of the tables, for DistributedModelParallel to shard."""

    kernel = "sharded"

    def __init__(self, specs: Sequence[TableSpec], device: torch.device) -> None:
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
