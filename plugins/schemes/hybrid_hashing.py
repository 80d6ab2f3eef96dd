"""``hybrid-hashing``: frequency-based hybrid hashing (Zhang et al., RecSys 2020) — a dedicated row for each of
the most frequent training IDs, found through a sorted ID dictionary; double hashing for every other ID.

When the budget cannot hold the requested frequent set in ``max_frequent_share`` of itself, the set is cut to
the most frequent IDs that fit, so the double-hashing part always keeps the rest of the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from embbench_plugins.schemes.multi_hashing import (
    MultiHashLookup,
    check_combiner,
    check_rows,
    multi_hash_size_bytes,
    solve_rows,
    table_dims,
)
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

NUM_HASHES = 2


def most_frequent_ids(feature: FeatureSpec, count: int) -> np.ndarray:
    """The ``count`` most frequent training IDs (ties broken by the smaller ID), sorted by ID."""
    order = np.lexsort((feature.ids, -feature.counts))  # last key first: count descending, then ID
    return np.sort(feature.ids[order[:count]]).astype(np.int64)


def only_where(lookup: Lookup, mask: torch.Tensor) -> Lookup:
    """``lookup`` with the bags of the IDs outside ``mask`` (bool [N]) emptied: they pool a zero vector, and
    their rows get no gradient."""
    if lookup.lengths is not None:
        keep = torch.repeat_interleave(mask, lookup.lengths)
        lengths = torch.where(mask, lookup.lengths, torch.zeros_like(lookup.lengths))
        weights = None if lookup.weights is None else lookup.weights[keep]
        return Lookup(lookup.table, lookup.indices[keep], lengths, weights)
    per_id = 1 if lookup.indices.dim() == 1 else lookup.indices.shape[1]
    lengths = mask.to(torch.int64) * per_id
    weights = None if lookup.weights is None else lookup.weights[mask].reshape(-1)
    return Lookup(lookup.table, lookup.indices[mask].reshape(-1), lengths, weights)


class HybridLookup(TableBackedEmbedding):
    """Frequent IDs -> their dedicated row; every other ID -> the double-hashing tables."""

    combine_is_linear = True  # the hashed rows' linear combine plus the dedicated row: a bag pools in the kernel

    def __init__(self, frequent_ids: torch.Tensor, rows: int, dim: int, combiner: str, seed: int) -> None:
        super().__init__()
        self.register_buffer("frequent_ids", frequent_ids.clone())
        self.hashed = MultiHashLookup(NUM_HASHES, rows, dim, combiner, shared=False, seed=seed)
        # The dedicated table exists only when some ID is frequent (a table needs a row).
        num_frequent = len(frequent_ids)
        self.dedicated = EmbeddingTable(num_frequent, dim, seed=seed + 1 + NUM_HASHES) if num_frequent else None

    def dedicated_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ID's position in the frequent dictionary (clamped into range) and whether it is there."""
        return lookup_sorted(self.frequent_ids, ids)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The two hashed rows, or (-1 - dedicated row, -1) for a frequent ID: a tuple no hashed ID has."""
        tuples = self.hashed.index_tuples(ids)
        if self.dedicated is None:
            return tuples
        position, frequent = self.dedicated_rows(ids)
        dedicated = torch.stack((-1 - position, torch.full_like(position, -1)), dim=1)
        return torch.where(frequent.unsqueeze(1), dedicated, tuples)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """The hashed tables' reads for the IDs that are not frequent, then the dedicated table's read for
        those that are: each ID reads (and trains) only the branch it takes."""
        hashed = self.hashed.lookups(ids)
        if self.dedicated is None:
            return list(hashed)
        position, frequent = self.dedicated_rows(ids)
        rest = [only_where(lookup, ~frequent) for lookup in hashed]
        return [*rest, self.dedicated.lookup(position[frequent], lengths=frequent.to(torch.int64))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.dedicated is None:
            return self.hashed.combine(ids, pooled)
        # Every ID pooled rows in one branch only; the other branch is a zero vector.
        return self.hashed.combine(ids, pooled[:-1]) + pooled[-1]


class HybridHashing(Scheme):
    """Hybrid hashing: dedicated rows for the top ``frequent_fraction`` of training IDs by count, double
    hashing (two tables of m rows) for the rest; m solved from the budget."""

    summary = "hybrid hashing (Zhang et al. 2020): dedicated rows for frequent IDs, double hashing for the rest"
    unseen = "collided"

    def __init__(
        self,
        frequent_fraction: float = 0.1,
        max_frequent_share: float = 0.5,
        rows: int | None = None,
        combiner: str = "sum",
    ) -> None:
        if not 0.0 <= frequent_fraction <= 1.0:
            raise ValueError(f"frequent_fraction must be in [0, 1], got {frequent_fraction}")
        if not 0.0 <= max_frequent_share < 1.0:
            raise ValueError(
                "max_frequent_share must be in [0, 1) (the share of the budget frequent IDs may take), "
                f"got {max_frequent_share}"
            )
        check_rows(rows)
        check_combiner(combiner)
        self.frequent_fraction, self.max_frequent_share = frequent_fraction, max_frequent_share
        self.rows, self.combiner = rows, combiner

    @staticmethod
    def frequent_bytes(num_frequent: int, dim: int) -> int:
        return num_frequent * (dim * FLOAT_BYTES + ID_BYTES)  # a dedicated row and a dictionary entry each

    def size_bytes(self, num_frequent: int, rows: int, dim: int) -> int:
        dims = table_dims(dim, NUM_HASHES, self.combiner, shared=False)
        return self.frequent_bytes(num_frequent, dim) + multi_hash_size_bytes(rows, dims)

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim = feature.dim
        dims = table_dims(dim, NUM_HASHES, self.combiner, shared=False)
        hashed_minimum = multi_hash_size_bytes(self.rows or 1, dims)
        if hashed_minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, hashed_minimum, "no frequent IDs, two hashed tables")
        per_frequent_id = self.frequent_bytes(1, dim)
        requested = int(self.frequent_fraction * feature.num_ids)
        within_share = int(self.max_frequent_share * budget_bytes) // per_frequent_id
        beside_hashed = (budget_bytes - hashed_minimum) // per_frequent_id
        num_frequent = min(requested, within_share, beside_hashed)
        rows = solve_rows(self.name, self.rows, dims, budget_bytes - self.frequent_bytes(num_frequent, dim), "")
        params = dict(self.get_params(), rows=rows, frequent_ids=num_frequent)
        notes = {"frequent_ids_requested": requested}
        return SchemePlan(self.name, params, self.size_bytes(num_frequent, rows, dim), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        frequent = torch.as_tensor(most_frequent_ids(feature, p["frequent_ids"]))
        return HybridLookup(frequent, p["rows"], feature.dim, p["combiner"], seed)
