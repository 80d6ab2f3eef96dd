"""``hash-embedding``: Hash Embeddings (Svenstrup et al., NeurIPS 2017) — k universal hashes pick k rows of a
shared pool of B rows, weighted by k learned importance weights: e(x) = sum_j p_j(x) * pool[h_j(x)].

The weights come from a table of K rows of k (``importance="row"``, the paper's: one hash picks the ID's row)
or from one flat array of W weights, each of the k drawn by its own hash (``"flat"``, the CCE authors'
reference implementation). B and K (or W) are solved from the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

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
    TableInit,
)

MAX_HASHES = 64
IMPORTANCE_KINDS = ("row", "flat")
INITS = ("normal", "uniform")
# Row variant: weights start near 1, so a fresh hash embedding is the plain sum of its k rows (as in Bloom
# embeddings) and the pool's gradients are not shrunk by small initial weights.
IMPORTANCE_INIT_MEAN = 1.0
IMPORTANCE_INIT_STD = 0.01
# Flat variant: U(-1, 1), as the reference implementation starts its weights.
FLAT_IMPORTANCE_INIT = TableInit("uniform", scale=1.0)  # on a table of width 1: U(±1)
#: how the importance weights start: "one" (1 + N(0, 0.01^2): a fresh hash embedding is the sum of its k rows) or
#: "uniform" (U(±1), the CCE authors' library). Under GMF, U(±1) weights train to chance: ML-100K rating
#: classification at 1/8, 4 epochs, flat variant: val AUC 0.50 (uniform) vs 0.745 (one); docs/schemes.md.
IMPORTANCE_INITS = ("one", "uniform")


class HashEmbeddingLookup(TableBackedEmbedding):
    """e(x) = sum_j p_j(x) * pool[h_j(x)]: the pool is read once per hash (k reads of one row each), the
    importance weights once (row: the ID's row of k) or once per hash (flat: one weight each); ``combine``
    weights the k pooled rows, so gradients reach the importance weights as they would through a weighted bag."""

    def __init__(
        self, num_hashes: int, pool_rows: int, importance_rows: int, dim: int, seed: int, importance: str,
        init: TableInit, importance_init: str = "one",
    ) -> None:
        super().__init__()
        self.num_hashes, self.importance_kind = num_hashes, importance
        self.pool_hash = HashFamily(num_hashes, pool_rows, seed=seed)
        # One read of the pool per hash: in one collection call the weights of a weighted read cannot come from
        # another read of the same call (the importance table), so combine() applies them.
        self.pool = EmbeddingTable(pool_rows, dim, seed=seed + 2, lookups=num_hashes, init=init)
        weights = (
            TableInit("normal", IMPORTANCE_INIT_STD) if importance_init == "one" else FLAT_IMPORTANCE_INIT
        )
        if importance == "row":
            self.importance_hash = HashFamily(1, importance_rows, seed=seed + 1)
            self.importance = EmbeddingTable(importance_rows, num_hashes, seed=seed + 3, init=weights, auxiliary=True)
        else:
            self.importance_hash = HashFamily(num_hashes, importance_rows, seed=seed + 1)
            self.importance = EmbeddingTable(
                importance_rows, 1, seed=seed + 3, lookups=num_hashes, init=weights, auxiliary=True
            )
        if importance_init == "one":
            with torch.no_grad():
                self.importance.weight.add_(IMPORTANCE_INIT_MEAN)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The importance row(s), then the k pool rows in hash order (the weights are positional)."""
        return torch.cat((self.importance_hash(ids), self.pool_hash(ids)), dim=1)

    def importance_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """The k importance weights of each ID, [N, k] (read outside the batched path, e.g. for inspection)."""
        if self.importance_kind == "row":
            return self.importance(self.importance_hash(ids)[:, 0])
        return self.importance.weight[self.importance_hash(ids), 0]

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Hash j's pool row (k reads of the pool), then the ID's row of k importance weights (row) or hash
        j's weight (flat: k reads of the weight array)."""
        rows = self.pool_hash(ids)
        reads = [self.pool.lookup(rows[:, j]) for j in range(self.num_hashes)]
        weights = self.importance_hash(ids)
        if self.importance_kind == "row":
            return [*reads, self.importance.lookup(weights[:, 0])]
        return [*reads, *(self.importance.lookup(weights[:, j]) for j in range(self.num_hashes))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = torch.stack(pooled[: self.num_hashes], dim=1)  # [N, k, d]
        weights = pooled[self.num_hashes] if self.importance_kind == "row" else torch.cat(pooled[self.num_hashes :], 1)
        return torch.einsum("nk,nkd->nd", weights, rows)


class HashEmbedding(Scheme):
    """Hash embedding: k hashes into a pool of B rows, weighted by k importance weights per ID (a hashed row of
    a K x k table, or k hashed entries of a flat array of W); ``pool_share`` of the budget goes to the pool,
    the rest to the importance weights."""

    summary = "hash embeddings (Svenstrup et al. 2017): k hashes into a shared pool, weighted by hashed importance"
    unseen = "collided"

    def __init__(
        self,
        num_hashes: int = 2,
        pool_share: float = 0.5,
        importance: Literal["row", "flat"] = "row",
        init: Literal["normal", "uniform"] = "uniform",
        init_std: float = 0.01,
        importance_init: Literal["one", "uniform"] = "one",
    ) -> None:
        if importance_init not in IMPORTANCE_INITS:
            raise ValueError(f"importance_init must be one of {', '.join(IMPORTANCE_INITS)}, got {importance_init!r}")
        self.importance_init = importance_init
        if not 1 <= num_hashes <= MAX_HASHES:
            raise ValueError(f"num_hashes must be in [1, {MAX_HASHES}], got {num_hashes}")
        if not 0.0 < pool_share < 1.0:
            raise ValueError(f"pool_share must be in (0, 1) (the pool's share of the budget), got {pool_share}")
        if importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {importance!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if not 0.0 <= init_std <= 10.0:
            raise ValueError(f"init_std must be in [0, 10], got {init_std}")
        self.num_hashes, self.pool_share, self.importance, self.init, self.init_std = (
            num_hashes, pool_share, importance, init, init_std,
        )

    @property
    def weights_per_row(self) -> int:
        """Weights in one row of the importance table: k (row), 1 (flat)."""
        return self.num_hashes if self.importance == "row" else 1

    def size_bytes(self, pool_rows: int, importance_rows: int, dim: int) -> int:
        # the pool, the importance weights, and the seeds of the two hash families
        return (pool_rows * dim + importance_rows * self.weights_per_row) * FLOAT_BYTES + 2 * ID_BYTES

    def pool_init(self) -> TableInit:
        """``uniform``: U(±dim^-½), the pool being d wide (the reference's); ``normal``: N(0, init_std²)."""
        return TableInit("uniform") if self.init == "uniform" else TableInit("normal", std=self.init_std)

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim, width = feature.dim, self.weights_per_row
        minimum = self.size_bytes(1, 1, dim)
        if minimum > budget_bytes:
            detail = f"one pool row of {dim}, one row of {width} importance weights"
            raise BudgetTooSmall(self.name, budget_bytes, minimum, detail)
        tables_bytes = budget_bytes - 2 * ID_BYTES
        pool_rows = int(tables_bytes * self.pool_share) // (dim * FLOAT_BYTES)
        # Each table needs a row; the importance weights take whatever the pool leaves.
        largest_pool = (tables_bytes - width * FLOAT_BYTES) // (dim * FLOAT_BYTES)
        pool_rows = min(MERSENNE_PRIME, max(1, min(pool_rows, largest_pool)))
        importance_rows = min(MERSENNE_PRIME, (tables_bytes - pool_rows * dim * FLOAT_BYTES) // (width * FLOAT_BYTES))
        params = dict(self.get_params(), pool_rows=pool_rows, importance_rows=importance_rows)
        size = self.size_bytes(pool_rows, importance_rows, dim)
        one = f"1 + normal(0, {IMPORTANCE_INIT_STD:g}^2)"
        importance_init = one if self.importance_init == "one" else "uniform(±1)"
        notes = {"init": self.pool_init().describe(), "importance_init": importance_init}
        return SchemePlan(self.name, params, size, budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return HashEmbeddingLookup(
            p["num_hashes"], p["pool_rows"], p["importance_rows"], feature.dim, seed, p["importance"], self.pool_init(),
            p.get("importance_init", self.importance_init),
        )
