"""``hash-embedding``: Hash Embeddings (Svenstrup et al., NeurIPS 2017) — k universal hashes pick k rows of a
shared pool of B rows; a k-vector of learned importance weights, itself stored in a hashed table of K rows,
weights their sum: e(x) = sum_j p_j(x) * pool[h_j(x)]. B and K are solved from the budget.
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

MAX_HASHES = 64
# Importance weights start near 1, so a fresh hash embedding is the plain sum of its k rows (as in Bloom
# embeddings) and the pool's gradients are not shrunk by small initial weights.
IMPORTANCE_INIT_MEAN = 1.0
IMPORTANCE_INIT_STD = 0.01


class HashEmbeddingLookup(TableBackedEmbedding):
    """e(x) = sum_j p_j(x) * pool[h_j(x)]: the pool is read once per hash (k reads of one row each), the
    importance table once; ``combine`` weights the k pooled rows by the k importance weights, so gradients
    reach the importance weights as they would through a weighted bag."""

    def __init__(self, num_hashes: int, pool_rows: int, importance_rows: int, dim: int, seed: int) -> None:
        super().__init__()
        self.num_hashes = num_hashes
        self.pool_hash = HashFamily(num_hashes, pool_rows, seed=seed)
        self.importance_hash = HashFamily(1, importance_rows, seed=seed + 1)
        # One read of the pool per hash: in one collection call the weights of a weighted read cannot come from
        # another read of the same call (the importance table), so combine() applies them.
        self.pool = EmbeddingTable(pool_rows, dim, seed=seed + 2, lookups=num_hashes)
        self.importance = EmbeddingTable(importance_rows, num_hashes, seed=seed + 3, init_std=IMPORTANCE_INIT_STD)
        with torch.no_grad():
            self.importance.weight.add_(IMPORTANCE_INIT_MEAN)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The importance row, then the k pool rows in hash order (the weights are positional)."""
        return torch.cat((self.importance_hash(ids), self.pool_hash(ids)), dim=1)

    def importance_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """The k importance weights of each ID, [N, k] (read outside the batched path, e.g. for inspection)."""
        return self.importance(self.importance_hash(ids)[:, 0])

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Hash j's pool row (k reads of the pool), then the ID's row of importance weights."""
        rows = self.pool_hash(ids)
        reads = [self.pool.lookup(rows[:, j]) for j in range(self.num_hashes)]
        return [*reads, self.importance.lookup(self.importance_hash(ids)[:, 0])]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        *rows, weights = pooled
        out = weights[:, 0:1] * rows[0]
        for j in range(1, self.num_hashes):
            out = out + weights[:, j : j + 1] * rows[j]
        return out


class HashEmbedding(Scheme):
    """Hash embedding: k hashes into a pool of B rows, weighted by k importance weights per ID from a hashed
    table of K rows; ``pool_share`` of the budget goes to the pool, the rest to the importance table."""

    summary = "hash embeddings (Svenstrup et al. 2017): k hashes into a shared pool, weighted by hashed importance"
    unseen = "collided"

    def __init__(self, num_hashes: int = 2, pool_share: float = 0.5) -> None:
        if not 1 <= num_hashes <= MAX_HASHES:
            raise ValueError(f"num_hashes must be in [1, {MAX_HASHES}], got {num_hashes}")
        if not 0.0 < pool_share < 1.0:
            raise ValueError(f"pool_share must be in (0, 1) (the pool's share of the budget), got {pool_share}")
        self.num_hashes, self.pool_share = num_hashes, pool_share

    def size_bytes(self, pool_rows: int, importance_rows: int, dim: int) -> int:
        # the pool, the importance table, and the seeds of the two hash families
        return (pool_rows * dim + importance_rows * self.num_hashes) * FLOAT_BYTES + 2 * ID_BYTES

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim, k = feature.dim, self.num_hashes
        minimum = self.size_bytes(1, 1, dim)
        if minimum > budget_bytes:
            detail = f"one pool row of {dim}, one row of {k} importance weights"
            raise BudgetTooSmall(self.name, budget_bytes, minimum, detail)
        tables_bytes = budget_bytes - 2 * ID_BYTES
        pool_rows = int(tables_bytes * self.pool_share) // (dim * FLOAT_BYTES)
        # Each table needs a row; the importance table takes whatever the pool leaves.
        pool_rows = min(MERSENNE_PRIME, max(1, min(pool_rows, (tables_bytes - k * FLOAT_BYTES) // (dim * FLOAT_BYTES))))
        importance_rows = min(MERSENNE_PRIME, (tables_bytes - pool_rows * dim * FLOAT_BYTES) // (k * FLOAT_BYTES))
        params = dict(self.get_params(), pool_rows=pool_rows, importance_rows=importance_rows)
        size = self.size_bytes(pool_rows, importance_rows, dim)
        return SchemePlan(self.name, params, size, budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return HashEmbeddingLookup(p["num_hashes"], p["pool_rows"], p["importance_rows"], feature.dim, seed)
