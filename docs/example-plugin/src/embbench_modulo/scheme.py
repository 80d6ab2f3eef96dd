"""``modulo``: the row of an ID is ID mod m (the simplest hash); m is solved from the size budget."""

from __future__ import annotations

import torch
from torch import nn

from embbench import FLOAT_BYTES, BudgetTooSmall, EmbeddingTable, FeatureSpec, Scheme, SchemePlan


class ModuloLookup(nn.Module):
    def __init__(self, rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.rows = rows
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(torch.remainder(ids, self.rows))


class ModuloEmbedding(Scheme):
    """Row = ID mod m, with m as large as the budget allows."""

    summary = "example plugin: row = ID mod m"
    unseen = "collided"

    def __init__(self, max_rows: int | None = None) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or unset, got {max_rows}")
        self.max_rows = max_rows
        self._params = {"max_rows": max_rows}

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        row_bytes = feature.dim * FLOAT_BYTES
        rows = budget_bytes // row_bytes
        if self.max_rows is not None:
            rows = min(rows, self.max_rows)
        if rows < 1:
            raise BudgetTooSmall("modulo", budget_bytes, row_bytes)
        return SchemePlan("modulo", {"rows": rows}, rows * row_bytes, budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        return ModuloLookup(plan.params["rows"], feature.dim, seed)
