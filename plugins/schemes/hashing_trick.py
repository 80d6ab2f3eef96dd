"""``hashing-trick``: one universal hash of the raw ID into m shared rows (Weinberger et al., 2009)."""

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


class HashedLookup(TableBackedEmbedding):
    combine_is_linear = True  # one row per ID: a bag pools its rows in the table kernel

    def __init__(self, num_rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.hash = HashFamily(1, num_rows, seed=seed)
        self.table = EmbeddingTable(num_rows, dim, seed=seed + 1)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hash(ids)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        return [self.table.lookup(self.hash(ids)[:, 0])]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0]


class HashingTrick(Scheme):
    """Hashing trick: h(x) = ((a x + b) mod p) mod m into a table of m rows; m solved from the budget."""

    summary = "hashing trick: one universal hash into m shared rows, m solved from the budget"
    unseen = "collided"

    def __init__(self, rows: int | None = None) -> None:
        if rows is not None and not 1 <= rows <= MERSENNE_PRIME:
            raise ValueError(f"rows must be in [1, {MERSENNE_PRIME}] or unset (solved from the budget), got {rows}")
        self.rows = rows

    @staticmethod
    def size_bytes(rows: int, dim: int) -> int:
        return rows * dim * FLOAT_BYTES + ID_BYTES  # the table and the hash seed

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        minimum = self.size_bytes(1 if self.rows is None else self.rows, feature.dim)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum)
        rows = self.rows or min(MERSENNE_PRIME, (budget_bytes - ID_BYTES) // (feature.dim * FLOAT_BYTES))
        return SchemePlan(self.name, {"rows": rows}, self.size_bytes(rows, feature.dim), budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        return HashedLookup(plan.params["rows"], feature.dim, seed)
