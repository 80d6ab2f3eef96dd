"""``low-rank``: a factorised table E = A·B — A has R rows of width r (a table, trained like every table), B is a
dense r × d projection; each training ID gets its own row of A through the ID dictionary where the budget holds
one at rank >= ``min_rank``, else IDs are hashed into the rows the budget holds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    MERSENNE_PRIME,
    BudgetTooSmall,
    ConfigError,
    EmbeddingTable,
    FeatureSpec,
    HashFamily,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    VocabularyIndex,
    largest_fitting,
)

#: the largest rank accepted (a rank above the embedding dim is refused at plan time anyway)
MAX_RANK = 1 << 12
MAPPINGS = ("dictionary", "hash")


class LowRankLookup(TableBackedEmbedding):
    """x -> row i(x) of A (its rank in the training vocabulary, unseen IDs the last row; or a hash of x) ->
    A[i(x)] @ B."""

    def __init__(self, rows: int, rank: int, dim: int, seed: int, vocabulary: np.ndarray | None = None) -> None:
        super().__init__()
        self.mapping = "hash" if vocabulary is None else "dictionary"
        if vocabulary is None:
            self.hash = HashFamily(1, rows, seed=seed)
        else:
            if rows != len(vocabulary) + 1:
                raise ValueError(f"a dictionary of {len(vocabulary)} IDs needs {len(vocabulary) + 1} rows, got {rows}")
            self.vocabulary = VocabularyIndex(vocabulary)
        self.rank, self.dim = rank, dim
        # A starts N(0, 0.01^2) like every table and B N(0, 1/r), so that an embedding value (a sum of r
        # products) starts at std 0.01, as a full table's.
        self.factors = EmbeddingTable(rows, rank, seed=seed + 1)
        generator = torch.Generator().manual_seed(int(seed) + 2)
        self.projection = nn.Parameter(torch.randn(rank, dim, generator=generator) / rank**0.5)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the row of A each ID reads."""
        if self.mapping == "hash":
            return self.hash(ids)[:, 0]
        return self.vocabulary(ids)  # rank 0..n-1, n (the out-of-vocabulary row) for an unseen ID

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).unsqueeze(1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        return [self.factors.lookup(self.rows(ids))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0] @ self.projection

    def extra_repr(self) -> str:
        return f"rows={self.factors.num_rows}, rank={self.rank}, dim={self.dim}, mapping={self.mapping}"


class LowRank(Scheme):
    """Low-rank factorisation E = A·B of rank r: a row of A per training ID (and one for unseen IDs) through
    the ID dictionary at the largest rank that fits, down to ``min_rank``; below, hashed rows of rank
    ``min_rank``. ``rank`` and ``rows`` (hashed rows) may be fixed."""

    summary = "low-rank table E = A·B: rows of width r (per ID, else hashed) times an r x d projection"
    unseen = "collided"

    def __init__(self, rank: int | None = None, rows: int | None = None, min_rank: int = 2) -> None:
        if rank is not None and not 1 <= rank <= MAX_RANK:
            raise ValueError(f"rank must be in [1, {MAX_RANK}] or unset (solved from the budget), got {rank}")
        if rows is not None and not 1 <= rows <= MERSENNE_PRIME:
            raise ValueError(
                f"rows must be in [1, {MERSENNE_PRIME}] (hashed rows) or unset (solved from the budget), got {rows}"
            )
        if not 1 <= min_rank <= MAX_RANK:
            raise ValueError(
                f"min_rank must be in [1, {MAX_RANK}] (the lowest rank a per-ID row may have), got {min_rank}"
            )
        self.rank, self.rows, self.min_rank = rank, rows, min_rank

    @staticmethod
    def dictionary_size_bytes(feature: FeatureSpec, rank: int) -> int:
        """A row of width r per training ID and one for unseen IDs, B, and the ID dictionary."""
        rows = feature.num_ids + 1
        return (rows + feature.dim) * rank * FLOAT_BYTES + VocabularyIndex.size_bytes(feature.ids)

    @staticmethod
    def hashed_size_bytes(rows: int, rank: int, dim: int) -> int:
        """R rows of width r, B, and the hash seed."""
        return (rows + dim) * rank * FLOAT_BYTES + ID_BYTES

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim = feature.dim
        if self.rank is not None and self.rank > dim:
            raise ConfigError(f"scheme '{self.name}': rank {self.rank} exceeds the embedding dim {dim}")
        lowest = min(self.min_rank, dim)
        if self.rows is None:
            def dictionary_size(rank: int) -> int:
                return self.dictionary_size_bytes(feature, rank)

            if self.rank is not None:
                rank = self.rank if dictionary_size(self.rank) <= budget_bytes else None
            else:
                rank = largest_fitting(dictionary_size, lowest, dim, budget_bytes)
            if rank is not None:
                params = dict(self.get_params(), rank=rank, rows=feature.num_ids + 1, mapping="dictionary")
                return SchemePlan(
                    self.name, params, dictionary_size(rank), budget_bytes, unseen="dedicated",
                    notes={"why": f"a row per training ID fits at rank {rank} (>= min_rank {lowest})"},
                )
        if self.rows is None:
            rank = self.rank or lowest
            minimum = self.hashed_size_bytes(1, rank, dim)
            if minimum > budget_bytes:
                raise BudgetTooSmall(self.name, budget_bytes, minimum, f"one hashed row of rank {rank} and B")
            rows = min(MERSENNE_PRIME, (budget_bytes - ID_BYTES) // (rank * FLOAT_BYTES) - dim)
            notes = {"why": f"a row per training ID does not fit at rank {rank}: {rows:,} hashed rows"}
        else:
            rows = self.rows
            minimum = self.hashed_size_bytes(rows, self.rank or 1, dim)
            if minimum > budget_bytes:
                raise BudgetTooSmall(self.name, budget_bytes, minimum, f"{rows:,} hashed rows of rank {self.rank or 1}")
            rank = self.rank or largest_fitting(lambda r: self.hashed_size_bytes(rows, r, dim), 1, dim, budget_bytes)
            notes = {"why": f"{rows:,} hashed rows given"}
        params = dict(self.get_params(), rank=rank, rows=rows, mapping="hash")
        size = self.hashed_size_bytes(rows, rank, dim)
        return SchemePlan(self.name, params, size, budget_bytes, notes, unseen="collided")

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        vocabulary = np.asarray(feature.ids, dtype=np.int64) if p["mapping"] == "dictionary" else None
        return LowRankLookup(p["rows"], p["rank"], feature.dim, seed, vocabulary)
