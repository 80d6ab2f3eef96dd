"""``cce``: Clustered Compositional Embeddings (Tsang & Ahle, NeurIPS 2023) — c columns, each the sum of a
row picked by a learned cluster assignment and a row picked by a hash; between epochs each column's
assignment is re-learned by k-means on the current embeddings, its clustered table reset to the centroids.

Unlike the paper, which keeps one assignment entry per ID, the assignment here is indexed by a hashed slot
of the ID (S slots, solved from the budget with the table rows k), so that it fits any budget and unseen IDs
get the learned assignment of their slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    HashFamily,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    largest_fitting,
)

MAX_ROWS = 1 << 24
INT16_MAX = 2**15 - 1
#: slots per training ID at most: more would only thin the collisions of an already sparse slot space
MAX_SLOTS_PER_ID = 4
#: distance entries (points x centroids) computed at once in k-means, bounding its memory
_CHUNK_DISTANCES = 1 << 24


def effective_columns(num_columns: int, dim: int) -> int:
    """The largest divisor of ``dim`` not above ``num_columns``: columns split the dim evenly."""
    return max(c for c in range(1, min(num_columns, dim) + 1) if dim % c == 0)


def assignment_bytes(rows: int) -> int:
    return 2 if rows <= INT16_MAX + 1 else 4  # cluster indices 0..rows-1 as int16 where they fit


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """int64 [P]: the index of each point's nearest centroid (squared Euclidean), in chunks of points."""
    chunk = max(1, _CHUNK_DISTANCES // len(centroids))
    squared_norms = centroids.pow(2).sum(1)
    labels = [
        (squared_norms - 2 * part @ centroids.T).argmin(1) for part in points.split(chunk)
    ]
    return torch.cat(labels)


def kmeans(points: torch.Tensor, num_clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Centroids [k, dim] by Lloyd's algorithm from k random points; an empty cluster keeps its centroid."""
    start = torch.randint(0, len(points), (num_clusters,), generator=generator)
    centroids = points[start].clone()
    for _ in range(iterations):
        labels = nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=num_clusters).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


class CCELookup(TableBackedEmbedding):
    """ID -> slot s = h(x) mod S; column j's part = clustered[assignment[s, j]] + hashed[g_j(s)]; parts concatenated."""

    def __init__(
        self,
        num_slots: int,
        rows: int,
        columns: int,
        dim: int,
        max_clusterings: int,
        kmeans_iterations: int,
        kmeans_points: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.num_slots, self.rows, self.columns, self.dim = num_slots, rows, columns, dim
        self.chunk = dim // columns
        self.max_clusterings, self.kmeans_iterations, self.kmeans_points = (
            max_clusterings, kmeans_iterations, kmeans_points,
        )
        self.slot_hash = HashFamily(1, num_slots, seed=seed)
        slots = torch.arange(num_slots)
        # Until the first clustering the assignment is a hash of the slot, as in the paper.
        initial = HashFamily(columns, rows, seed=seed + 1)(slots)
        dtype = torch.int16 if assignment_bytes(rows) == 2 else torch.int32
        self.register_buffer("assignment", initial.to(dtype))
        # One hash family per column, so that re-clustering one column re-draws only that column's hash.
        self.column_hashes = nn.ModuleList(HashFamily(1, rows, seed=seed + 2 + j) for j in range(columns))
        # Each table is read once per column (its rows of that column pooled for every ID).
        self.clustered = EmbeddingTable(columns * rows, self.chunk, seed=seed + 2 + columns, lookups=columns)
        self.hashed = EmbeddingTable(columns * rows, self.chunk, seed=seed + 3 + columns, lookups=columns)
        self.register_buffer("column_offsets", torch.arange(columns) * rows, persistent=False)

    def rows_of_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [N, c] rows of the clustered and of the hashed table (column offsets included)."""
        clustered = self.assignment[slots].to(torch.int64) + self.column_offsets
        hashed = torch.cat([column_hash(slots) for column_hash in self.column_hashes], dim=1)
        return clustered, hashed + self.column_offsets

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.rows_of_slots(self.slot_hash(ids)[:, 0]), dim=1)

    def embed_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``slots``, read from the tables directly (for re-clustering between epochs;
        the tables may be held by a collection)."""
        clustered, hashed = self.rows_of_slots(slots)
        parts = self.clustered(clustered.reshape(-1)) + self.hashed(hashed.reshape(-1))
        return parts.reshape(len(slots), self.dim)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Column j's clustered row (c reads of the clustered table), then column j's hashed row (c reads)."""
        clustered, hashed = self.rows_of_slots(self.slot_hash(ids)[:, 0])
        return [self.clustered.lookup(clustered[:, j]) for j in range(self.columns)] + [
            self.hashed.lookup(hashed[:, j]) for j in range(self.columns)
        ]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        clustered, hashed = pooled[: self.columns], pooled[self.columns :]
        return torch.cat([first + second for first, second in zip(clustered, hashed, strict=True)], dim=1)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Re-cluster every column, one at a time, after each of the first ``max_clusterings`` epochs."""
        if epoch > self.max_clusterings:
            return
        generator = torch.Generator().manual_seed(int(self.slot_hash.hash_seed) * 1009 + epoch)
        for column in range(self.columns):
            self.recluster(column, epoch, generator)

    def recluster(self, column: int, epoch: int, generator: torch.Generator) -> None:
        slots = torch.arange(self.num_slots)
        columns = slice(column * self.chunk, (column + 1) * self.chunk)
        vectors = self.embed_slots(slots)[:, columns]
        sample = torch.randperm(self.num_slots, generator=generator)[: self.kmeans_points]
        centroids = kmeans(vectors[sample], self.rows, self.kmeans_iterations, generator)
        labels = nearest_centroid(vectors, centroids)
        self.assignment[:, column] = labels.to(self.assignment.dtype)
        rows = slice(column * self.rows, (column + 1) * self.rows)
        self.clustered.weight[rows] = centroids
        # A fresh hash for the column's second table, which starts as the mean residual of its slots.
        old_seed = int(self.column_hashes[column].hash_seed)
        self.column_hashes[column] = HashFamily(1, self.rows, seed=old_seed * 31 + epoch * self.columns + column + 1)
        buckets = self.column_hashes[column](slots)[:, 0]
        residuals = vectors - centroids[labels]
        sums = torch.zeros(self.rows, self.chunk).index_add_(0, buckets, residuals)
        counts = torch.bincount(buckets, minlength=self.rows).unsqueeze(1).clamp(min=1)
        self.hashed.weight[rows] = sums / counts

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, rows={self.rows}, columns={self.columns}"


class ClusteredCompositional(Scheme):
    """CCE: c columns of a clustered and a hashed table of k rows; k-means re-assigns IDs between epochs."""

    summary = "CCE (Tsang & Ahle 2023): c columns of clustered+hashed rows, re-clustered by k-means between epochs"
    unseen = "collided"

    def __init__(
        self,
        num_columns: int = 4,
        rows: int | None = None,
        assignment_share: float = 0.5,
        max_clusterings: int = 3,
        kmeans_iterations: int = 10,
        kmeans_points: int = 65536,
    ) -> None:
        if not 1 <= num_columns <= 64:
            raise ValueError(f"num_columns must be in [1, 64], got {num_columns}")
        if rows is not None and not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"rows must be in [1, {MAX_ROWS}] or unset (solved from the budget), got {rows}")
        if not 0.0 < assignment_share < 1.0:
            raise ValueError(f"assignment_share must be in (0, 1), got {assignment_share}")
        if not 0 <= max_clusterings <= 1000:
            raise ValueError(f"max_clusterings must be in [0, 1000], got {max_clusterings}")
        if not 1 <= kmeans_iterations <= 1000:
            raise ValueError(f"kmeans_iterations must be in [1, 1000], got {kmeans_iterations}")
        if not 1 <= kmeans_points <= 1 << 24:
            raise ValueError(f"kmeans_points must be in [1, {1 << 24}], got {kmeans_points}")
        self.num_columns, self.rows, self.assignment_share = num_columns, rows, assignment_share

    @staticmethod
    def size_bytes(num_slots: int, rows: int, columns: int, dim: int) -> int:
        tables = 2 * rows * dim * FLOAT_BYTES  # clustered and hashed: c * k rows of d / c each
        seeds = (1 + columns) * ID_BYTES  # the slot hash and one hash per column
        return tables + num_slots * columns * assignment_bytes(rows) + seeds

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        columns = effective_columns(self.num_columns, feature.dim)
        lowest_rows = self.rows or 1
        minimum = self.size_bytes(1, lowest_rows, columns, feature.dim)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum, f"one slot and {lowest_rows} rows per column")
        slots, rows = 1, lowest_rows
        for entry_bytes in (2, 4):  # the slots' share assumes int16 entries; redo if k needs int32
            affordable = int(self.assignment_share * budget_bytes) // (columns * entry_bytes)
            slots = max(1, min(MAX_SLOTS_PER_ID * (feature.num_ids + 1), affordable))
            if self.rows is not None:
                rows = self.rows
            else:
                def size_of(k: int, slots: int = slots) -> int:
                    return self.size_bytes(slots, k, columns, feature.dim)

                rows = largest_fitting(size_of, 1, MAX_ROWS, budget_bytes) or 1
            if assignment_bytes(rows) == entry_bytes:
                break
        while self.size_bytes(slots, rows, columns, feature.dim) > budget_bytes and slots > 1:
            slots = max(1, slots // 2)  # a fixed k left too little room for the slots' share
        size = self.size_bytes(slots, rows, columns, feature.dim)
        if size > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, size, f"one slot and {rows} rows per column")
        params = dict(self.get_params(), columns=columns, rows=rows, slots=slots)
        return SchemePlan(self.name, params, size, budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return CCELookup(
            p["slots"], p["rows"], p["columns"], feature.dim, p["max_clusterings"], p["kmeans_iterations"],
            p["kmeans_points"], seed,
        )
