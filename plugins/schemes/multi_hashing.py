"""``multi-hashing`` and ``double-hashing``: k universal hashes of the raw ID, each into its own table of m rows
(or one shared table), the k rows combined by sum, mean or concatenation; m solved from the budget.

``double-hashing`` is the k = 2 case, the "double hashing" of Zhang et al. (RecSys 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    MERSENNE_PRIME,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    HashFamily,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
)

COMBINERS = ("sum", "mean", "concat")
MAX_HASHES = 64


def table_dims(dim: int, num_hashes: int, combiner: str, shared: bool) -> list[int]:
    """The width of each table: one table of ``dim`` when shared; with concat, ``dim`` split as evenly as
    possible across the k tables (the first ``dim % k`` get one more column); else k tables of ``dim``."""
    if shared:
        return [dim]
    if combiner == "concat":
        if num_hashes > dim:
            raise ValueError(
                f"num_hashes must be in [1, dim={dim}] with combiner='concat' (it splits dim across the tables), "
                f"got {num_hashes}"
            )
        return [dim // num_hashes + (j < dim % num_hashes) for j in range(num_hashes)]
    return [dim] * num_hashes


def multi_hash_size_bytes(rows: int, dims: list[int]) -> int:
    return rows * sum(dims) * FLOAT_BYTES + ID_BYTES  # the tables and the one hash seed


class MultiHashLookup(TableBackedEmbedding):
    """k hashes of each ID into ``rows`` buckets; hash j picks a row of table j (or of the one shared table)."""

    combine_is_linear = True  # a sum, mean or concatenation of rows: a bag pools its rows in the table kernel

    def __init__(self, num_hashes: int, rows: int, dim: int, combiner: str, shared: bool, seed: int) -> None:
        super().__init__()
        self.num_hashes, self.combiner, self.shared = num_hashes, combiner, shared
        self.hash = HashFamily(num_hashes, rows, seed=seed)
        # Table j's seed is seed + 1 + j, so k = 1 reproduces the hashing trick's module for the same seed.
        self.tables = nn.ModuleList(
            EmbeddingTable(rows, width, seed=seed + 1 + j)
            for j, width in enumerate(table_dims(dim, num_hashes, combiner, shared))
        )

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.hash(ids)
        # A shared table sums or averages its k rows, so their order does not matter: sort it away.
        return torch.sort(rows, dim=1).values if self.shared else rows

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Shared: one read of the k rows of each ID, summed; else one read of each table (row j of hash j)."""
        rows = self.hash(ids)
        if self.shared:
            return [self.tables[0].lookup(rows)]
        return [table.lookup(rows[:, j]) for j, table in enumerate(self.tables)]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.shared:
            summed = pooled[0]
            return summed / self.num_hashes if self.combiner == "mean" else summed
        if self.combiner == "concat":
            return torch.cat(list(pooled), dim=1)
        summed = torch.stack(list(pooled)).sum(dim=0)
        return summed / self.num_hashes if self.combiner == "mean" else summed


def solve_rows(scheme_name: str, fixed_rows: int | None, dims: list[int], budget_bytes: int, detail: str) -> int:
    """Rows per table: ``fixed_rows`` if it fits, else the most that fit ``budget_bytes``."""
    minimum = multi_hash_size_bytes(fixed_rows or 1, dims)
    if minimum > budget_bytes:
        raise BudgetTooSmall(scheme_name, budget_bytes, minimum, detail)
    if fixed_rows is not None:
        return fixed_rows
    return min(MERSENNE_PRIME, (budget_bytes - ID_BYTES) // (sum(dims) * FLOAT_BYTES))


def check_rows(rows: int | None) -> None:
    if rows is not None and not 1 <= rows <= MERSENNE_PRIME:
        raise ValueError(f"rows must be in [1, {MERSENNE_PRIME}] or unset (solved from the budget), got {rows}")


def check_combiner(combiner: str) -> None:
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {', '.join(COMBINERS)}, got '{combiner}'")


class MultiHashing(Scheme):
    """k universal hashes into k tables (or one shared table) of m rows each, combined; m from the budget."""

    summary = "multi-hashing: k universal hashes into k tables (or one shared), summed; rows solved from the budget"
    unseen = "collided"

    def __init__(
        self, num_hashes: int = 2, rows: int | None = None, combiner: str = "sum", shared: bool = False
    ) -> None:
        if not 1 <= num_hashes <= MAX_HASHES:
            raise ValueError(f"num_hashes must be in [1, {MAX_HASHES}], got {num_hashes}")
        check_rows(rows)
        check_combiner(combiner)
        if shared and combiner == "concat":
            raise ValueError("combiner must be 'sum' or 'mean' with shared=True ('concat' needs one table per hash)")
        self.num_hashes, self.rows, self.combiner, self.shared = num_hashes, rows, combiner, shared

    def size_bytes(self, rows: int, dim: int) -> int:
        return multi_hash_size_bytes(rows, table_dims(dim, self.num_hashes, self.combiner, self.shared))

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dims = table_dims(feature.dim, self.num_hashes, self.combiner, self.shared)
        detail = f"{len(dims)} table(s) of width {', '.join(map(str, sorted(set(dims))))}"
        rows = solve_rows(self.name, self.rows, dims, budget_bytes, detail)
        params = {"num_hashes": self.num_hashes, "rows": rows, "combiner": self.combiner, "shared": self.shared}
        return SchemePlan(self.name, params, multi_hash_size_bytes(rows, dims), budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return MultiHashLookup(p["num_hashes"], p["rows"], feature.dim, p["combiner"], p["shared"], seed)


class DoubleHashing(MultiHashing):
    """Double hashing (Zhang et al., RecSys 2020): two universal hashes into two tables of m rows, summed."""

    summary = "double hashing (Zhang et al. 2020): two hashes into two tables, summed; rows solved from the budget"

    def __init__(self, rows: int | None = None, combiner: str = "sum") -> None:
        super().__init__(num_hashes=2, rows=rows, combiner=combiner, shared=False)
