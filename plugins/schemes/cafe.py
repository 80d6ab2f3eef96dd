"""``cafe``: CAFE (Zhang et al., SIGMOD 2024) — a HotSketch of (ID, importance score) slots finds the hot IDs
while the model trains; each of the H hottest IDs owns a row of a hot table, every other ID shares hashed rows.

The sketch is updated in training, from each batch's gradient norms (a hook on the embeddings) or counts;
migrations (promotions, demotions, evictions) are applied at the start of the next training batch and at each
epoch's end. docs/schemes.md states the exact rules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
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
    largest_fitting,
)

IMPORTANCES = ("gradient", "count")
#: a slot's score (fp32), beside its ID (int64) and its hot-row index (narrowest type)
SCORE_BYTES = 4
#: the most hot rows: so that the sketch's buckets (at most 64 slots per hot row) stay within the hash's range
MAX_HOT_ROWS = 2**24
MAX_SLOTS_PER_BUCKET = 64
MAX_SLOTS_PER_HOT_ROW = 64
MAX_MIGRATE_EVERY = 10**6
#: row indices 0..H (H: "no row") in the narrowest type that holds them: (largest H, bytes, dtype)
_ROW_INDEX_TYPES = ((255, 1, torch.uint8), (2**15 - 1, 2, torch.int16), (2**31 - 1, 4, torch.int32))


def row_index_bytes(rows: int) -> int:
    """Bytes of one row index among ``rows`` rows plus the "no row" value ``rows``: 1, 2 or 4."""
    return next(width for largest, width, _ in _ROW_INDEX_TYPES if rows <= largest)


def row_index_dtype(rows: int) -> torch.dtype:
    return next(dtype for largest, _, dtype in _ROW_INDEX_TYPES if rows <= largest)


def sketch_buckets(hot_rows: int, slots_per_hot_row: int, bucket_slots: int) -> int:
    """Buckets of ``bucket_slots`` slots that give at least ``slots_per_hot_row`` slots per hot row."""
    return -(-hot_rows * slots_per_hot_row // bucket_slots)


def cafe_size_bytes(hot_rows: int, hashed_rows: int, num_slots: int, dim: int) -> int:
    """Both tables, the sketch's slots (ID, score, hot-row index each) and two hash seeds (rows, buckets)."""
    tables = (hot_rows + hashed_rows) * dim * FLOAT_BYTES
    return tables + num_slots * (ID_BYTES + SCORE_BYTES + row_index_bytes(hot_rows)) + 2 * ID_BYTES


class HotSketch(nn.Module):
    """CAFE's HotSketch: ``num_buckets`` buckets of ``bucket_slots`` slots, each slot an (ID, score) pair and the
    hot-table row its ID owns (``hot_rows`` where it owns none). An ID hashes to one bucket; a slot whose score is
    not positive is empty. Per bucket it is Space-Saving: a new ID takes an empty slot, or replaces the slot of
    the smallest score and continues from that score."""

    def __init__(self, num_buckets: int, bucket_slots: int, hot_rows: int, seed: int) -> None:
        super().__init__()
        self.num_buckets, self.bucket_slots, self.hot_rows = num_buckets, bucket_slots, hot_rows
        self.bucket_hash = HashFamily(1, num_buckets, seed=seed)
        shape = (num_buckets, bucket_slots)
        self.register_buffer("slot_ids", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("slot_scores", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("slot_rows", torch.full(shape, hot_rows, dtype=row_index_dtype(hot_rows)))
        # Derived from slot_rows, not state: the flat slot that owns each hot row, -1 for a free row.
        self.register_buffer("slot_of_row", torch.full((hot_rows,), -1, dtype=torch.int64), persistent=False)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self.rebuild_slot_of_row()

    def rebuild_slot_of_row(self) -> None:
        rows = self.slot_rows.view(-1)
        owners = torch.nonzero(rows != self.hot_rows).flatten()
        self.slot_of_row.fill_(-1)
        self.slot_of_row[rows[owners].to(torch.int64)] = owners

    @property
    def num_slots(self) -> int:
        return self.num_buckets * self.bucket_slots

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ID's bucket, its slot (flat index; any slot of the bucket where absent) and whether it is held."""
        bucket = self.bucket_hash(ids)[:, 0]
        match = (self.slot_ids[bucket] == ids.unsqueeze(1)) & (self.slot_scores[bucket] > 0)
        slot = match.to(torch.uint8).argmax(1)
        return bucket, bucket * self.bucket_slots + slot, match.any(1)

    def hot_rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N]: each ID's hot row, ``hot_rows`` for an ID that owns none."""
        _, slot, held = self.find(ids)
        rows = self.slot_rows.view(-1)[slot].to(torch.int64)
        return torch.where(held, rows, torch.full_like(rows, self.hot_rows))

    def insert(self, ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Add ``scores`` [N] (summed per distinct ID) to the IDs' slots. A held ID adds to its score. New IDs
        of a bucket, by descending score, take its empty slots, and then the first of them left replaces the
        slot of the smallest score (one replacement per bucket per call; Space-Saving in a batch), continuing
        from that slot's score; a replaced slot's hot row is freed. Slots that an ID of this call already holds
        are not replaced. Returns the flat slots written and whether a hot ID lost its slot."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        totals = torch.zeros(len(unique), dtype=torch.float32, device=ids.device)
        totals.index_add_(0, inverse, scores.to(torch.float32))
        positive = totals > 0
        unique, totals = unique[positive], totals[positive]
        if len(unique) == 0:
            return torch.empty(0, dtype=torch.int64, device=ids.device), False
        width = self.bucket_slots
        flat_ids, flat_scores, flat_rows = self.slot_ids.view(-1), self.slot_scores.view(-1), self.slot_rows.view(-1)
        bucket, slot, held = self.find(unique)
        flat_scores.index_add_(0, slot[held], totals[held])
        new = ~held
        if not bool(new.any()):
            return slot[held], False
        new_ids, new_scores, new_buckets = unique[new], totals[new], bucket[new]
        # new IDs grouped by bucket, each group by descending score: a rank within the bucket
        order = torch.argsort(new_scores, descending=True, stable=True)
        order = order[torch.argsort(new_buckets[order], stable=True)]
        new_ids, new_scores, new_buckets = new_ids[order], new_scores[order], new_buckets[order]
        buckets, counts = torch.unique_consecutive(new_buckets, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(buckets), device=ids.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(new_ids), device=ids.device) - starts[group]
        # the slots of those buckets that held IDs of this call: never replaced
        held_bucket, held_slot = bucket[held], slot[held] % width
        position = torch.searchsorted(buckets, held_bucket).clamp(max=len(buckets) - 1)
        in_group = buckets[position] == held_bucket
        taken = torch.zeros(len(buckets), width, dtype=torch.bool, device=ids.device)
        taken[position[in_group], held_slot[in_group]] = True
        bucket_scores = self.slot_scores[buckets]
        empty = (bucket_scores <= 0) & ~taken
        key = torch.where(bucket_scores > 0, bucket_scores, torch.full_like(bucket_scores, -1.0))
        key = key.masked_fill(taken, float("inf"))
        slot_order = torch.argsort(key, dim=1, stable=True)  # empty slots, then by ascending score
        allowed = torch.minimum(empty.sum(1) + 1, width - taken.sum(1))
        placed = rank < allowed[group]
        target = buckets[group[placed]] * width + slot_order[group[placed], rank[placed]]
        lost = flat_rows[target]
        lost = lost[lost != self.hot_rows].to(torch.int64)
        self.slot_of_row[lost] = -1
        flat_scores[target] = flat_scores[target].clamp(min=0) + new_scores[placed]
        flat_ids[target] = new_ids[placed]
        flat_rows[target] = self.hot_rows
        return torch.cat([slot[held], target]), len(lost) > 0

    def hottest(self, hot: torch.Tensor) -> torch.Tensor:
        """bool [slots]: the ``hot_rows`` slots of highest score (positive scores only); among slots tied at the
        cut, those now hot (``hot``) first, then the lower slot index."""
        scores = self.slot_scores.view(-1)
        positive = scores > 0
        if int(positive.sum()) <= self.hot_rows:
            return positive
        cutoff = torch.kthvalue(scores, self.num_slots - self.hot_rows + 1).values  # the H-th largest, > 0
        chosen = scores > cutoff
        tied = scores == cutoff
        candidates = torch.cat([torch.nonzero(tied & hot).flatten(), torch.nonzero(tied & ~hot).flatten()])
        chosen[candidates[: self.hot_rows - int(chosen.sum())]] = True
        return chosen

    def extra_repr(self) -> str:
        return f"buckets={self.num_buckets}, bucket_slots={self.bucket_slots}, hot_rows={self.hot_rows}"


class CAFELookup(TableBackedEmbedding):
    """An ID owning a hot row reads it; every other ID (not in the sketch, or not among its H hottest) reads
    its hashed row. Training batches update the sketch; migrations follow at the next training batch."""

    def __init__(
        self,
        hot_rows: int,
        hashed_rows: int,
        dim: int,
        num_buckets: int,
        bucket_slots: int,
        importance: str,
        decay: float,
        migrate_every: int,
        seed: int,
        warm_ids: torch.Tensor | None = None,
        warm_scores: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.hot_rows, self.hashed_rows, self.dim = hot_rows, hashed_rows, dim
        self.importance, self.decay, self.migrate_every = importance, decay, migrate_every
        self.hash = HashFamily(1, hashed_rows, seed=seed)
        self.sketch = HotSketch(num_buckets, bucket_slots, hot_rows, seed=seed + 1)
        self.hashed = EmbeddingTable(hashed_rows, dim, seed=seed + 2)
        self.hot = EmbeddingTable(hot_rows, dim, seed=seed + 3)
        # Derived, not state: the slots written since the last migration that may enter the hot set, and a lower
        # bound of the smallest hot score (only a cold slot above it can enter; 0 while rows are free).
        self._candidates: list[torch.Tensor] = []
        self._cutoff = 0.0
        self._batches = 0  # training batches since the last migration
        if warm_ids is not None and warm_scores is not None and len(warm_ids):
            with torch.no_grad():
                self.sketch.insert(warm_ids, warm_scores)
        self.migrate()

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self._candidates.clear()
        self._cutoff = 0.0  # a valid lower bound; the next migration of a candidate tightens it

    # -- rows ---------------------------------------------------------------------------------------------
    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ID's hot row (``hot_rows`` where none) and its hashed row."""
        return self.sketch.hot_rows_of(ids), self.hash(ids)[:, 0]

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """(-1 - hot row) for a hot ID, its hashed row for any other."""
        hot_row, hashed_row = self.rows_of(ids)
        return torch.where(hot_row < self.hot_rows, -1 - hot_row, hashed_row).unsqueeze(1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """The hashed table's read for the cold IDs, then the hot table's for the hot ones (each ID reads, and
        trains, one row). In training, pending migrations are applied first, and counts recorded after."""
        if self.training:
            if self._candidates and self._batches >= self.migrate_every:
                self.promote_candidates()
            self._batches += 1
        hot_row, hashed_row = self.rows_of(ids)
        hot = hot_row < self.hot_rows
        cold = ~hot
        if self.training and self.importance == "count":
            self.record(ids, torch.ones(len(ids), device=ids.device))
        return [
            self.hashed.lookup(hashed_row[cold], lengths=cold.to(torch.int64)),
            self.hot.lookup(hot_row[hot], lengths=hot.to(torch.int64)),
        ]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        embeddings = pooled[0] + pooled[1]  # every ID pooled one row, in one of the two reads
        if self.training and self.importance == "gradient" and embeddings.requires_grad:
            embeddings.register_hook(functools.partial(self._record_gradients, ids.detach()))
        return embeddings

    # -- importance and migrations ------------------------------------------------------------------------
    def _record_gradients(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Each occurrence scores its embedding's gradient norm, scaled so that a batch's scores average 1 (as
        the authors' code does), so that scores do not depend on the loss's scale."""
        with torch.no_grad():
            norms = grad.detach().norm(dim=1)
            total = norms.sum()
            if bool(total > 0):
                self.record(ids, norms * (len(norms) / total))

    @torch.no_grad()
    def record(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Insert the scores into the sketch; keep the written cold slots that may now enter the hot set."""
        written, _ = self.sketch.insert(ids, scores)
        candidates = written[self._may_enter(written)]
        if len(candidates):
            self._candidates.append(candidates)

    def _may_enter(self, slots: torch.Tensor) -> torch.Tensor:
        cold = self.sketch.slot_rows.view(-1)[slots] == self.hot_rows
        return cold & (self.sketch.slot_scores.view(-1)[slots] > self._cutoff)

    @torch.no_grad()
    def promote_candidates(self) -> None:
        """Bring the hot set back to the sketch's H hottest IDs after the written slots changed. Only they can
        enter it (scores only grow between epochs, and a replaced slot continues from the replaced score), so
        they take the free rows, best first, and then each remaining one, best first, replaces the coldest hot
        ID while it is hotter: the exact top H, in time of the batch (plus the hot rows where IDs swap)."""
        slots = torch.unique(torch.cat(self._candidates))
        self._candidates.clear()
        self._batches = 0
        slots = slots[self._may_enter(slots)]
        if not len(slots):
            return
        sketch, scores, rows = self.sketch, self.sketch.slot_scores.view(-1), self.sketch.slot_rows.view(-1)
        slots = slots[torch.argsort(scores[slots], descending=True, stable=True)]
        free = torch.nonzero(sketch.slot_of_row < 0).flatten()[: len(slots)]
        self._assign(slots[: len(free)], free)
        rest = slots[len(free) :]
        cutoff = 0.0  # while rows are free; and a valid lower bound when they have just filled
        if len(rest):
            hot_slots = sketch.slot_of_row  # every row is owned here
            coldest_scores, coldest = torch.topk(scores[hot_slots], min(len(rest), self.hot_rows), largest=False)
            # rest descends and coldest ascends, so the swaps are a prefix; the IDs just given free rows are at
            # least as hot as any of rest, so never swapped out
            swaps = int((scores[rest[: len(coldest)]] > coldest_scores).sum())
            demoted = hot_slots[coldest[:swaps]]
            freed = rows[demoted].to(torch.int64)
            rows[demoted] = self.hot_rows
            self._assign(rest[:swaps], freed)
            # every hot ID left is at least the coldest one not swapped out (or the last of those looked at)
            cutoff = float(coldest_scores[min(swaps, len(coldest) - 1)])
            if swaps:
                cutoff = min(cutoff, float(scores[rest[:swaps]].min()))
        self._cutoff = cutoff

    def _assign(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Give the IDs of ``slots`` the hot ``rows``, each row starting from the ID's hashed row."""
        if not len(slots):
            return
        sketch = self.sketch
        sketch.slot_rows.view(-1)[slots] = rows.to(sketch.slot_rows.dtype)
        sketch.slot_of_row[rows] = slots
        self.hot.weight[rows] = self.hashed.weight[self.hash(sketch.slot_ids.view(-1)[slots])[:, 0]]

    @torch.no_grad()
    def migrate(self) -> None:
        """Make the hot set the sketch's H hottest IDs from scratch: demoted IDs free their rows (and read their
        hashed row again); promoted IDs take free rows, each initialised from the ID's hashed row."""
        self._candidates.clear()
        self._batches = 0
        sketch, rows = self.sketch, self.sketch.slot_rows.view(-1)
        hot = rows != self.hot_rows
        hottest = sketch.hottest(hot)
        rows[hot & ~hottest] = self.hot_rows
        sketch.rebuild_slot_of_row()
        promoted = torch.nonzero(hottest & ~hot).flatten()
        self._assign(promoted, torch.nonzero(sketch.slot_of_row < 0).flatten()[: len(promoted)])
        full = int(hottest.sum()) == self.hot_rows
        self._cutoff = float(sketch.slot_scores.view(-1)[hottest].min()) if full else 0.0

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Decay every score (which keeps their order), then recompute the hot set from scratch."""
        self.sketch.slot_scores.mul_(self.decay)
        self.migrate()

    def extra_repr(self) -> str:
        return (f"hot_rows={self.hot_rows}, hashed_rows={self.hashed_rows}, importance={self.importance}, "
                f"decay={self.decay}, migrate_every={self.migrate_every}")


class CAFE(Scheme):
    """CAFE: a HotSketch ranks IDs by importance while training; the H hottest own hot rows, the rest share
    hashed rows. ``hot_share`` of the budget goes to the hot rows and the sketch, the rest to hashed rows."""

    summary = "CAFE (Zhang et al. 2024): a HotSketch finds hot IDs in training; they own rows, the rest hash"
    unseen = "collided"

    def __init__(
        self,
        hot_share: float = 0.5,
        hot_rows: int | None = None,
        slots_per_hot_row: int = 4,
        bucket_slots: int = 4,
        importance: Literal["gradient", "count"] = "gradient",
        decay: float = 0.8,
        migrate_every: int = 1,
        warm_start: bool = True,
    ) -> None:
        if not 0.0 < hot_share < 1.0:
            raise ValueError(f"hot_share must be in (0, 1) (the budget's share of hot rows and sketch), got "
                             f"{hot_share}")
        if hot_rows is not None and not 1 <= hot_rows <= MAX_HOT_ROWS:
            raise ValueError(f"hot_rows must be in [1, {MAX_HOT_ROWS}] or unset (solved from the budget), got "
                             f"{hot_rows}")
        if not 1 <= slots_per_hot_row <= MAX_SLOTS_PER_HOT_ROW:
            raise ValueError(f"slots_per_hot_row must be in [1, {MAX_SLOTS_PER_HOT_ROW}], got {slots_per_hot_row}")
        if not 1 <= bucket_slots <= MAX_SLOTS_PER_BUCKET:
            raise ValueError(f"bucket_slots must be in [1, {MAX_SLOTS_PER_BUCKET}], got {bucket_slots}")
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1] (scores are multiplied by it after each epoch), got {decay}")
        if not 1 <= migrate_every <= MAX_MIGRATE_EVERY:
            raise ValueError(f"migrate_every must be in [1, {MAX_MIGRATE_EVERY}] (training batches), got "
                             f"{migrate_every}")
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be true or false, got {warm_start!r}")
        self.hot_share, self.hot_rows, self.slots_per_hot_row = hot_share, hot_rows, slots_per_hot_row
        self.bucket_slots, self.importance, self.decay, self.warm_start = bucket_slots, importance, decay, warm_start
        self.migrate_every = migrate_every

    def hot_bytes(self, hot_rows: int, dim: int) -> int:
        """Bytes of ``hot_rows`` hot rows and their sketch."""
        slots = sketch_buckets(hot_rows, self.slots_per_hot_row, self.bucket_slots) * self.bucket_slots
        return cafe_size_bytes(hot_rows, 0, slots, dim) - 2 * ID_BYTES

    def size_bytes(self, hot_rows: int, hashed_rows: int, dim: int) -> int:
        return self.hot_bytes(hot_rows, dim) + hashed_rows * dim * FLOAT_BYTES + 2 * ID_BYTES

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim = feature.dim
        row_bytes = dim * FLOAT_BYTES
        minimum = self.size_bytes(self.hot_rows or 1, 1, dim)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum, f"{self.hot_rows or 1} hot row(s), its sketch "
                                 "and one hashed row")
        if self.hot_rows is not None:
            hot_rows = self.hot_rows
        else:  # the hot share, at most a row per training ID, and at least one row left to hash into
            most = max(1, min(feature.num_ids, MAX_HOT_ROWS))
            room = budget_bytes - 2 * ID_BYTES - row_bytes

            def hot_bytes(rows: int) -> int:
                return self.hot_bytes(rows, dim)

            hot_rows = largest_fitting(hot_bytes, 1, most, min(int(self.hot_share * budget_bytes), room)) or 1
        hashed_rows = min(MERSENNE_PRIME, (budget_bytes - self.hot_bytes(hot_rows, dim) - 2 * ID_BYTES) // row_bytes)
        buckets = sketch_buckets(hot_rows, self.slots_per_hot_row, self.bucket_slots)
        params = dict(self.get_params(), hot_rows=hot_rows, hashed_rows=hashed_rows, buckets=buckets)
        notes = {
            "sketch": f"{buckets * self.bucket_slots:,} slots ({buckets:,} buckets of {self.bucket_slots}): int64 "
                      f"ID, fp32 score, {row_index_dtype(hot_rows)} hot row",
            "importance": "gradient norm of the ID's embedding (batch-normalised)" if self.importance == "gradient"
            else "occurrence count",
        }
        return SchemePlan(self.name, params, self.size_bytes(hot_rows, hashed_rows, dim), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        warm_ids = warm_scores = None
        if p["warm_start"] and feature.num_ids:
            warm_ids = torch.as_tensor(np.asarray(feature.ids, dtype=np.int64))
            warm_scores = torch.as_tensor(np.asarray(feature.counts, dtype=np.float32))
        return CAFELookup(
            p["hot_rows"], p["hashed_rows"], feature.dim, p["buckets"], p["bucket_slots"], p["importance"],
            p["decay"], p["migrate_every"], seed, warm_ids, warm_scores,
        )

