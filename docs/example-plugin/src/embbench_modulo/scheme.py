"""``modulo``: the row of an ID is ID mod m (the simplest hash); m is solved from the size budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
)


class ModuloLookup(TableBackedEmbedding):
    """One table of ``rows`` rows; ID x reads row x mod rows (non-negative for negative IDs too)."""

    def __init__(self, rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def row_of(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids, self.rows)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        # One read of one table: in a model, the collection reads it with every other table of the batch.
        return [self.table.lookup(self.row_of(ids))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0]  # the row is the embedding

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """Optional: the row alone determines the embedding (collision statistics, ``embbench size``)."""
        return self.row_of(ids).unsqueeze(1)


class ModuloEmbedding(Scheme):
    """Row = ID mod m, with m as large as the budget allows (at most ``max_rows``)."""

    summary = "example plugin: row = ID mod m"
    unseen = "collided"

    def __init__(self, max_rows: int | None = None) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or unset, got {max_rows}")
        self.max_rows = max_rows

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        row_bytes = feature.dim * FLOAT_BYTES
        rows = budget_bytes // row_bytes
        if self.max_rows is not None:
            rows = min(rows, self.max_rows)
        if rows < 1:
            raise BudgetTooSmall(self.name, budget_bytes, row_bytes, "one row")
        return SchemePlan(self.name, {"rows": rows}, rows * row_bytes, budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        return ModuloLookup(plan.params["rows"], feature.dim, seed)
