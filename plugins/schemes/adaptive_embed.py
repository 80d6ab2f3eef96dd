"""``adaptive-embed``: AdaEmbed (Lai et al., OSDI 2023) — R rows for a vocabulary of n > R IDs; each training ID's
importance (its accesses times its gradient norms, decayed) is tracked, and the R most important IDs hold the rows,
reallocated after each epoch (or every N training batches); every other ID embeds to the default (zero) vector.
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
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    VocabularyIndex,
    largest_fitting,
)

IMPORTANCES = ("gradient", "count")
DEFAULTS = ("zero", "shared")
ADMIT_INITS = ("random", "default")
#: an ID's importance score (fp32), beside its row index (narrowest type)
SCORE_BYTES = 4
#: the count of reallocations that admitted IDs (int64): with the build's seed, it seeds the next fresh rows
COUNTER_BYTES = 8
#: the most rows: their index, and the "no row" value R, must fit an int32
MAX_ROWS = 2**31 - 2
MAX_REALLOCATE_EVERY = 10**6
#: row indices 0..R (R: "no row") in the narrowest type that holds them: (largest R, bytes, dtype)
_ROW_INDEX_TYPES = ((255, 1, torch.uint8), (2**15 - 1, 2, torch.int16), (MAX_ROWS, 4, torch.int32))


def row_index_bytes(rows: int) -> int:
    """Bytes of one row index among ``rows`` rows plus the "no row" value ``rows``: 1, 2 or 4."""
    return next(width for largest, width, _ in _ROW_INDEX_TYPES if rows <= largest)


def row_index_dtype(rows: int) -> torch.dtype:
    return next(dtype for largest, _, dtype in _ROW_INDEX_TYPES if rows <= largest)


def adaptive_embed_size_bytes(num_ids: int, rows: int, dim: int, dictionary_bytes: int, shared_row: bool) -> int:
    """The rows (and the shared default row), each training ID's row index and importance, the ID dictionary and
    the reallocation counter."""
    table = (rows + int(shared_row)) * dim * FLOAT_BYTES
    return table + num_ids * (row_index_bytes(rows) + SCORE_BYTES) + dictionary_bytes + COUNTER_BYTES


def most_frequent_ranks(feature: FeatureSpec, count: int) -> np.ndarray:
    """Ranks (positions in the sorted training vocabulary) of the ``count`` most frequent training IDs, ties to
    the smaller ID, in that order."""
    order = np.lexsort((np.asarray(feature.ids), -np.asarray(feature.counts)))  # count descending, then ID
    return order[:count].astype(np.int64)


class AdaptiveEmbedLookup(TableBackedEmbedding):
    """A training ID holding a row reads it; every other ID, seen or unseen, embeds to the default: a zero
    vector (``zero``, the paper's) or one trainable row shared by all of them (``shared``, row R of the table)."""

    def __init__(
        self,
        vocabulary: np.ndarray,
        rows: int,
        dim: int,
        default: str,
        importance: str,
        decay: float,
        reallocate_every: int | None,
        min_change: float,
        admit_init: str,
        seed: int,
        warm_ranks: torch.Tensor | None = None,
        warm_scores: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.vocabulary = VocabularyIndex(vocabulary)
        self.num_ids, self.rows, self.dim = int(len(vocabulary)), rows, dim
        self.default, self.importance, self.decay = default, importance, decay
        self.reallocate_every, self.min_change, self.admit_init = reallocate_every, min_change, admit_init
        self.seed = int(seed)
        self.table = EmbeddingTable(rows + (1 if default == "shared" else 0), dim, seed=seed)
        self.register_buffer("row_of_id", torch.full((self.num_ids,), rows, dtype=row_index_dtype(rows)))
        self.register_buffer("importance_scores", torch.zeros(self.num_ids, dtype=torch.float32))
        self.register_buffer("reallocations", torch.zeros((), dtype=torch.int64))
        self._batches = 0  # training batches since the last reallocation (derived, not state)
        if warm_ranks is not None:
            self.row_of_id[warm_ranks] = torch.arange(len(warm_ranks), dtype=self.row_of_id.dtype)
        if warm_scores is not None:
            self.importance_scores.copy_(warm_scores)

    # -- rows ---------------------------------------------------------------------------------------------
    def ranks_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ID's rank in the training vocabulary (clamped into range) and whether it is a training ID."""
        rank = self.vocabulary(ids)
        known = rank < self.num_ids
        return rank.clamp(max=max(self.num_ids - 1, 0)), known

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N]: each ID's row, R for an ID without one (unseen IDs included)."""
        rank, known = self.ranks_of(ids)
        if self.num_ids == 0:
            return torch.full_like(ids, self.rows)
        rows = self.row_of_id[rank].to(torch.int64)
        return torch.where(known, rows, torch.full_like(rows, self.rows))

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The ID's row; R (the default) for every ID without one."""
        return self.rows_of(ids).unsqueeze(1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """One read of the table: the ID's row; with the ``zero`` default, nothing for IDs without a row (their
        bag is empty: a zero vector). In training, a due reallocation runs first, and counts are recorded."""
        if self.training:
            if self.reallocate_every is not None and self._batches >= self.reallocate_every:
                self.reallocate()
            self._batches += 1
            if self.importance == "count":
                self.record(ids, torch.ones(len(ids), device=ids.device))
        rows = self.rows_of(ids)
        if self.default == "shared":
            return [self.table.lookup(rows)]
        held = rows < self.rows
        return [self.table.lookup(rows[held], lengths=held.to(torch.int64))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        embeddings = pooled[0]
        if self.training and self.importance == "gradient" and embeddings.requires_grad:
            embeddings.register_hook(functools.partial(self._record_gradients, ids.detach()))
        return embeddings

    # -- importance and reallocation ----------------------------------------------------------------------
    def _record_gradients(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Each occurrence adds its embedding's gradient norm, scaled so that a batch's scores average 1 (as the
        CAFE authors' AdaEmbed code does): summed over occurrences, access frequency times gradient magnitude."""
        with torch.no_grad():
            norms = grad.detach().norm(dim=1)
            total = norms.sum()
            if bool(total > 0):
                self.record(ids, norms * (len(norms) / total))

    @torch.no_grad()
    def record(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Add each occurrence's score to its training ID's importance (unseen IDs have none)."""
        if self.num_ids == 0:
            return
        rank, known = self.ranks_of(ids)
        self.importance_scores.index_add_(0, rank[known], scores[known].to(torch.float32))

    def most_important(self, held: torch.Tensor) -> torch.Tensor:
        """bool [n]: the R training IDs of highest importance, among those with some importance or a row; among
        IDs tied at the cut, those holding a row first, then the lower rank."""
        scores = self.importance_scores
        eligible = (scores > 0) | held
        if int(eligible.sum()) <= self.rows:
            return eligible
        ranked = torch.where(eligible, scores, torch.full_like(scores, -1.0))
        cutoff = torch.kthvalue(ranked, self.num_ids - self.rows + 1).values  # the R-th largest
        chosen = ranked > cutoff
        tied = ranked == cutoff
        candidates = torch.cat([torch.nonzero(tied & held).flatten(), torch.nonzero(tied & ~held).flatten()])
        chosen[candidates[: self.rows - int(chosen.sum())]] = True
        return chosen

    @torch.no_grad()
    def reallocate(self) -> int:
        """Give the rows to the R most important training IDs, if more than ``min_change``·R of them lack one:
        evicted IDs lose their rows (and embed to the default), admitted IDs take the freed rows, each row
        starting afresh (``random``: drawn as the table's rows were) or from the embedding the ID had
        (``default``: zero, or the shared row). The number of IDs admitted."""
        self._batches = 0
        held = self.row_of_id != self.rows
        chosen = self.most_important(held)
        admitted = torch.nonzero(chosen & ~held).flatten()
        if len(admitted) == 0 or len(admitted) <= self.min_change * self.rows:
            return 0
        self.row_of_id[held & ~chosen] = self.rows
        used = torch.zeros(self.rows, dtype=torch.bool, device=self.row_of_id.device)
        used[self.row_of_id[self.row_of_id != self.rows].to(torch.int64)] = True
        free = torch.nonzero(~used).flatten()[: len(admitted)]
        self.row_of_id[admitted] = free.to(self.row_of_id.dtype)
        weight = self.table.weight
        if self.admit_init == "random":
            seed = (self.seed * 1_000_003 + int(self.reallocations)) % 2**62
            weight[free] = self.table.init.weights(len(free), self.dim, seed).to(weight.device)
        else:
            weight[free] = weight[self.rows].clone() if self.default == "shared" else 0.0
        self.reallocations += 1
        return len(admitted)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Reallocate, then decay every importance."""
        self.reallocate()
        self.importance_scores.mul_(self.decay)

    def extra_repr(self) -> str:
        return (f"num_ids={self.num_ids}, rows={self.rows}, default={self.default}, importance={self.importance}, "
                f"decay={self.decay}, reallocate_every={self.reallocate_every}, min_change={self.min_change}, "
                f"admit_init={self.admit_init}")


class AdaptiveEmbed(Scheme):
    """AdaEmbed: R rows (solved from the budget) held by the R training IDs of highest importance (accesses x
    gradient norms, decayed), reallocated in training; other IDs embed to a default (zero) vector."""

    summary = "AdaEmbed (Lai et al. 2023): the R most important IDs (frequency x gradient) hold rows, reallocated"
    unseen = "collided"
    # Each training ID's row index and importance (5-8 bytes) are paid first: budgets below about 1/27 of a d = 32
    # table hold no rows at all (BudgetTooSmall), so budgets of 1/64 and below cannot be filled.
    fills_budget = False

    def __init__(
        self,
        rows: int | None = None,
        default: Literal["zero", "shared"] = "zero",
        importance: Literal["gradient", "count"] = "gradient",
        decay: float = 0.8,
        reallocate_every: int | None = None,
        min_change: float = 0.05,
        admit_init: Literal["random", "default"] = "random",
        warm_start: bool = True,
    ) -> None:
        if rows is not None and not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"rows must be in [1, {MAX_ROWS}] or unset (solved from the budget), got {rows}")
        if default not in DEFAULTS:
            raise ValueError(f"default must be one of {', '.join(DEFAULTS)}, got {default!r}")
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1] (importance is multiplied by it after each epoch), got {decay}")
        if reallocate_every is not None and not 1 <= reallocate_every <= MAX_REALLOCATE_EVERY:
            raise ValueError(f"reallocate_every must be in [1, {MAX_REALLOCATE_EVERY}] (training batches) or unset "
                             f"(after each epoch only), got {reallocate_every}")
        if not 0.0 <= min_change < 1.0:
            raise ValueError(f"min_change must be in [0, 1) (a share of the rows), got {min_change}")
        if admit_init not in ADMIT_INITS:
            raise ValueError(f"admit_init must be one of {', '.join(ADMIT_INITS)}, got {admit_init!r}")
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be true or false, got {warm_start!r}")
        self.rows, self.default, self.importance, self.decay = rows, default, importance, decay
        self.reallocate_every, self.min_change, self.warm_start = reallocate_every, min_change, warm_start
        self.admit_init = admit_init

    def size_bytes(self, feature: FeatureSpec, rows: int) -> int:
        dictionary = VocabularyIndex.size_bytes(feature.ids)
        return adaptive_embed_size_bytes(feature.num_ids, rows, feature.dim, dictionary, self.default == "shared")

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        if feature.num_ids == 0:
            raise ValueError(f"feature '{feature.name}': adaptive-embed needs at least one training ID")

        def size_of(rows: int) -> int:
            return self.size_bytes(feature, rows)

        lowest = self.rows or 1
        if size_of(lowest) > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, size_of(lowest), f"{lowest} row(s), and a row index and "
                                 f"an importance for each of the {feature.num_ids:,} training IDs")
        # more rows than training IDs would never be held
        rows = self.rows or largest_fitting(size_of, 1, min(feature.num_ids, MAX_ROWS), budget_bytes)
        assert rows is not None
        params = dict(self.get_params(), rows=rows)
        notes = {
            "per_id": f"{feature.num_ids:,} training IDs x ({row_index_dtype(rows)} row index + fp32 importance)",
            "held": f"{rows / feature.num_ids:.2%} of the training IDs hold a row",
        }
        return SchemePlan(self.name, params, size_of(rows), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        warm_ranks = warm_scores = None
        if p["warm_start"]:  # the most frequent IDs hold the rows, and every ID's importance starts at its count
            warm_ranks = torch.as_tensor(most_frequent_ranks(feature, p["rows"]))
            warm_scores = torch.as_tensor(np.asarray(feature.counts, dtype=np.float32))
        return AdaptiveEmbedLookup(
            np.asarray(feature.ids, dtype=np.int64), p["rows"], feature.dim, p["default"], p["importance"],
            p["decay"], p["reallocate_every"], p["min_change"], p["admit_init"], seed, warm_ranks, warm_scores,
        )
