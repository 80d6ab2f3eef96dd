"""``compositional``: collision-free compositional embeddings from k complementary partitions (Shi et al.,
KDD 2020); k = 2 is the quotient-remainder trick."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embbench import (
    DEFAULT_INIT_STD,
    FLOAT_BYTES,
    ID_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    VocabularyIndex,
    largest_fitting,
)

OPERATIONS = ("add", "mult", "concat")
MAX_PARTITIONS = 16


def integer_root_ceil(value: int, degree: int) -> int:
    """The smallest integer r >= 1 with r ** degree >= value."""
    root = max(1, round(value ** (1.0 / degree)))
    while root**degree < value:
        root += 1
    while root > 1 and (root - 1) ** degree >= value:
        root -= 1
    return root


def balanced_sizes(num_indices: int, count: int) -> list[int]:
    """``count`` partition sizes, as equal as possible (larger ones first), whose product is >= num_indices."""
    if count == 0:
        return []
    root = integer_root_ceil(num_indices, count)
    sizes = [root] * count
    for position in reversed(range(count)):
        if root > 1 and math.prod(sizes) // root * (root - 1) >= num_indices:
            sizes[position] = root - 1
    return sizes


def partition_sizes(num_indices: int, num_partitions: int, first_size: int) -> list[int]:
    """The first (remainder) partition of ``first_size``, the others balanced over the quotient range."""
    quotient_range = -(-num_indices // first_size)
    return [first_size] + balanced_sizes(quotient_range, num_partitions - 1)


class CompositionalLookup(TableBackedEmbedding):
    """Dense index i -> mixed-radix digits (i mod m_1, (i // m_1) mod m_2, ...) -> one row per partition,
    combined by add, mult or concat."""

    def __init__(
        self, vocabulary: np.ndarray, sizes: list[int], dims: list[int], operation: str, seed: int
    ) -> None:
        super().__init__()
        self.index = VocabularyIndex(vocabulary)
        self.operation = operation
        # add and concat are linear in the rows (a bag pools its rows in the table kernel); mult is not
        self.combine_is_linear = operation != "mult"
        # Each partition's scale is chosen so that the combined embedding starts at DEFAULT_INIT_STD.
        count = len(sizes)
        init_std = {
            "add": DEFAULT_INIT_STD / math.sqrt(count),
            "mult": DEFAULT_INIT_STD ** (1.0 / count),
            "concat": DEFAULT_INIT_STD,
        }[operation]
        self.tables = nn.ModuleList(
            EmbeddingTable(size, dim, seed=seed + position, init_std=init_std)
            for position, (size, dim) in enumerate(zip(sizes, dims, strict=True))
        )
        strides = [math.prod(sizes[:position]) for position in range(count)]
        self.register_buffer("radix_strides", torch.tensor(strides, dtype=torch.int64), persistent=False)
        self.register_buffer("radix_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The k partition rows of each ID: the mixed-radix digits of its dense index, unique per index."""
        dense = self.index(ids).unsqueeze(1)
        return torch.div(dense, self.radix_strides, rounding_mode="floor") % self.radix_sizes

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        digits = self.index_tuples(ids)
        return [table.lookup(digits[:, position]) for position, table in enumerate(self.tables)]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = list(pooled)
        if self.operation == "concat":
            return torch.cat(parts, dim=1)
        if self.operation == "mult":
            return functools.reduce(torch.mul, parts)
        return functools.reduce(torch.add, parts)


class CompositionalEmbedding(Scheme):
    """Compositional embedding over k complementary (mixed-radix) partitions; partition sizes from the budget."""

    summary = "compositional / quotient-remainder (Shi et al. 2020): k small tables, a unique row tuple per ID"
    unseen = "dedicated"

    def __init__(
        self, num_partitions: int | None = None, operation: str = "mult", dims: list[int] | None = None
    ) -> None:
        if num_partitions is not None and (
            not isinstance(num_partitions, int) or not 1 <= num_partitions <= MAX_PARTITIONS
        ):
            raise ValueError(
                f"num_partitions must be an integer in [1, {MAX_PARTITIONS}] or unset (the fewest from 2 up that "
                f"fit the budget), got {num_partitions}"
            )
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}, got '{operation}'")
        if dims is not None:
            if operation != "concat":
                raise ValueError(f"dims (per-partition dims) applies to operation 'concat' only, got '{operation}'")
            count = num_partitions or len(dims)
            if len(dims) != count or not all(isinstance(d, int) and d >= 1 for d in dims):
                raise ValueError(
                    f"dims must be {count} integers >= 1 (one per partition) summing to the embedding dim, "
                    f"got {dims}"
                )
            num_partitions, dims = count, list(dims)
        self.num_partitions, self.operation, self.dims = num_partitions, operation, dims

    def partition_dims(self, dim: int, count: int) -> list[int]:
        """Each partition's row width: the embedding dim, or for concat ``dims`` (default: an equal split)."""
        if self.operation != "concat":
            return [dim] * count
        if self.dims is not None:
            if sum(self.dims) != dim:
                raise ValueError(f"dims must sum to the embedding dim {dim}, got {self.dims} (sum {sum(self.dims)})")
            return list(self.dims)
        if dim < count:
            raise ValueError(f"concat needs an embedding dim >= num_partitions ({count}), got dim {dim}")
        return [dim // count + (1 if position < dim % count else 0) for position in range(count)]

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        if self.num_partitions is not None:
            counts = [self.num_partitions]
        else:
            # The quotient-remainder trick (k = 2) where it fits; more, smaller partitions where it does not.
            widest = feature.dim if self.operation == "concat" else MAX_PARTITIONS
            counts = list(range(2, min(widest, MAX_PARTITIONS) + 1)) or [1]
        shortfalls = []
        for count in counts:
            try:
                return self.plan_partitions(feature, budget_bytes, count)
            except BudgetTooSmall as exc:
                shortfalls.append(exc)
        raise min(shortfalls, key=lambda exc: exc.minimum_bytes)

    def plan_partitions(self, feature: FeatureSpec, budget_bytes: int, count: int) -> SchemePlan:
        """The plan with ``count`` partitions: the first (remainder) table takes every row the budget allows."""
        num_indices = feature.num_ids + 1  # the training IDs and one index shared by unseen IDs
        dims = self.partition_dims(feature.dim, count)
        vocabulary_bytes = VocabularyIndex.size_bytes(feature.ids)

        def sizes_for(first_size: int) -> list[int]:
            return partition_sizes(num_indices, count, first_size)

        def size_of(first_size: int) -> int:
            rows_bytes = sum(size * dim * FLOAT_BYTES for size, dim in zip(sizes_for(first_size), dims, strict=True))
            return vocabulary_bytes + rows_bytes

        smallest_first = balanced_sizes(num_indices, count)[0]
        first_size = largest_fitting(size_of, smallest_first, num_indices, budget_bytes)
        if first_size is None:
            dictionary = "" if vocabulary_bytes == ID_BYTES else f", and {vocabulary_bytes:,} bytes of ID dictionary"
            raise BudgetTooSmall(
                self.name, budget_bytes, size_of(smallest_first),
                f"{count} partitions of {sizes_for(smallest_first)} rows for {num_indices:,} indices{dictionary}",
            )
        params = dict(
            self.get_params(),
            num_partitions=count,
            dims=self.dims,  # as validated: a list, or None
            partition_dims=dims,
            partition_sizes=sizes_for(first_size),
        )
        notes = {"vocabulary_bytes": vocabulary_bytes}
        return SchemePlan(self.name, params, size_of(first_size), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return CompositionalLookup(feature.ids, p["partition_sizes"], p["partition_dims"], p["operation"], seed)
