"""``full``: one dedicated row per ID of the vocabulary, plus one out-of-vocabulary row.

Where the feature declares a vocabulary larger than its training IDs (a generator's cardinality), the table
has a row for every ID of that vocabulary, as a deployed table would; only the training IDs are in its
dictionary, since no other ID's row is ever trained (an unseen ID reads the OOV row, which is as untrained).
"""

from __future__ import annotations

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Scheme,
    SchemePlan,
    lookup_sorted,
)


class FullLookup(nn.Module):
    """Maps raw IDs through the sorted training vocabulary to rows; unknown IDs go to the last row."""

    def __init__(self, vocabulary: torch.Tensor, dim: int, seed: int, rows: int | None = None) -> None:
        super().__init__()
        self.register_buffer("vocabulary", vocabulary.clone())
        rows = len(vocabulary) + 1 if rows is None else rows
        self.oov_row = rows - 1
        self.table = EmbeddingTable(rows, dim, seed=seed)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        position, known = lookup_sorted(self.vocabulary, ids)
        return torch.where(known, position, torch.full_like(position, self.oov_row))

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).unsqueeze(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.rows(ids))


class FullEmbedding(Scheme):
    """Full embedding table: a dedicated row per training ID and a shared OOV row (the reference)."""

    summary = "full table: a row per training ID, one OOV row for unseen IDs (the reference)"
    unseen = "dedicated"
    fills_budget = False

    def __init__(self) -> None:
        self._params = {}

    @staticmethod
    def size_bytes(num_ids: int, dim: int, vocabulary: int | None = None) -> int:
        """(vocabulary + 1) rows and a dictionary of the ``num_ids`` training IDs."""
        rows = (num_ids if vocabulary is None else vocabulary) + 1
        return rows * dim * FLOAT_BYTES + num_ids * ID_BYTES

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        size = self.size_bytes(feature.num_ids, feature.dim, feature.vocabulary)
        if size > budget_bytes:
            raise BudgetTooSmall("full", budget_bytes, size, "a full table cannot be compressed")
        return SchemePlan("full", {"rows": feature.vocabulary + 1}, size, budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        ids = torch.as_tensor(feature.ids, dtype=torch.int64)
        return FullLookup(ids, feature.dim, seed, rows=plan.params["rows"])
