"""``magnitude-pruning`` and ``pep`` (Liu et al., ICLR 2021): a table trained dense and pruned to the K values a sparse
format stores within the budget; both build on :class:`PrunedEmbedding` (docs/schemes.md, "Pruned tables")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    TableInit,
    VocabularyIndex,
    largest_fitting,
)

#: how the kept values' places are stored: a bit per value of the table, a column index per value and a count per
#: row, or a row and a column index per value
FORMATS = ("bitmap", "csr", "coo")
#: which rows the trained table has: one per training ID (a dictionary) or hashed; "auto" chooses per plan
ROW_KINDS = ("auto", "per-id", "hashed")
SCHEDULES = ("one-shot", "iterative")
THRESHOLDS = ("feature", "dimension", "row", "element")
MAX_EPOCHS = 1000
#: state_dict keys of each format (under the module's prefix), values first
_FORMAT_KEYS = {
    "bitmap": ("kept_values", "kept_bitmap"),
    "csr": ("kept_values", "kept_columns", "kept_row_counts"),
    "coo": ("kept_values", "kept_rows", "kept_columns"),
}
#: unsigned integers of each width, held in the bits of the signed type where torch has no unsigned one
_UNSIGNED_TYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def unsigned_width(largest: int) -> int:
    """Bytes of the narrowest unsigned integer (1, 2, 4 or 8) that holds 0..``largest``."""
    return next((width for width in (1, 2, 4) if largest < 1 << (8 * width)), 8)


def to_unsigned(values: torch.Tensor, width: int) -> torch.Tensor:
    """int64 ``values`` in [0, 2^(8·width)) stored in ``width`` bytes each (uint8, else the two's-complement bits of
    int16/int32: 65,535 is stored as int16 -1)."""
    if width == 1:
        return values.to(torch.uint8)
    if width == 8:
        return values.to(torch.int64, copy=True)
    half = 1 << (8 * width - 1)
    return torch.where(values >= half, values - 2 * half, values).to(_UNSIGNED_TYPES[width])


def from_unsigned(stored: torch.Tensor) -> torch.Tensor:
    """The int64 values :func:`to_unsigned` stored."""
    values = stored.to(torch.int64)
    if stored.dtype in (torch.int16, torch.int32):
        values = values & ((1 << (8 * stored.element_size())) - 1)
    return values


def keep_largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask (shaped like ``scores``) of the ``count`` largest scores; ties at the cut go to the lowest flat
    index, so the mask is deterministic and holds exactly min(count, scores.numel()) entries."""
    flat = scores.reshape(-1)
    total = flat.numel()
    if count >= total:
        return torch.ones_like(scores, dtype=torch.bool)
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    cut = torch.kthvalue(flat, total - count + 1).values  # the count-th largest score
    keep = flat > cut
    ties = torch.nonzero(flat == cut).squeeze(1)
    keep[ties[: count - int(keep.sum())]] = True
    return keep.view(scores.shape)


def cubic_schedule(total: int, kept: int, steps: int) -> list[int]:
    """Values kept after each of ``steps`` pruning steps, from ``total`` down to ``kept``: Zhu & Gupta's (2017)
    gradual schedule, sparsity s_j = s_f·(1 − (1 − j/n)³) — fast at first, slow towards the end; non-increasing,
    the last exactly ``kept``."""
    return [kept + math.ceil((total - kept) * (1 - step / steps) ** 3) for step in range(1, steps + 1)]


@dataclass(frozen=True)
class SparseLayout:
    """How ``kept`` values of a ``rows`` × ``dim`` table are stored: their fp32 values in row-major order, and

    - ``bitmap``: a bit per value of the table (rows·dim bits, packed little-endian in bytes);
    - ``csr``: each value's column in the narrowest unsigned type that holds dim − 1, and each row's count of values
      in the narrowest that holds dim (the rows' offsets are the counts' prefix sums, derived, not stored);
    - ``coo``: each value's row and column, each in the narrowest unsigned type that holds it.
    """

    format: str
    rows: int
    dim: int
    kept: int

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.kept <= self.rows * self.dim:
            raise ValueError(f"kept must be in [0, rows·dim = {self.rows * self.dim}], got {self.kept}")

    @staticmethod
    def bytes_of(format: str, rows: int, dim: int, kept: int) -> int:
        """Bytes of ``kept`` values of a ``rows`` × ``dim`` table stored in ``format``."""
        values = kept * FLOAT_BYTES
        if format == "bitmap":
            return values + -(-rows * dim // 8)
        if format == "csr":
            return values + rows * unsigned_width(dim) + kept * unsigned_width(dim - 1)
        return values + kept * (unsigned_width(rows - 1) + unsigned_width(dim - 1))

    @property
    def size_bytes(self) -> int:
        return self.bytes_of(self.format, self.rows, self.dim, self.kept)

    @property
    def keys(self) -> tuple[str, ...]:
        """The names of its tensors in a state_dict."""
        return _FORMAT_KEYS[self.format]

    def encode(self, positions: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of the values at flat ``positions`` (row·dim + column, ascending)."""
        rows, columns = positions // self.dim, positions % self.dim
        stored = {"kept_values": values.detach().to(torch.float32, copy=True)}
        if self.format == "bitmap":
            packed = torch.zeros(-(-self.rows * self.dim // 8), dtype=torch.int64, device=positions.device)
            packed.index_add_(0, positions // 8, torch.ones_like(positions) << (positions % 8))  # distinct bits
            stored["kept_bitmap"] = packed.to(torch.uint8)
        elif self.format == "csr":
            stored["kept_columns"] = to_unsigned(columns, unsigned_width(self.dim - 1))
            counts = torch.bincount(rows, minlength=self.rows)
            stored["kept_row_counts"] = to_unsigned(counts, unsigned_width(self.dim))
        else:
            stored["kept_rows"] = to_unsigned(rows, unsigned_width(self.rows - 1))
            stored["kept_columns"] = to_unsigned(columns, unsigned_width(self.dim - 1))
        return stored

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each stored tensor's shape and dtype."""
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"kept_values": ((self.kept,), torch.float32)}
        column = _UNSIGNED_TYPES[unsigned_width(self.dim - 1)]
        if self.format == "bitmap":
            shapes["kept_bitmap"] = ((-(-self.rows * self.dim // 8),), torch.uint8)
        elif self.format == "csr":
            shapes["kept_columns"] = ((self.kept,), column)
            shapes["kept_row_counts"] = ((self.rows,), _UNSIGNED_TYPES[unsigned_width(self.dim)])
        else:
            shapes["kept_rows"] = ((self.kept,), _UNSIGNED_TYPES[unsigned_width(self.rows - 1)])
            shapes["kept_columns"] = ((self.kept,), column)
        return shapes

    def decode(self, stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions ascending, values) of stored tensors; ValueError where they are not this layout's."""
        for key, (shape, dtype) in self.expected().items():
            tensor = stored[key]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"'{key}' of a {self.format} layout of {self.kept} values in {self.rows}x{self.dim} must be "
                    f"{dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
                )
        if self.format == "bitmap":
            bits = (stored["kept_bitmap"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
            positions = torch.nonzero(bits.reshape(-1)).squeeze(1)
            if len(positions) != self.kept or (len(positions) and int(positions[-1]) >= self.rows * self.dim):
                raise ValueError(f"the bitmap marks {len(positions)} values, not {self.kept} within the table")
        else:
            columns = from_unsigned(stored["kept_columns"])
            if self.format == "csr":
                counts = from_unsigned(stored["kept_row_counts"])
                if int(counts.sum()) != self.kept or bool((counts > self.dim).any()):
                    raise ValueError(f"the row counts add up to {int(counts.sum())}, not {self.kept} values")
                rows = torch.repeat_interleave(torch.arange(self.rows), counts)
            else:
                rows = from_unsigned(stored["kept_rows"])
            if bool((columns >= self.dim).any()) or bool((rows >= self.rows).any()):
                raise ValueError(f"a kept value lies outside the {self.rows}x{self.dim} table")
            positions = rows * self.dim + columns
            if bool((positions[1:] <= positions[:-1]).any()):
                raise ValueError("the kept values are not in ascending row-major order, each once")
        return positions, stored["kept_values"]

    @classmethod
    def best(cls, rows: int, dim: int, budget_bytes: int, overhead: int = 0) -> SparseLayout | None:
        """The layout keeping most values of a ``rows`` × ``dim`` table in ``budget_bytes`` beside ``overhead`` bytes
        (ties: the smaller, then the earlier format); None when no format fits one value."""
        best: SparseLayout | None = None
        for format in FORMATS:
            kept = largest_fitting(
                lambda k, f=format: overhead + cls.bytes_of(f, rows, dim, k), 1, rows * dim, budget_bytes
            )
            if kept is None:
                continue
            layout = cls(format, rows, dim, kept)
            if best is None or (kept, -layout.size_bytes) > (best.kept, -best.size_bytes):
                best = layout
        return best


@dataclass
class KeptValues:
    """The stored form in memory: ``values`` at flat ``positions`` (ascending), and each row's first entry."""

    positions: torch.Tensor
    values: torch.Tensor
    row_starts: torch.Tensor

    @classmethod
    def of(cls, positions: torch.Tensor, values: torch.Tensor, rows: int, dim: int) -> KeptValues:
        counts = torch.bincount(positions // dim, minlength=rows)
        starts = torch.zeros(rows + 1, dtype=torch.int64, device=positions.device)
        torch.cumsum(counts, 0, out=starts[1:])
        return cls(positions, values.detach().to(torch.float32), starts)

    def to(self, device: torch.device) -> KeptValues:
        return KeptValues(self.positions.to(device), self.values.to(device), self.row_starts.to(device))

    def embed(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """[N, dim]: each row's kept values, zero elsewhere (a vectorised gather of the rows' entries)."""
        out = torch.zeros(len(rows), dim, device=self.values.device)
        starts = self.row_starts[rows]
        counts = self.row_starts[rows + 1] - starts
        total = int(counts.sum())
        if total == 0:
            return out
        owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts, output_size=total)
        before = torch.cumsum(counts, 0) - counts  # entries of earlier IDs in the gathered list
        entry = starts[owner] + torch.arange(total, device=rows.device) - before[owner]
        out[owner, self.positions[entry] % dim] = self.values[entry]
        return out


class ShadowTable(EmbeddingTable):
    """A table trained like any other, but not stored: its module's state holds the sparse form instead."""

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix))


class PrunedEmbedding(TableBackedEmbedding):
    """Rows of a dense R × d shadow table (one per training ID through the ID dictionary, an out-of-vocabulary row
    last; or hashed rows), of which only ``layout.kept`` values are stored.

    In training the shadow's rows are read through the model's table collection and made into embeddings by the
    subclass (masked, or soft-thresholded). Evaluation reads only the stored form: the K values of largest magnitude
    of the current effective table within the mask (:meth:`kept_values`), cached until the next training read. The
    state_dict holds exactly that form (``layout.keys``, plus the ID dictionary or the hash seed); loading it writes
    the K values into the shadow (zeros elsewhere), makes their places the mask, and embeds exactly as saved.
    """
    #: the stored form is this module's own (see the docstring): the precisions axis does not apply
    post_training_quantizable = False

    def __init__(self, layout: SparseLayout, vocabulary: np.ndarray | None, seed: int) -> None:
        super().__init__()
        self.layout, self.num_rows, self.dim, self.kept = layout, layout.rows, layout.dim, layout.kept
        if vocabulary is not None:
            if len(vocabulary) + 1 != layout.rows:
                raise ValueError(f"per-ID rows are the {len(vocabulary)} training IDs and one OOV row, not "
                                 f"{layout.rows}")
            self.vocabulary = VocabularyIndex(vocabulary)  # an unseen ID's rank is n: the last (OOV) row
        else:
            self.hash = HashFamily(1, layout.rows, seed=seed)
        self.values = ShadowTable(layout.rows, layout.dim, seed=seed + 1)
        #: bool [R, d]: the values still alive (None: all of them)
        self.register_buffer("mask", None, persistent=False)
        self._kept: KeptValues | None = None
        self._kept_version: tuple[int, ...] | None = None
        self._pinned = False  # the kept values came from a state_dict: they hold until training resumes
        self._rows_of: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- rows ---------------------------------------------------------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "vocabulary"):
            return self.vocabulary(ids)
        return self.hash(ids)[:, 0]

    def _cached_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids``, computed once for the lookups and the combine of one forward."""
        if self._rows_of is None or self._rows_of[0] is not ids:
            self._rows_of = (ids, self.rows(ids))
        return self._rows_of[1]

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).unsqueeze(1)

    # -- forward ------------------------------------------------------------------------------------------
    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Training: the shadow rows of the IDs (and the subclass's threshold rows). Evaluation reads the stored
        form instead, so every table gets empty bags (the same reads, nothing pooled)."""
        rows = self._cached_rows(ids)
        empty = torch.zeros_like(rows)
        if not self.training:
            return [table.lookup(rows[:0], lengths=empty) for table in (self.values, *self.threshold_tables())]
        self.before_training_read()
        self._stale()
        thresholds = [
            table.lookup(rows) if self.thresholds_active() else table.lookup(rows[:0], lengths=empty)
            for table in self.threshold_tables()
        ]
        return [self.values.lookup(rows), *thresholds]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = self._cached_rows(ids)
        self._rows_of = None
        if not self.training:
            return self.kept_values().embed(rows, self.dim)
        return self.training_embeddings(rows, pooled)

    # -- what subclasses define -------------------------------------------------------------------------
    def threshold_tables(self) -> list[EmbeddingTable]:
        """Tables read beside the shadow (PEP's per-row or per-value thresholds)."""
        return []

    def thresholds_active(self) -> bool:
        """Whether training reads the threshold tables now (else they get empty bags)."""
        return False

    def before_training_read(self) -> None:
        """Called before each training read (e.g. to apply a pruning step due before training starts)."""

    def training_embeddings(self, rows: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embeddings [N, d] in training from the pooled shadow rows (and threshold rows): the masked rows."""
        return self.masked(rows, pooled[0])

    def effective_table(self) -> torch.Tensor:
        """The values [R, d] the module embeds now (before the cut to K): the shadow within the mask."""
        return self.shadow()

    def after_load(self) -> None:
        """Called once a state_dict has set the shadow and the mask."""

    # -- the mask and the shadow ------------------------------------------------------------------------
    def shadow(self) -> torch.Tensor:
        """The shadow's rows [R, d] (detached; writes go through to the table, wherever a collection holds it)."""
        return self.values.weight.detach()

    def masked(self, rows: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return pooled
        return pooled.masked_fill(~self.mask[rows], 0.0)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Keep only the values of ``mask`` alive, and zero the others in the shadow."""
        self.mask = mask
        self.zero_pruned()

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Zero the shadow outside the mask (a table optimizer's momentum may have moved pruned values since; the
        forward ignores them either way)."""
        if self.mask is not None:
            self.shadow().masked_fill_(~self.mask, 0.0)
        self._stale()

    # -- the stored form ----------------------------------------------------------------------------------
    def _stale(self) -> None:
        self._kept, self._pinned = None, False

    def _versions(self) -> tuple[int, ...]:
        """Version counters of every tensor the effective table is computed from (in-place writes bump them)."""
        tables = (self.values, *self.threshold_tables())
        own = tuple(parameter._version for parameter in self.parameters(recurse=False))
        return own + tuple(table.weight._version for table in tables)

    @torch.no_grad()
    def kept_values(self) -> KeptValues:
        """The stored form: the K values of largest magnitude of :meth:`effective_table` within the mask (ties to the
        lowest row-major position), recomputed after any training read or change of the weights."""
        device = self.values.weight.device
        if self._kept is not None and (self._pinned or self._kept_version == self._versions()):
            if self._kept.values.device != device:
                self._kept = self._kept.to(device)
            return self._kept
        effective = self.effective_table()
        if self.mask is not None:
            effective = effective.masked_fill(~self.mask, 0.0)
            scores = torch.where(self.mask, effective.abs(), -1.0)  # a pruned value is never kept before a live one
        else:
            scores = effective.abs()
        positions = torch.nonzero(keep_largest(scores, self.kept).reshape(-1)).squeeze(1)
        self._kept = KeptValues.of(positions, effective.reshape(-1)[positions], self.num_rows, self.dim)
        self._kept_version, self._pinned = self._versions(), False
        return self._kept

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # Only the stored form: not the shadow (its table saves nothing), the mask or PEP's thresholds.
        kept = self.kept_values()
        for key, tensor in self.layout.encode(kept.positions, kept.values).items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        keys = self.layout.keys
        if strict:
            for key in state_dict:
                if key.startswith(prefix):
                    name = key[len(prefix):].split(".", 1)
                    if (len(name) > 1 and name[0] not in self._modules) or (len(name) == 1 and name[0] not in keys):
                        unexpected_keys.append(key)
        absent = [prefix + key for key in keys if prefix + key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        device = self.values.weight.device
        try:
            positions, values = self.layout.decode({key: state_dict[prefix + key].cpu() for key in keys})
        except ValueError as exc:
            error_msgs.append(f"While loading the kept values of {type(self).__name__} at '{prefix}': {exc}")
            return
        positions, values = positions.to(device), values.to(device)
        rows, columns = positions // self.dim, positions % self.dim
        mask = torch.zeros(self.num_rows, self.dim, dtype=torch.bool, device=device)
        mask[rows, columns] = True
        with torch.no_grad():
            shadow = self.shadow()
            shadow.zero_()
            shadow[rows, columns] = values
        self.mask = mask
        self.after_load()
        self._kept, self._pinned = KeptValues.of(positions, values, self.num_rows, self.dim), True

    def extra_repr(self) -> str:
        rows = "per-id" if hasattr(self, "vocabulary") else "hashed"
        alive = "all" if self.mask is None else f"{int(self.mask.sum()):,}"
        return (f"rows={self.num_rows:,} ({rows}), dim={self.dim}, kept={self.kept:,} ({self.layout.format}), "
                f"alive={alive}")


class MagnitudePrunedEmbedding(PrunedEmbedding):
    """Magnitude pruning: after epoch e_j of each step j, the mask keeps the n_j values of largest magnitude among
    those alive (``steps``: (e_j, n_j), n_j non-increasing to K); the forward multiplies by the mask."""

    def __init__(
        self, layout: SparseLayout, vocabulary: np.ndarray | None, seed: int, steps: Sequence[tuple[int, int]]
    ) -> None:
        super().__init__(layout, vocabulary, seed)
        self.steps = tuple((int(epoch), int(count)) for epoch, count in steps)
        self.steps_done = 0

    def before_training_read(self) -> None:
        self.prune_until(0)  # a step of epoch 0 (no warm-up) prunes the initial values before training

    @torch.no_grad()
    def prune_until(self, epoch: int) -> None:
        """Take the pruning steps due by the end of ``epoch`` (the last of them sets the mask)."""
        due = [count for step_epoch, count in self.steps[self.steps_done:] if step_epoch <= epoch]
        if not due:
            return
        self.steps_done += len(due)
        shadow = self.shadow()
        scores = shadow.abs() if self.mask is None else torch.where(self.mask, shadow.abs(), -1.0)
        self.set_mask(keep_largest(scores, due[-1]))

    def on_epoch_end(self, epoch: int) -> None:
        self.prune_until(epoch)
        self.zero_pruned()

    def after_load(self) -> None:
        self.steps_done = len(self.steps)  # the loaded mask is final: K values


class PEPEmbedding(PrunedEmbedding):
    """PEP: embedding = sign(v)·ReLU(|v| − sigmoid(s)) with learnable thresholds s (one for the feature, one per
    dimension, per row or per value) while searching; then the mask of surviving values (at most K, the largest
    |v|), the shadow rewound to its initial values within it, and retraining with the mask."""

    def __init__(
        self,
        layout: SparseLayout,
        vocabulary: np.ndarray | None,
        seed: int,
        threshold: str,
        threshold_init: float,
        search_epochs: int,
        rewind: bool,
    ) -> None:
        super().__init__(layout, vocabulary, seed)
        self.threshold, self.search_epochs, self.rewind = threshold, search_epochs, rewind
        self.searching = True
        #: survivors when the search ended (before the cut to K), and after which epoch; None while searching
        self.search_result: tuple[int, int] | None = None
        if threshold in ("feature", "dimension"):
            self.threshold_weight = nn.Parameter(torch.full((1 if threshold == "feature" else layout.dim,),
                                                            float(threshold_init)))
        else:
            # Per row or per value: a table beside the shadow, read with the same rows (and trained sparsely).
            width = 1 if threshold == "row" else layout.dim
            self.thresholds = ShadowTable(layout.rows, width, seed=seed + 2, init=TableInit("normal", std=0.0),
                                          auxiliary=True)
            with torch.no_grad():
                self.thresholds.weight.fill_(float(threshold_init))

    def threshold_tables(self) -> list[EmbeddingTable]:
        return [self.thresholds] if hasattr(self, "thresholds") else []

    def thresholds_active(self) -> bool:
        return self.searching

    @staticmethod
    def soft_threshold(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.sign(values) * torch.relu(values.abs() - torch.sigmoid(thresholds))

    def _all_thresholds(self) -> torch.Tensor:
        """s for the whole table (broadcastable to [R, d])."""
        if hasattr(self, "thresholds"):
            return self.thresholds.weight.detach()
        return self.threshold_weight.detach()

    def training_embeddings(self, rows: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.searching:
            return self.masked(rows, pooled[0])
        thresholds = pooled[1] if hasattr(self, "thresholds") else self.threshold_weight
        return self.soft_threshold(pooled[0], thresholds)

    def effective_table(self) -> torch.Tensor:
        shadow = self.shadow()
        return self.soft_threshold(shadow, self._all_thresholds()) if self.searching else shadow

    @torch.no_grad()
    def end_search(self, epoch: int) -> None:
        """Fix the mask: the values the thresholds leave, cut to the K of largest |v| where more survive; rewind the
        shadow to its initial values (the lottery ticket) or keep the searched ones; stop thresholding."""
        shadow = self.shadow()
        survivors = shadow.abs() > torch.sigmoid(self._all_thresholds())
        count = int(survivors.sum())
        mask = keep_largest(torch.where(survivors, shadow.abs(), -1.0), self.kept) if count > self.kept else survivors
        if self.rewind:
            table = self.values
            shadow.copy_(table.init.weights(table.num_rows, table.dim, table.seed).to(shadow.device))
        self.searching, self.search_result = False, (count, epoch)
        self.set_mask(mask)

    def on_epoch_end(self, epoch: int) -> None:
        """End the search after ``search_epochs``, or earlier once no more than K values survive the thresholds (the
        reference saves its mask when the count of non-zero values reaches the target)."""
        if self.searching:
            with torch.no_grad():
                survivors = int((self.shadow().abs() > torch.sigmoid(self._all_thresholds())).sum())
            if epoch >= self.search_epochs or survivors <= self.kept:
                self.end_search(epoch)
        self.zero_pruned()

    def after_load(self) -> None:
        self.searching = False  # the loaded values are the model: no thresholds apply to them again

    def extra_repr(self) -> str:
        phase = "searching" if self.searching else f"retraining (searched: {self.search_result})"
        return f"{super().extra_repr()}, threshold={self.threshold}, {phase}"


class PrunedScheme(Scheme):
    """What both pruning schemes share: the rows of the trained table and the stored layout, solved from the budget.

    Per-ID rows cost the ID dictionary; hashed rows a seed, their number set so that the K kept values are
    ``hashed_density`` of the table. ``rows="auto"`` takes per-ID rows where they keep at least ``min_density`` of
    their values (unset: 1/√d, at which two embeddings share about one non-zero coordinate, which dot and
    element-wise products of embeddings need), hashed rows otherwise.
    """

    unseen = "collided"

    def _check_rows(self, rows: str, min_density: float | None, hashed_density: float) -> None:
        if rows not in ROW_KINDS:
            raise ValueError(f"rows must be one of {', '.join(ROW_KINDS)}, got {rows!r}")
        if min_density is not None and not 0.0 <= min_density <= 1.0:
            raise ValueError(f"min_density must be in [0, 1] or unset (1/sqrt(dim)), got {min_density}")
        if not 0.0 < hashed_density <= 1.0:
            raise ValueError(f"hashed_density must be in (0, 1], got {hashed_density}")
        self.rows, self.min_density, self.hashed_density = rows, min_density, hashed_density

    def plan_per_id(self, feature: FeatureSpec, budget_bytes: int) -> tuple[SparseLayout, int] | None:
        """(layout, ID dictionary bytes) of a row per training ID and one OOV row; None where not one value fits."""
        dictionary = VocabularyIndex.size_bytes(feature.ids)
        layout = SparseLayout.best(feature.num_ids + 1, feature.dim, budget_bytes, dictionary)
        return None if layout is None else (layout, dictionary)

    def hashed_rows(self, kept: int, dim: int) -> int:
        return min(MERSENNE_PRIME, max(1, math.ceil(kept / (self.hashed_density * dim))))

    def plan_hashed(self, feature: FeatureSpec, budget_bytes: int) -> SparseLayout | None:
        dim = feature.dim
        upper = max(1, min(budget_bytes // FLOAT_BYTES, int(self.hashed_density * dim * MERSENNE_PRIME)))
        best: SparseLayout | None = None
        for format in FORMATS:
            def size_of(kept: int, format: str = format) -> int:
                return ID_BYTES + SparseLayout.bytes_of(format, self.hashed_rows(kept, dim), dim, kept)

            kept = largest_fitting(size_of, 1, upper, budget_bytes)
            if kept is None:
                continue
            layout = SparseLayout(format, self.hashed_rows(kept, dim), dim, kept)
            if best is None or (kept, -layout.size_bytes) > (best.kept, -best.size_bytes):
                best = layout
        return best

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim = feature.dim
        per_id = self.plan_per_id(feature, budget_bytes) if self.rows != "hashed" else None
        notes: dict[str, Any] = {}
        if self.rows == "per-id" and per_id is None:
            minimum = VocabularyIndex.size_bytes(feature.ids) + min(
                SparseLayout.bytes_of(f, feature.num_ids + 1, dim, 1) for f in FORMATS)
            raise BudgetTooSmall(self.name, budget_bytes, minimum, "one kept value, its index and the ID dictionary")
        min_density = self.min_density if self.min_density is not None else dim**-0.5
        per_id_density = per_id[0].kept / (per_id[0].rows * dim) if per_id is not None else 0.0
        if per_id is not None and (self.rows == "per-id" or per_id_density >= min_density):
            layout, index_bytes, kind, unseen = per_id[0], per_id[1], "per-id", "dedicated"
        else:
            if per_id is not None:
                notes["rows"] = (f"hashed: per-ID rows would keep {per_id_density:.2%} of their values, below "
                                 f"min_density {min_density:.2%}")
            hashed = self.plan_hashed(feature, budget_bytes)
            if hashed is None:
                minimum = ID_BYTES + min(SparseLayout.bytes_of(f, 1, dim, 1) for f in FORMATS)
                raise BudgetTooSmall(self.name, budget_bytes, minimum, "one kept value, its index and the hash seed")
            layout, index_bytes, kind, unseen = hashed, ID_BYTES, "hashed", "collided"
        density = layout.kept / (layout.rows * dim)
        notes["kept"] = f"{layout.kept:,} of {layout.rows:,} x {dim} values ({density:.2%}), {layout.format} layout"
        notes["training_memory"] = self.training_memory(layout.rows, dim)
        params = dict(self.get_params(), rows=kind, num_rows=layout.rows, kept=layout.kept, format=layout.format)
        return SchemePlan(self.name, params, index_bytes + layout.size_bytes, budget_bytes, notes, unseen)

    def training_memory(self, rows: int, dim: int) -> str:
        """What training holds beyond the stored form (a plan note)."""
        return (f"a dense {rows:,} x {dim} fp32 shadow ({rows * dim * FLOAT_BYTES:,} bytes) and a bool mask "
                f"({rows * dim:,} bytes), not stored")

    @staticmethod
    def layout_of(feature: FeatureSpec, plan: SchemePlan) -> tuple[SparseLayout, np.ndarray | None]:
        p = plan.params
        layout = SparseLayout(p["format"], p["num_rows"], feature.dim, p["kept"])
        return layout, (np.asarray(feature.ids, dtype=np.int64) if p["rows"] == "per-id" else None)


class MagnitudePruning(PrunedScheme):
    """Magnitude pruning of a dense table to the K values the budget stores: one-shot after ``warmup_epochs``, or
    iteratively over ``prune_epochs`` epochs by Zhu & Gupta's cubic schedule; training goes on with the mask."""

    summary = "magnitude pruning: a dense table pruned to the K largest values a sparse format fits (one-shot/gradual)"

    def __init__(
        self,
        schedule: Literal["one-shot", "iterative"] = "one-shot",
        warmup_epochs: int = 1,
        prune_epochs: int = 3,
        rows: Literal["auto", "per-id", "hashed"] = "auto",
        min_density: float | None = None,
        hashed_density: float = 0.5,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not 0 <= warmup_epochs <= MAX_EPOCHS:
            raise ValueError(f"warmup_epochs must be in [0, {MAX_EPOCHS}], got {warmup_epochs}")
        if not 1 <= prune_epochs <= MAX_EPOCHS:
            raise ValueError(f"prune_epochs must be in [1, {MAX_EPOCHS}] (pruning steps of the iterative schedule), "
                             f"got {prune_epochs}")
        self._check_rows(rows, min_density, hashed_density)
        self.schedule, self.warmup_epochs, self.prune_epochs = schedule, warmup_epochs, prune_epochs

    def steps(self, total: int, kept: int) -> list[tuple[int, int]]:
        """(epoch after which it prunes, values kept after it) of each pruning step; epoch 0: before training."""
        if self.schedule == "one-shot":
            return [(self.warmup_epochs, kept)]
        counts = cubic_schedule(total, kept, self.prune_epochs)
        return [(self.warmup_epochs + step, count) for step, count in enumerate(counts)]

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        layout, vocabulary = self.layout_of(feature, plan)
        return MagnitudePrunedEmbedding(layout, vocabulary, seed, self.steps(layout.rows * layout.dim, layout.kept))


class PEP(PrunedScheme):
    """PEP: learnable soft thresholds prune the table while it trains (``search_epochs``); the surviving values (at
    most K, the largest |v|) are then retrained from their initial values with the mask (the lottery ticket)."""

    summary = "PEP (Liu et al. 2021): learned soft thresholds prune the table, then a masked lottery-ticket retrain"

    def __init__(
        self,
        threshold: Literal["feature", "dimension", "row", "element"] = "element",
        threshold_init: float = -15.0,
        search_epochs: int = 1,
        rewind: bool = True,
        rows: Literal["auto", "per-id", "hashed"] = "auto",
        min_density: float | None = None,
        hashed_density: float = 0.5,
    ) -> None:
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
        if not -30.0 <= threshold_init <= 30.0:
            raise ValueError(f"threshold_init must be in [-30, 30] (sigmoid(s) the initial threshold), got "
                             f"{threshold_init}")
        if not 1 <= search_epochs <= MAX_EPOCHS:
            raise ValueError(f"search_epochs must be in [1, {MAX_EPOCHS}], got {search_epochs}")
        if not isinstance(rewind, bool):
            raise ValueError(f"rewind must be true (retrain from the initial values) or false, got {rewind!r}")
        self._check_rows(rows, min_density, hashed_density)
        self.threshold, self.threshold_init, self.search_epochs, self.rewind = (
            threshold, threshold_init, search_epochs, rewind,
        )

    def training_memory(self, rows: int, dim: int) -> str:
        width = {"feature": 0, "dimension": 0, "row": 1, "element": dim}[self.threshold]
        thresholds = f" and a {rows:,} x {width} fp32 threshold table" if width else ""
        return super().training_memory(rows, dim) + thresholds

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        layout, vocabulary = self.layout_of(feature, plan)
        return PEPEmbedding(layout, vocabulary, seed, self.threshold, self.threshold_init, self.search_epochs,
                            self.rewind)
