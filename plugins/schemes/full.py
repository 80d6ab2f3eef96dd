"""``full``: one dedicated row per ID of the vocabulary, plus one out-of-vocabulary row.

Where the feature declares a vocabulary larger than its training IDs (a generator's cardinality), the table
has a row for every ID of that vocabulary, as a deployed table would; only the training IDs are in its
dictionary, since no other ID's row is ever trained (an unseen ID reads the OOV row, which is as untrained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    lookup_sorted,
)


class FullLookup(TableBackedEmbedding):
    """Maps raw IDs through the sorted training vocabulary to rows; unknown IDs go to the last row."""

    combine_is_linear = True  # one row per ID: a bag pools its rows in the table kernel

    def __init__(self, vocabulary: torch.Tensor, dim: int, seed: int, rows: int | None = None) -> None:
        super().__init__()
        self.register_buffer("vocabulary", vocabulary.clone())
        rows = len(vocabulary) + 1 if rows is None else rows
        self.oov_row = rows - 1
        self.table = EmbeddingTable(rows, dim, seed=seed)
        self._find_run()

    def _find_run(self) -> None:
        """A vocabulary of consecutive IDs maps by subtraction, not by binary search (same rows, far faster)."""
        count = self.vocabulary.numel()
        first = int(self.vocabulary[0]) if count else 0
        self._run = (first, first + count - 1) if count and int(self.vocabulary[-1]) - first == count - 1 else None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._find_run()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self._run is not None:
            first, last = self._run
            clamped = ids.clamp(first, last)  # before subtracting, so that IDs near +-2^63 cannot overflow
            return torch.where(clamped == ids, clamped - first, self.oov_row)
        position, known = lookup_sorted(self.vocabulary, ids)
        return torch.where(known, position, self.oov_row)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).unsqueeze(1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        return [self.table.lookup(self.rows(ids))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0]


class FullEmbedding(Scheme):
    """Full embedding table: a dedicated row per training ID and a shared OOV row (the reference)."""

    summary = "full table: a row per training ID, one OOV row for unseen IDs (the reference)"
    unseen = "dedicated"
    fills_budget = False

    @staticmethod
    def size_bytes(num_ids: int, dim: int, vocabulary: int | None = None) -> int:
        """(vocabulary + 1) rows and a dictionary of the ``num_ids`` training IDs."""
        rows = (num_ids if vocabulary is None else vocabulary) + 1
        return rows * dim * FLOAT_BYTES + num_ids * ID_BYTES

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        size = self.size_bytes(feature.num_ids, feature.dim, feature.vocabulary)
        if size > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, size, "a full table cannot be compressed")
        return SchemePlan(self.name, {"rows": feature.vocabulary + 1}, size, budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        ids = torch.as_tensor(feature.ids, dtype=torch.int64)
        return FullLookup(ids, feature.dim, seed, rows=plan.params["rows"])
