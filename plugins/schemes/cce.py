"""``cce``: Clustered Compositional Embeddings (Tsang & Ahle, NeurIPS 2023) — c columns, each the sum of a
row picked by a learned cluster assignment and a row picked by a hash; after each epoch each column's
assignment is re-learned by k-means on the current embeddings, its clustered table reset to the centroids.

The assignment is kept per training ID, as in the paper (``assignment="per-id"``, its bytes counted), or per
hashed slot of the ID (``"hashed"``), which fits any budget. docs/schemes.md says when each is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
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
    TableInit,
    VocabularyIndex,
    largest_fitting,
)

MAX_ROWS = 1 << 24
MAX_CLUSTERINGS = 100_000
ASSIGNMENTS = ("per-id", "hashed")
INITS = ("normal", "uniform")
KMEANS_INITS = ("k-means++", "random")
#: slots per training ID at most (hashed assignment): more would only thin the collisions of a sparse slot space
MAX_SLOTS_PER_ID = 4
#: the per-ID assignment is used only where it leaves the tables at least this many rows; else hashed slots
MIN_PER_ID_ROWS = 16
#: points sampled per centroid for k-means when ``kmeans_points`` is unset: the reference's (faiss's) 200
KMEANS_POINTS_PER_CENTROID = 200
#: relative perturbation when an empty cluster takes half of the largest one (as faiss splits clusters)
SPLIT_EPSILON = 1.0 / 1024
#: distance entries (points x centroids) computed at once in k-means, bounding its memory
_CHUNK_DISTANCES = 1 << 24
#: cluster indices 0..k-1 in the narrowest integer type that holds them: (largest k, bytes, dtype)
_ASSIGNMENT_TYPES = ((1 << 8, 1, torch.uint8), (1 << 15, 2, torch.int16), (MAX_ROWS, 4, torch.int32))


def effective_columns(num_columns: int, dim: int) -> int:
    """The largest divisor of ``dim`` not above ``num_columns``: columns split the dim evenly."""
    return max(c for c in range(1, min(num_columns, dim) + 1) if dim % c == 0)


def assignment_bytes(rows: int) -> int:
    """Bytes of one cluster index among ``rows``: 1 (uint8) up to 256 rows, 2 (int16) up to 32,768, else 4."""
    return next(width for largest, width, _ in _ASSIGNMENT_TYPES if rows <= largest)


def assignment_dtype(rows: int) -> torch.dtype:
    return next(dtype for largest, _, dtype in _ASSIGNMENT_TYPES if rows <= largest)


def derived_seed(seed: int, *tags: int | str) -> int:
    """A seed in [0, 2^62) drawn from ``seed`` and ``tags`` (stable across processes, never growing with them)."""
    digest = hashlib.blake2b(repr((int(seed), *tags)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """int64 [P]: the index of each point's nearest centroid (squared Euclidean), in chunks of points."""
    chunk = max(1, _CHUNK_DISTANCES // len(centroids))
    squared_norms = centroids.pow(2).sum(1)
    labels = [(squared_norms - 2 * part @ centroids.T).argmin(1) for part in points.split(chunk)]
    return torch.cat(labels)


def _split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor) -> None:
    """Give each empty cluster half of one of the largest clusters (those of 2 points or more), as faiss does:
    the two centroids become the donor's, moved apart by ±SPLIT_EPSILON in alternating coordinates."""
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty) == 0:
        return
    largest = torch.topk(counts, min(len(empty), len(counts))).indices
    donors = largest[counts[largest] >= 2]
    empty = empty[: len(donors)]
    sign = torch.ones(centroids.shape[1], device=centroids.device)
    sign[1::2] = -1
    donor_rows = centroids[donors]
    centroids[empty] = donor_rows * (1 + SPLIT_EPSILON * sign)
    centroids[donors] = donor_rows * (1 - SPLIT_EPSILON * sign)


def kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k starting centroids by k-means++ (Arthur & Vassilvitskii 2007): each next one a point drawn with
    probability proportional to its squared distance to the nearest centroid so far. The loop is over the k
    centroids (sequential by definition), each step one vectorised pass over the points."""
    n = len(points)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = (points - points[chosen[0]]).pow(2).sum(1)
    for _ in range(1, num_clusters):
        cumulative = closest.double().cumsum(0)
        total = float(cumulative[-1])
        draw = float(torch.rand((), generator=generator, dtype=torch.float64))
        if total > 0:
            target = torch.tensor(draw * total, dtype=torch.float64, device=points.device)
            index = min(int(torch.searchsorted(cumulative, target, right=True)), n - 1)
        else:  # every point sits on a centroid already: any point (its cluster will be split)
            index = int(draw * n)
        chosen.append(index)
        closest = torch.minimum(closest, (points - points[index]).pow(2).sum(1))
    return points[chosen].clone()


def kmeans(
    points: torch.Tensor, num_clusters: int, iterations: int, generator: torch.Generator, init: str = "k-means++"
) -> torch.Tensor:
    """Centroids [k, dim] of ``points`` [n, dim] by Lloyd's algorithm, as the reference's faiss.Kmeans runs it:
    at most ``iterations`` rounds (stopping early once no point changes cluster: later rounds would change
    nothing), an emptied cluster re-seeded by splitting the largest one. Started from k-means++ (``init``; the
    reference's sklearn backend does the same) or from k distinct random points (``random``, its faiss backend).
    With no more points than clusters, every point is its own centroid (the rest repeat them)."""
    n = len(points)
    if n <= num_clusters:
        return points[torch.arange(num_clusters, device=points.device) % n].clone()
    if init == "k-means++":
        centroids = kmeans_plus_plus(points, num_clusters, generator)
    else:
        centroids = points[torch.randperm(n, generator=generator)[:num_clusters].to(points.device)].clone()
    previous: torch.Tensor | None = None
    for _ in range(iterations):
        labels = nearest_centroid(points, centroids)
        if previous is not None and torch.equal(labels, previous):
            break  # converged: the centroids are the means of these very clusters
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=num_clusters)
        centroids = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), centroids)
        if bool((counts == 0).any()):
            _split_empty_clusters(centroids, counts)
            previous = None  # the split moved centroids: the next assignment must run
        else:
            previous = labels
    return centroids


class CCELookup(TableBackedEmbedding):
    """Column j of an ID's embedding = clustered[a_j(x)] + hashed[g_j(x)], the c columns concatenated.

    ``per-id``: a_j(x) is the learned assignment of the ID's rank in the training vocabulary, g_j a hash of
    that rank; an unseen ID takes both rows by hashes of the ID itself. ``hashed``: x is first hashed to one of
    S slots, and a_j, g_j are the learned assignment and a hash of the slot.
    """

    combine_is_linear = True  # a concatenation of sums of rows: a bag pools its rows in the table kernel

    def __init__(
        self,
        assignment: str,
        num_keys: int,
        rows: int,
        columns: int,
        dim: int,
        max_clusterings: int | None,
        kmeans_iterations: int,
        kmeans_points: int | None,
        kmeans_init: str,
        seed: int,
        init: TableInit,
        vocabulary: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.assignment_kind, self.num_keys, self.rows, self.columns, self.dim = (
            assignment, num_keys, rows, columns, dim,
        )
        self.chunk = dim // columns
        self.max_clusterings, self.kmeans_iterations, self.kmeans_init = max_clusterings, kmeans_iterations, kmeans_init
        self.kmeans_points = kmeans_points or KMEANS_POINTS_PER_CENTROID * rows
        self.seed = int(seed)
        if assignment == "per-id":
            assert vocabulary is not None and len(vocabulary) == num_keys
            self.vocabulary = VocabularyIndex(vocabulary)
            self.unseen_hash = HashFamily(columns, rows, seed=seed)
        else:
            self.slot_hash = HashFamily(1, num_keys, seed=seed)
        # Until the first clustering the assignment is random (a hash of the key), as in the paper.
        initial = HashFamily(columns, rows, seed=seed + 1)(torch.arange(num_keys))
        self.register_buffer("assignment", initial.to(assignment_dtype(rows)))
        # Redrawn at every clustering (its seed is state): the second table's rows start from fresh collisions.
        self.residual_hash = HashFamily(columns, rows, seed=seed + 2)
        # Each table is read once per column (its rows of that column pooled for every ID).
        self.clustered = EmbeddingTable(columns * rows, self.chunk, seed=seed + 3, lookups=columns, init=init)
        self.hashed = EmbeddingTable(columns * rows, self.chunk, seed=seed + 4, lookups=columns, init=init)
        self.register_buffer("column_offsets", torch.arange(columns) * rows, persistent=False)

    def rows_of_keys(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [N, c] rows of the clustered and of the hashed table (column offsets included) of keys
        (training-ID ranks or slots)."""
        clustered = self.assignment[keys].to(torch.int64)
        return clustered + self.column_offsets, self.residual_hash(keys) + self.column_offsets

    def rows_of_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.assignment_kind == "hashed":
            return self.rows_of_keys(self.slot_hash(ids)[:, 0])
        rank = self.vocabulary(ids)
        known = rank < self.num_keys
        clustered, hashed = self.rows_of_keys(rank.clamp(max=self.num_keys - 1))
        unseen = ~known.unsqueeze(1)
        clustered = torch.where(unseen, self.unseen_hash(ids) + self.column_offsets, clustered)
        hashed = torch.where(unseen, self.residual_hash(ids) + self.column_offsets, hashed)
        return clustered, hashed

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.rows_of_ids(ids), dim=1)

    def embed_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``keys``, read from the tables directly (for re-clustering between epochs; the
        tables may be held by a collection)."""
        clustered, hashed = self.rows_of_keys(keys)
        parts = self.clustered(clustered.reshape(-1)) + self.hashed(hashed.reshape(-1))
        return parts.reshape(len(keys), self.dim)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Column j's clustered row (c reads of the clustered table), then column j's hashed row (c reads)."""
        clustered, hashed = self.rows_of_ids(ids)
        return [self.clustered.lookup(clustered[:, j]) for j in range(self.columns)] + [
            self.hashed.lookup(hashed[:, j]) for j in range(self.columns)
        ]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        clustered, hashed = pooled[: self.columns], pooled[self.columns :]
        return torch.cat([first + second for first, second in zip(clustered, hashed, strict=True)], dim=1)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Re-cluster every column after each epoch (the paper's schedule), up to epoch ``max_clusterings``."""
        if self.max_clusterings is not None and epoch > self.max_clusterings:
            return
        keys = torch.arange(self.num_keys, device=self.assignment.device)
        vectors = self.embed_keys(keys)  # before any table, assignment or hash changes
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "kmeans", epoch))
        # A fresh hash for the second table; derived, not chained, so that no number of clusterings overflows it.
        seed = torch.tensor(derived_seed(self.seed, "residual", epoch), device=self.assignment.device)
        self.residual_hash.load_state_dict({"hash_seed": seed})  # loading the seed regenerates the hash
        buckets = self.residual_hash(keys)
        for column in range(self.columns):
            self.recluster(column, vectors[:, column * self.chunk : (column + 1) * self.chunk], buckets[:, column],
                           generator)

    def recluster(
        self, column: int, vectors: torch.Tensor, buckets: torch.Tensor, generator: torch.Generator
    ) -> None:
        """k-means on a sample of the keys' vectors of ``column``; every key assigned its nearest centroid; the
        clustered rows set to the centroids, the hashed rows to the mean residual of their keys."""
        sample = torch.randperm(self.num_keys, generator=generator)[: self.kmeans_points].to(vectors.device)
        centroids = kmeans(vectors[sample], self.rows, self.kmeans_iterations, generator, self.kmeans_init)
        labels = nearest_centroid(vectors, centroids)
        self.assignment[:, column] = labels.to(self.assignment.dtype)
        rows = slice(column * self.rows, (column + 1) * self.rows)
        self.clustered.weight[rows] = centroids
        residuals = vectors - centroids[labels]
        sums = torch.zeros(self.rows, self.chunk, device=vectors.device).index_add_(0, buckets, residuals)
        counts = torch.bincount(buckets, minlength=self.rows).unsqueeze(1).clamp(min=1)
        self.hashed.weight[rows] = sums / counts

    def extra_repr(self) -> str:
        return f"assignment={self.assignment_kind}, keys={self.num_keys}, rows={self.rows}, columns={self.columns}"


class ClusteredCompositional(Scheme):
    """CCE: c columns of a clustered and a hashed table of k rows; k-means re-assigns IDs after each epoch."""

    summary = "CCE (Tsang & Ahle 2023): c columns of clustered+hashed rows, re-clustered by k-means after epochs"
    unseen = "collided"

    def __init__(
        self,
        num_columns: int = 4,
        rows: int | None = None,
        assignment: Literal["per-id", "hashed"] = "per-id",
        assignment_share: float = 0.5,
        max_clusterings: int | None = None,
        kmeans_iterations: int = 100,
        kmeans_points: int | None = None,
        kmeans_init: Literal["k-means++", "random"] = "k-means++",
        init: Literal["normal", "uniform"] = "uniform",
        init_std: float = 0.01,
    ) -> None:
        if not 1 <= num_columns <= 64:
            raise ValueError(f"num_columns must be in [1, 64], got {num_columns}")
        if rows is not None and not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"rows must be in [1, {MAX_ROWS}] or unset (solved from the budget), got {rows}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {assignment!r}")
        if not 0.0 < assignment_share < 1.0:
            raise ValueError(f"assignment_share must be in (0, 1), got {assignment_share}")
        if max_clusterings is not None and not 0 <= max_clusterings <= MAX_CLUSTERINGS:
            raise ValueError(
                f"max_clusterings must be in [0, {MAX_CLUSTERINGS}] or unset (after every epoch), got {max_clusterings}"
            )
        if not 1 <= kmeans_iterations <= 1000:
            raise ValueError(f"kmeans_iterations must be in [1, 1000], got {kmeans_iterations}")
        if kmeans_points is not None and not 1 <= kmeans_points <= 1 << 24:
            raise ValueError(
                f"kmeans_points must be in [1, {1 << 24}] or unset ({KMEANS_POINTS_PER_CENTROID} per row), "
                f"got {kmeans_points}"
            )
        if kmeans_init not in KMEANS_INITS:
            raise ValueError(f"kmeans_init must be one of {', '.join(KMEANS_INITS)}, got {kmeans_init!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if not 0.0 <= init_std <= 10.0:
            raise ValueError(f"init_std must be in [0, 10], got {init_std}")
        self.num_columns, self.rows, self.assignment, self.assignment_share = (
            num_columns, rows, assignment, assignment_share,
        )
        self.init, self.init_std = init, init_std

    @staticmethod
    def size_bytes(num_keys: int, rows: int, columns: int, dim: int, dictionary_bytes: int = 0) -> int:
        """Both tables (c·k rows of d/c each), the assignment of ``num_keys`` (IDs or slots), the ID dictionary
        (per-ID), and two hash seeds (the residual hash, and the slot or unseen-ID hash)."""
        tables = 2 * rows * dim * FLOAT_BYTES
        return tables + num_keys * columns * assignment_bytes(rows) + dictionary_bytes + 2 * ID_BYTES

    def table_init(self, columns: int, dim: int) -> TableInit:
        """``uniform``: U(±dim^-½) over the whole embedding's dim, as the reference does, so each table of
        width d/c takes scale sqrt((d/c)/d)."""
        if self.init == "normal":
            return TableInit("normal", std=self.init_std)
        return TableInit("uniform", scale=((dim // columns) / dim) ** 0.5)

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        columns = effective_columns(self.num_columns, feature.dim)
        init = self.table_init(columns, feature.dim)
        init_note = init.describe() + (" = U(±dim^-½)" if self.init == "uniform" else "")
        notes: dict[str, object] = {"init": init_note}
        if self.assignment == "per-id":
            planned = self.plan_per_id(feature, budget_bytes, columns)
            if planned is not None:
                rows, size = planned
                notes["assignment"] = (
                    f"per-ID: {feature.num_ids:,} training IDs x {columns} columns of "
                    f"{assignment_dtype(rows)} ({feature.num_ids * columns * assignment_bytes(rows):,} bytes); "
                    "unseen IDs hashed"
                )
                params = dict(self.get_params(), columns=columns, rows=rows, assignment="per-id",
                              keys=feature.num_ids)
                return SchemePlan(self.name, params, size, budget_bytes, notes)
            needed = self.size_bytes(feature.num_ids, self.rows or MIN_PER_ID_ROWS, columns, feature.dim,
                                     VocabularyIndex.size_bytes(feature.ids))
            notes["assignment"] = (
                f"hashed slots: the per-ID assignment of {feature.num_ids:,} IDs with "
                f"{self.rows or MIN_PER_ID_ROWS} rows needs {needed:,} bytes, over the budget of {budget_bytes:,}"
            )
        slots, rows = self.plan_hashed(feature, budget_bytes, columns)
        size = self.size_bytes(slots, rows, columns, feature.dim)
        params = dict(self.get_params(), columns=columns, rows=rows, assignment="hashed", keys=slots)
        return SchemePlan(self.name, params, size, budget_bytes, notes)

    def plan_per_id(self, feature: FeatureSpec, budget_bytes: int, columns: int) -> tuple[int, int] | None:
        """(rows, size) with the per-ID assignment paid first and the rest to the rows; None where it leaves
        fewer than MIN_PER_ID_ROWS rows (or the given ``rows`` do not fit)."""
        if feature.num_ids == 0:
            return None
        dictionary = VocabularyIndex.size_bytes(feature.ids)

        def size_of(k: int) -> int:
            return self.size_bytes(feature.num_ids, k, columns, feature.dim, dictionary)

        if self.rows is not None:
            rows: int | None = self.rows if size_of(self.rows) <= budget_bytes else None
        else:
            rows = largest_fitting(size_of, MIN_PER_ID_ROWS, MAX_ROWS, budget_bytes)
        return None if rows is None else (rows, size_of(rows))

    def plan_hashed(self, feature: FeatureSpec, budget_bytes: int, columns: int) -> tuple[int, int]:
        """(slots, rows): ``assignment_share`` of the budget to the slots' assignment, the rest to the rows. The
        assignment's width depends on the rows, so each width is tried and the plan that uses most is kept."""
        lowest_rows = self.rows or 1
        minimum = self.size_bytes(1, lowest_rows, columns, feature.dim)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum, f"one slot and {lowest_rows} rows per column")
        def size_of(slots: int, k: int) -> int:
            return self.size_bytes(slots, k, columns, feature.dim)

        def rows_for(slots: int) -> int | None:
            if self.rows is not None:
                return self.rows if size_of(slots, self.rows) <= budget_bytes else None
            return largest_fitting(lambda k: size_of(slots, k), 1, MAX_ROWS, budget_bytes)

        best: tuple[int, int, int] | None = None
        for width in sorted({width for _, width, _ in _ASSIGNMENT_TYPES}):
            affordable = int(self.assignment_share * budget_bytes) // (columns * width)
            slots = max(1, min(MAX_SLOTS_PER_ID * (feature.num_ids + 1), affordable))
            rows = rows_for(slots)
            while rows is None:  # the rows left too little room for the slots' share
                slots = max(1, slots // 2)
                rows = rows_for(slots)
            size = size_of(slots, rows)
            if best is None or size > best[0]:
                best = (size, slots, rows)
        assert best is not None  # one slot and the lowest rows fit
        return best[1], best[2]

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        vocabulary = feature.ids if p["assignment"] == "per-id" else None
        return CCELookup(
            p["assignment"], p["keys"], p["rows"], p["columns"], feature.dim, p["max_clusterings"],
            p["kmeans_iterations"], p["kmeans_points"], p["kmeans_init"], seed,
            self.table_init(p["columns"], feature.dim), vocabulary,
        )
