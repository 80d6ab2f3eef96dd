"""``dhe-hybrid``: the hybrid the DHE paper leaves to future work (Kang et al., KDD 2021, §6) — a dedicated row for
each of the most frequent training IDs, found through an exact ID dictionary, and a Deep Hash Embedding network for
every other ID, seen or unseen; both sized from one budget.

The DHE part is the registered ``dhe`` scheme itself, created through the public registry and planned for the
long-tail IDs within what the head rows leave, so every DHE option means here what it means there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    BudgetTooSmall,
    ConfigError,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    VocabularyIndex,
    create_scheme,
    largest_fitting,
)

#: the scheme that embeds the long tail
TAIL_SCHEME = "dhe"
#: the share of the budget for the head rows when neither ``head_share`` nor ``head_ids`` is given
DEFAULT_HEAD_SHARE = 0.5


def ranked_ids(feature: FeatureSpec) -> np.ndarray:
    """The training IDs, most frequent first, ties broken by the smaller ID (as ``hybrid-hashing`` ranks them)."""
    order = np.lexsort((feature.ids, -np.asarray(feature.counts)))  # the last key first: count descending
    return np.asarray(feature.ids, dtype=np.int64)[order]


def head_ids_of(ranked: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` most frequent IDs of ``ranked``, sorted by ID (the dictionary's order)."""
    return np.sort(ranked[:count])


def tail_feature(feature: FeatureSpec, head: np.ndarray) -> FeatureSpec:
    """``feature`` without the ``head`` IDs: the training IDs (and counts) the DHE network embeds."""
    keep = ~np.isin(feature.ids, head)
    return FeatureSpec(
        f"{feature.name}:tail", np.asarray(feature.ids, dtype=np.int64)[keep], np.asarray(feature.counts)[keep],
        feature.dim,
    )


def head_size_bytes(head: np.ndarray, dim: int) -> int:
    """A dedicated fp32 row per head ID, and the head's ID dictionary in its narrowest exact encoding."""
    return len(head) * dim * FLOAT_BYTES + VocabularyIndex.size_bytes(head)


class HeadTailEmbedding(TableBackedEmbedding):
    """Head IDs -> their own row of ``head`` (through the dictionary ``head_index``); every other ID -> ``tail``.

    The head table is read (and trained) only for head IDs and the tail network runs only on the other IDs; each
    ID's embedding comes from one branch alone.
    """

    def __init__(self, head_ids: np.ndarray, dim: int, seed: int, tail: nn.Module) -> None:
        super().__init__()
        self.dim, self.num_head = int(dim), int(len(head_ids))
        self.head_index = VocabularyIndex(head_ids)
        # The table exists only when some ID is in the head (a table needs a row).
        self.head = EmbeddingTable(self.num_head, dim, seed=seed) if self.num_head else None
        self.tail = tail

    def head_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ID's row in the head table (``num_head`` for others) and whether it is a head ID."""
        rows = self.head_index(ids)
        return rows, rows < self.num_head

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The DHE network's tuple (its hash values) for a tail ID; (-1 - row, -1, ...) for a head ID, a tuple no
        tail ID has (hash values are never negative)."""
        tuples = self.tail.index_tuples(ids)
        rows, head = self.head_rows(ids)
        dedicated = torch.full_like(tuples, -1)
        dedicated[:, 0] = -1 - rows
        return torch.where(head.unsqueeze(1), dedicated, tuples)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        if self.head is None:
            return []
        rows, head = self.head_rows(ids)
        return [self.head.lookup(rows[head], lengths=head.to(torch.int64))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            return self.tail(ids)
        _, head = self.head_rows(ids)
        out = pooled[0]  # a tail ID pooled no row: a zero vector, to which its DHE embedding is added
        tail_positions = torch.nonzero(~head).squeeze(1)
        if tail_positions.numel() == 0:
            return out
        if self.training and tail_positions.numel() == 1 < ids.numel():
            # BatchNorm cannot train on one row: the lone tail ID runs with the batch's head IDs, whose rows are
            # dropped (they only lend the batch statistics).
            vectors = self.tail(ids)[tail_positions]
        else:
            vectors = self.tail(ids[tail_positions])
        return out.index_add(0, tail_positions, vectors.to(out.dtype))


class DHEHybrid(Scheme):
    """Dedicated rows for the most frequent training IDs and a Deep Hash Embedding network for the rest; the head
    takes ``head_share`` of the budget (or exactly ``head_ids`` rows), the network's width is solved from what is
    left, and what the network's width step leaves goes to more head rows (unless ``head_share`` is 0)."""

    summary = "DHE hybrid (Kang et al. 2021, future work): full rows for the most frequent IDs, DHE for the long tail"
    unseen = "generated"

    def __init__(
        self,
        head_share: float | None = None,
        head_ids: int | None = None,
        num_hashes: int | None = None,
        num_buckets: int | None = None,
        hidden_layers: int | None = None,
        width: int | None = None,
        activation: str | None = None,
        batch_norm: bool | None = None,
        encoding: str | None = None,
        architecture: str | None = None,
        fourier_scale: float | None = None,
        cache_known_ids: bool | None = None,
        compile: bool | None = None,
    ) -> None:
        if head_share is not None and head_ids is not None:
            raise ValueError(
                f"give head_share or head_ids, not both (got head_share={head_share}, head_ids={head_ids})"
            )
        if head_share is not None and not 0.0 <= head_share < 1.0:
            raise ValueError(f"head_share must be in [0, 1) (the DHE network needs some budget), got {head_share}")
        if head_ids is not None and head_ids < 0:
            raise ValueError(f"head_ids must be >= 0, got {head_ids}")
        self.head_share = DEFAULT_HEAD_SHARE if head_share is None and head_ids is None else head_share
        self.head_ids = head_ids
        # Unset DHE parameters keep dhe's own defaults; dhe validates the others.
        given = {
            "num_hashes": num_hashes, "num_buckets": num_buckets, "hidden_layers": hidden_layers, "width": width,
            "activation": activation, "batch_norm": batch_norm, "encoding": encoding, "architecture": architecture,
            "fourier_scale": fourier_scale, "cache_known_ids": cache_known_ids, "compile": compile,
        }
        try:
            self.tail_scheme: Scheme = create_scheme(
                TAIL_SCHEME, **{key: value for key, value in given.items() if value is not None}
            )
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix(f"scheme '{TAIL_SCHEME}': ")) from None

    def _plan_tail(self, feature: FeatureSpec, head: np.ndarray, budget_bytes: int) -> SchemePlan:
        """The DHE network for the IDs outside ``head`` within what the head leaves of ``budget_bytes``; a budget too
        small for it is this scheme's BudgetTooSmall, its minimum the head's bytes and the smallest network."""
        head_bytes = head_size_bytes(head, feature.dim)
        try:
            return self.tail_scheme.plan(tail_feature(feature, head), budget_bytes - head_bytes)
        except BudgetTooSmall as exc:
            raise BudgetTooSmall(
                self.name, budget_bytes, head_bytes + exc.minimum_bytes,
                f"{len(head):,} head rows ({head_bytes:,} bytes) and the smallest DHE network ({exc.minimum_bytes:,})",
            ) from None

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        ranked = ranked_ids(feature)

        def head_bytes(count: int) -> int:
            return head_size_bytes(head_ids_of(ranked, count), feature.dim)

        # The head's size grows with its count up to the rare step where the head IDs become a run and the
        # dictionary shrinks; a search over it may then stop short of the largest count, never over the bytes.
        if self.head_ids is not None:
            count = min(self.head_ids, feature.num_ids)
            tail = self._plan_tail(feature, head_ids_of(ranked, count), budget_bytes)
        else:
            assert self.head_share is not None
            count = largest_fitting(head_bytes, 0, feature.num_ids, int(self.head_share * budget_bytes)) or 0
            try:
                tail = self._plan_tail(feature, head_ids_of(ranked, count), budget_bytes)
            except BudgetTooSmall as exc:  # the DHE network keeps the rest of the budget: fewer head rows
                network_minimum = exc.minimum_bytes - head_bytes(count)
                count = largest_fitting(head_bytes, 0, count, budget_bytes - network_minimum) or 0
                tail = self._plan_tail(feature, head_ids_of(ranked, count), budget_bytes)
            # What the network's width step leaves goes to more head rows (the network then embeds fewer IDs);
            # head_share 0 is plain DHE, without a head.
            grown = largest_fitting(head_bytes, count, feature.num_ids, budget_bytes - tail.size_bytes)
            if self.head_share > 0 and grown is not None and grown > count:
                try:
                    tail, count = self._plan_tail(feature, head_ids_of(ranked, grown), budget_bytes), grown
                except BudgetTooSmall:  # an ID-range encoding whose width changed with the tail: keep the head
                    pass
        head = head_ids_of(ranked, count)
        params = dict(
            self.get_params(),
            head_share=self.head_share,  # the default's value where neither head_share nor head_ids was given
            head_rows=count,
            dhe=tail.params,
            dhe_size_bytes=tail.size_bytes,
            dhe_budget_bytes=tail.budget_bytes,
        )
        notes = {
            "head_bytes": head_size_bytes(head, feature.dim),
            "dictionary": VocabularyIndex(head).encoding if count else "none",
            "head_share_used": head_size_bytes(head, feature.dim) / budget_bytes if budget_bytes else 0.0,
            "dhe": tail.notes,
        }
        return SchemePlan(self.name, params, head_size_bytes(head, feature.dim) + tail.size_bytes, budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p: dict[str, Any] = plan.params
        head = head_ids_of(ranked_ids(feature), p["head_rows"])
        tail_plan = SchemePlan(TAIL_SCHEME, p["dhe"], p["dhe_size_bytes"], p["dhe_budget_bytes"])
        # The head table draws from ``seed``; the DHE network from seed + 1 (its hashes) and seed + 2 (its weights).
        tail = self.tail_scheme.build(tail_feature(feature, head), tail_plan, seed + 1)
        return HeadTailEmbedding(head, feature.dim, seed, tail)
