"""``dpq`` / ``mgqe``: Differentiable Product Quantization (Chen et al., ICML 2020; DPQ-SX) and MGQE (Kang et al., WWW
2020) — an ID is D packed codes into D codebooks of K centroids (MGQE: fewer for rare IDs), learned through a
training-only query table; evaluation reads the stored codes and codebooks alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
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

MAPPINGS = ("per-id", "hashed")
#: the most centroids per group: codes of at most 16 bits
MAX_CENTROIDS = 1 << 16
#: the default bound of solved centroids: 8-bit codes. The training forward holds [batch, D, K] logits, so
#: K·D (at most 8,192 at d = 32) bounds its memory; it also bounds the largest plan (see docs/schemes.md)
DEFAULT_MAX_CENTROIDS = 256
#: the fewest centroids a solved K may have (the authors' code's default K)
DEFAULT_MIN_CENTROIDS = 16
#: a per-ID plan is used only where it gives every ID this many code bits (else hashed rows): 65,536 codes
DEFAULT_MIN_CODE_BITS = 16
#: a layout is chosen (fewest groups, then most code bits) among those that use at least this share of the budget
FILL_TARGET = 0.9
#: the logits' batch normalisation, as the authors' code normalises them (plus a learned scale and shift)
NORM_MOMENTUM = 0.1
NORM_EPS = 1e-5
#: logits (rows x D x K) computed at once when the codes are re-derived from the query table
_CHUNK_LOGITS = 1 << 24
#: codes packed at once (a multiple of 8, so that every chunk starts on a byte), bounding pack_codes' memory
_PACK_CHUNK = 1 << 20


def code_bits(centroids: int) -> int:
    """Bits of one code among ``centroids`` choices: ceil(log2 K); 0 for a single centroid."""
    return (int(centroids) - 1).bit_length()


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits each, packed end to end."""
    return -(-int(count) * int(bits) // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [packed_bytes]: the codes (integers in [0, 2^bits), any shape, row-major) end to end, ``bits`` bits
    each, least significant bit first; code i occupies bits i·bits .. i·bits + bits - 1 of the byte string."""
    flat = codes.reshape(-1)
    out = torch.zeros(packed_bytes(flat.numel(), bits), dtype=torch.uint8, device=codes.device)
    if bits == 0 or flat.numel() == 0:
        return out
    shifts = torch.arange(bits, device=codes.device)
    for start in range(0, flat.numel(), _PACK_CHUNK):  # bounds the [chunk, bits] temporaries, not a loop over IDs
        part = flat[start : start + _PACK_CHUNK].to(torch.int64)
        positions = torch.arange(part.numel(), device=codes.device).unsqueeze(1) * bits + shifts
        bit_values = ((part.unsqueeze(1) >> shifts) & 1) << (positions & 7)
        chunk = torch.zeros(packed_bytes(part.numel(), bits), dtype=torch.int64, device=codes.device)
        chunk.index_add_(0, (positions >> 3).reshape(-1), bit_values.reshape(-1))  # disjoint bits: sums are ORs
        first = start * bits // 8
        out[first : first + chunk.numel()] = chunk.to(torch.uint8)
    return out


def unpack_codes(packed: torch.Tensor, positions: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes at ``positions`` (code indices, any shape) of a byte string written by :func:`pack_codes`.

    A code of at most 16 bits starting at bit offset o < 8 of its first byte lies within three bytes; bytes
    past the end only fill bits above the code, which the mask drops."""
    if bits == 0:
        return torch.zeros_like(positions)
    bit = positions * bits
    first = bit >> 3
    last = packed.numel() - 1
    word = (
        packed[first].to(torch.int64)
        | packed[(first + 1).clamp(max=last)].to(torch.int64) << 8
        | packed[(first + 2).clamp(max=last)].to(torch.int64) << 16
    )
    return (word >> (bit & 7)) & ((1 << bits) - 1)


def divisors(number: int) -> list[int]:
    return [value for value in range(1, number + 1) if number % value == 0]


def effective_groups(requested: int, dim: int) -> int:
    """The largest divisor of ``dim`` not above ``requested``: the groups split the dim evenly."""
    return max(value for value in divisors(dim) if value <= requested)


def most_frequent(keys: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    """bool [len(keys)]: the ``count`` keys of highest count (ties to the smaller key)."""
    order = np.lexsort((keys, -counts))  # the last key sorts first: count descending, then key
    chosen = np.zeros(len(keys), dtype=bool)
    chosen[order[:count]] = True
    return chosen


class QueryTable(EmbeddingTable):
    """The training-time query table: a d-vector per code row whose comparison with the centroid keys picks the
    row's codes. Training memory, not part of the stored model: it saves nothing to a state_dict and loads nothing
    from one (in a model, its rows live in the table collection like any table's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: set when the rows are started again (a suite's ``init``): the codes derived from them are then stale
        self.reinitialised = False

    def reinitialise(self, init: TableInit) -> None:
        super().reinitialise(init)
        self.reinitialised = True

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        return


class CentroidKeys(nn.Module):
    """What DPQ-SX needs only to learn codes: every centroid's key [D, K, d/D], the normalised logits' scale and
    shift and their running statistics. Training memory like the query table: nothing of it is saved or loaded."""

    def __init__(self, groups: int, centroids: int, width: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        # Glorot's bound for a [K, d/D] matrix: the authors' code leaves its keys at TensorFlow's default init.
        bound = (6.0 / (centroids + width)) ** 0.5
        self.keys = nn.Parameter((torch.rand(groups, centroids, width, generator=generator) * 2 - 1) * bound)
        # A learned scale and shift of each normalised logit: without them a 1-wide group (D = d) could reach two
        # codes only, since a normalised q·k depends on a 1-wide key only through its sign.
        self.scale = nn.Parameter(torch.ones(groups * centroids))
        self.shift = nn.Parameter(torch.zeros(groups * centroids))
        self.register_buffer("running_mean", torch.zeros(groups * centroids))
        self.register_buffer("running_var", torch.ones(groups * centroids))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        return


class StraightThroughCodes(torch.autograd.Function):
    """DPQ-SX's code selection: forward, the centroids the codes (the logits' argmax) pick; backward, the chosen
    centroids get the gradient (the one-hot) and the logits get it through softmax(logits / temperature), as if the
    one-hot were the softmax (straight-through: one_hot + softmax - stop_gradient(softmax))."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, codebook: torch.Tensor, flat_codes: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """logits [M, D, K], codebook [D, K, w], flat_codes [M, D] (code + group · K) -> [M, D, w]."""
        probabilities = torch.softmax(logits / temperature, dim=-1)
        ctx.save_for_backward(probabilities, codebook, flat_codes)
        ctx.temperature = temperature
        return F.embedding(flat_codes, codebook.reshape(-1, codebook.shape[-1]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        probabilities, codebook, flat_codes = ctx.saved_tensors
        # d out / d one-hot = the codebook; through the softmax: p * (g - <g, p>) / temperature
        through = torch.einsum("mdw,dkw->mdk", grad, codebook)
        through = (through - (through * probabilities).sum(-1, keepdim=True)) * probabilities / ctx.temperature
        width = codebook.shape[-1]
        chosen = torch.zeros(codebook.numel() // width, width, dtype=grad.dtype, device=grad.device)
        chosen.index_add_(0, flat_codes.reshape(-1), grad.reshape(-1, width))
        return through, chosen.reshape(codebook.shape), None, None


class QuantizedLookup(TableBackedEmbedding):
    """IDs -> code rows (training-ID ranks, or hashed slots) -> D codes per row -> the concatenation of the D
    chosen centroids. In evaluation the codes are the stored ones; in training they are the argmax of the
    (batch-normalised) logits of the row's query against the centroid keys, with the softmax's gradient passed
    straight through (DPQ-SX). Hot rows (MGQE's frequent IDs) choose among all K centroids, the others among the
    first ``tail_centroids``; the two kinds of codes are packed apart, each in its own bit width.
    """
    #: the stored form is this module's own (see the docstring): the precisions axis does not apply
    post_training_quantizable = False

    def __init__(
        self,
        dim: int,
        groups: int,
        centroids: int,
        tail_centroids: int | None,
        num_rows: int,
        hot_rows: torch.Tensor | None,
        vocabulary: np.ndarray | None,
        temperature: float,
        batch_norm: bool,
        seed: int,
        init_std: float,
    ) -> None:
        super().__init__()
        self.dim, self.groups, self.width = dim, groups, dim // groups
        self.centroids = centroids
        self.tail_centroids = centroids if tail_centroids is None else tail_centroids
        self.num_rows, self.temperature, self.batch_norm = num_rows, temperature, batch_norm
        self.hot_bits, self.tail_bits = code_bits(self.centroids), code_bits(self.tail_centroids)
        if vocabulary is not None:
            self.vocabulary = VocabularyIndex(vocabulary)
            # An unseen ID has no query: its codes are hashes of the ID, among the tail's centroids.
            self.unseen_hash = HashFamily(groups, self.tail_centroids, seed=seed)
        else:
            self.vocabulary = None
            self.slot_hash = HashFamily(1, num_rows, seed=seed)
        generator = torch.Generator().manual_seed(int(seed) + 1)
        self.codebook = nn.Parameter(torch.randn(groups, centroids, self.width, generator=generator) * init_std)
        self.query = QueryTable(num_rows, dim, seed=seed + 2, init=TableInit("normal", std=init_std))
        self.assignment = CentroidKeys(groups, centroids, self.width, seed + 3)
        if hot_rows is None:  # DPQ: every row is hot, its code rank its row
            self.hot_bitmap: torch.Tensor | None = None
            num_hot = num_rows
        else:
            self.register_buffer("hot_bitmap", pack_codes(hot_rows.to(torch.int64), 1))
            num_hot = int(hot_rows.sum())
        self.register_buffer("hot_codes", torch.zeros(packed_bytes(num_hot * groups, self.hot_bits), dtype=torch.uint8))
        self.register_buffer(
            "tail_codes",
            torch.zeros(packed_bytes((num_rows - num_hot) * groups, self.tail_bits), dtype=torch.uint8),
        )
        self.register_buffer("group_index", torch.arange(groups), persistent=False)
        self.register_buffer("centroid_index", torch.arange(centroids), persistent=False)
        # derived from the bitmap (rebuilt on load, not counted): each row's rank among the rows of its kind
        self.register_buffer("rank_in_kind", torch.empty(0, dtype=torch.int64), persistent=False)
        self._rebuild_ranks()
        self._codes_stale = False
        self.export_codes()

    # -- rows and stored codes ------------------------------------------------------------------------------
    def _rebuild_ranks(self) -> None:
        if self.hot_bitmap is None:
            return
        hot = self.is_hot(torch.arange(self.num_rows, device=self.hot_bitmap.device))
        self.rank_in_kind = torch.where(hot, torch.cumsum(hot, 0), torch.cumsum(~hot, 0)) - 1

    def is_hot(self, rows: torch.Tensor) -> torch.Tensor:
        """bool: whether each row chooses among all K centroids (all rows, for DPQ)."""
        if self.hot_bitmap is None:
            return torch.ones_like(rows, dtype=torch.bool)
        return unpack_codes(self.hot_bitmap, rows, 1).bool()

    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ID's code row (clamped into range) and whether it has one (every ID does, with hashed rows)."""
        if self.vocabulary is None:
            rows = self.slot_hash(ids)[:, 0]
            return rows, torch.ones_like(rows, dtype=torch.bool)
        rank = self.vocabulary(ids)
        return rank.clamp(max=self.num_rows - 1), rank < self.num_rows

    def stored_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """int64 [N, D]: the stored codes of code rows."""
        offsets = self.group_index
        if self.hot_bitmap is None:
            return unpack_codes(self.hot_codes, rows.unsqueeze(1) * self.groups + offsets, self.hot_bits)
        hot, rank = self.is_hot(rows), self.rank_in_kind[rows]
        codes = torch.empty(len(rows), self.groups, dtype=torch.int64, device=rows.device)
        codes[hot] = unpack_codes(self.hot_codes, rank[hot].unsqueeze(1) * self.groups + offsets, self.hot_bits)
        codes[~hot] = unpack_codes(self.tail_codes, rank[~hot].unsqueeze(1) * self.groups + offsets, self.tail_bits)
        return codes

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N, D]: the codes that embed ``ids`` in evaluation (the stored ones; hashed for unseen IDs)."""
        self.refresh_codes()
        rows, known = self.rows_of(ids)
        codes = self.stored_codes(rows)
        if self.vocabulary is not None and not bool(known.all()):
            codes = torch.where(known.unsqueeze(1), codes, self.unseen_hash(ids))
        return codes

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The D codes: they alone fix an ID's embedding."""
        return self.codes(ids)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """float [N, d]: centroid codes[:, j] of group j, for every group, concatenated."""
        flat = codes + self.group_index * self.centroids
        return F.embedding(flat, self.codebook.reshape(-1, self.width)).reshape(len(codes), self.dim)

    # -- learning the codes ---------------------------------------------------------------------------------
    def logits(self, queries: torch.Tensor, hot: torch.Tensor, training: bool) -> torch.Tensor:
        """[M, D, K]: each query group's dot product with every key, batch-normalised (batch statistics in
        training, running ones otherwise); a tail row's logits beyond its centroids are -inf."""
        keys = self.assignment.keys
        groups = queries.reshape(len(queries), self.groups, self.width)
        logits = torch.einsum("mdw,dkw->mdk", groups, keys)
        if self.batch_norm:
            assignment = self.assignment
            flat = F.batch_norm(
                logits.reshape(len(queries), self.groups * self.centroids), assignment.running_mean,
                assignment.running_var, assignment.scale, assignment.shift, training=training and len(queries) > 1,
                momentum=NORM_MOMENTUM, eps=NORM_EPS,
            )
            logits = flat.reshape(logits.shape)
        if self.tail_centroids < self.centroids:
            beyond = (~hot).reshape(-1, 1, 1) & (self.centroid_index >= self.tail_centroids)
            logits = logits.masked_fill(beyond, float("-inf"))
        return logits

    @torch.no_grad()
    def export_codes(self) -> None:
        """Derive every row's codes from the query table (the argmax of its normalised logits, running
        statistics) and store them packed: the compressed model of the current training state."""
        weight = self.query.weight
        all_rows = torch.arange(self.num_rows, device=weight.device)
        hot = self.is_hot(all_rows)
        code_type = torch.uint8 if self.hot_bits <= 8 else torch.int32
        codes = torch.empty(self.num_rows, self.groups, dtype=code_type, device=weight.device)
        chunk = max(8, _CHUNK_LOGITS // (self.groups * self.centroids))
        for start in range(0, self.num_rows, chunk):  # bounds the [chunk, D, K] logits
            rows = slice(start, start + chunk)
            logits = self.logits(weight[rows], hot[rows], training=False)
            codes[rows] = logits.argmax(-1).to(code_type)
        self.hot_codes.copy_(pack_codes(codes[hot], self.hot_bits))
        self.tail_codes.copy_(pack_codes(codes[~hot], self.tail_bits))
        self._codes_stale = False
        self.query.reinitialised = False

    def refresh_codes(self) -> None:
        """Re-derive the stored codes if training may have moved the queries or keys since they were derived."""
        if self._codes_stale or self.query.reinitialised:
            self.export_codes()

    # -- the table-backed forward ---------------------------------------------------------------------------
    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """The queries of the IDs that have a row, in training; in evaluation no query is read (empty bags)."""
        rows, known = self.rows_of(ids)
        if not self.training:
            known = torch.zeros_like(known)
        return [self.query.lookup(rows[known], lengths=known.to(torch.int64))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.training:
            return self.embed_codes(self.codes(ids))
        # A step may follow, and the logits' running statistics move: the stored codes are re-derived before use.
        self._codes_stale = True
        rows, known = self.rows_of(ids)
        if bool(known.all()):
            return self.learned_codes(pooled[0], rows).reshape(len(ids), self.dim)
        positions = torch.nonzero(known).flatten()
        learned = self.learned_codes(pooled[0][positions], rows[positions]).reshape(len(positions), self.dim)
        return self.embed_codes(self.unseen_hash(ids)).index_put((positions,), learned)

    def learned_codes(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[M, D, d/D]: the centroids the argmax codes of ``queries`` pick, with DPQ-SX's straight-through
        gradient (training)."""
        logits = self.logits(queries, self.is_hot(rows), training=True)
        offsets = self.group_index * self.centroids
        return StraightThroughCodes.apply(logits, self.codebook, logits.argmax(-1) + offsets, self.temperature)

    # -- state ----------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.refresh_codes()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_ranks()
        self._codes_stale = False  # the loaded codes are the model; they are not re-derived from the queries
        self.query.reinitialised = False

    def extra_repr(self) -> str:
        mapping = "per-id" if self.vocabulary is not None else "hashed"
        tail = f", tail_centroids={self.tail_centroids}" if self.hot_bitmap is not None else ""
        return f"groups={self.groups}, centroids={self.centroids}{tail}, rows={self.num_rows}, mapping={mapping}"


@dataclass(frozen=True)
class Layout:
    """D groups of K centroids (the tail's codes among the first ``tail_centroids``; None: no tail) for a number
    of code rows, with its size and the code bits of all rows together."""

    groups: int
    centroids: int
    tail_centroids: int | None
    size_bytes: int
    code_bits: int


class DifferentiableProductQuantization(Scheme):
    """DPQ-SX: D codes of K centroids per ID, learned end to end; D, K and the code rows solved from the budget."""

    summary = "DPQ (Chen et al. 2020): D discrete codes per ID into D codebooks of K centroids, learned end to end"
    unseen = "collided"
    # D <= d and K <= max_centroids cap the size at about one byte per embedding value (a quarter of the fp32
    # table): larger budgets are not filled (docs/schemes.md). Below that the plans use >= 90% of the budget.
    fills_budget = False

    def __init__(
        self,
        num_groups: int | None = None,
        num_centroids: int | None = None,
        min_centroids: int = DEFAULT_MIN_CENTROIDS,
        max_centroids: int = DEFAULT_MAX_CENTROIDS,
        mapping: Literal["per-id", "hashed"] = "per-id",
        min_code_bits: int = DEFAULT_MIN_CODE_BITS,
        temperature: float = 1.0,
        batch_norm: bool = True,
        init_std: float = 0.01,
    ) -> None:
        if num_groups is not None and not 1 <= num_groups <= 4096:
            raise ValueError(f"num_groups must be in [1, 4096] or unset (solved from the budget), got {num_groups}")
        if num_centroids is not None and not 2 <= num_centroids <= MAX_CENTROIDS:
            raise ValueError(
                f"num_centroids must be in [2, {MAX_CENTROIDS}] or unset (solved from the budget), got {num_centroids}"
            )
        if not 2 <= max_centroids <= MAX_CENTROIDS:
            raise ValueError(f"max_centroids must be in [2, {MAX_CENTROIDS}], got {max_centroids}")
        if not 2 <= min_centroids <= max_centroids:
            raise ValueError(f"min_centroids must be in [2, max_centroids = {max_centroids}], got {min_centroids}")
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(MAPPINGS)}, got {mapping!r}")
        if not 1 <= min_code_bits <= 64:
            raise ValueError(f"min_code_bits must be in [1, 64], got {min_code_bits}")
        if not 0.0 < temperature <= 100.0:
            raise ValueError(f"temperature must be in (0, 100], got {temperature}")
        if not 0.0 < init_std <= 10.0:
            raise ValueError(f"init_std must be in (0, 10], got {init_std}")
        self.num_groups, self.num_centroids = num_groups, num_centroids
        self.min_centroids, self.max_centroids = min_centroids, max_centroids
        self.mapping, self.min_code_bits = mapping, min_code_bits
        self.temperature, self.batch_norm, self.init_std = temperature, bool(batch_norm), init_std

    # -- what MGQE changes ----------------------------------------------------------------------------------
    def hot_count(self, rows: int) -> int:
        """How many of ``rows`` code rows are hot (choose among all K centroids)."""
        return rows

    def tail_choices(self) -> list[int | None]:
        """The K_tail a layout may give the other rows (None: there are none)."""
        return [None]

    def centroid_range(self, tail_centroids: int | None) -> tuple[int, int]:
        """The K a layout may have: the given K, else [min_centroids, max_centroids]; above K_tail."""
        low, high = (self.num_centroids,) * 2 if self.num_centroids is not None else (
            self.min_centroids, self.max_centroids
        )
        return (low if tail_centroids is None else max(low, tail_centroids + 1)), high

    # -- size -----------------------------------------------------------------------------------------------
    def size_bytes(
        self, rows: int, groups: int, centroids: int, tail_centroids: int | None, dim: int, mapping_bytes: int
    ) -> int:
        """Codes (D per row, ceil(log2 K) bits each, packed; the tail's in their own width, with a bitmap of the
        hot rows), the codebooks (K·d fp32), and the ID dictionary and hash seeds (``mapping_bytes``)."""
        hot = self.hot_count(rows)
        codes = packed_bytes(hot * groups, code_bits(centroids))
        if tail_centroids is not None:
            codes += packed_bytes((rows - hot) * groups, code_bits(tail_centroids)) + packed_bytes(rows, 1)
        return codes + centroids * dim * FLOAT_BYTES + mapping_bytes

    def code_bits_total(self, rows: int, groups: int, centroids: int, tail_centroids: int | None) -> int:
        """Code bits of all rows together."""
        hot = self.hot_count(rows)
        tail_bits = code_bits(centroids if tail_centroids is None else tail_centroids)
        return groups * (hot * code_bits(centroids) + (rows - hot) * tail_bits)

    # -- planning -------------------------------------------------------------------------------------------
    def group_choices(self, dim: int) -> list[int]:
        return [effective_groups(self.num_groups, dim)] if self.num_groups is not None else divisors(dim)

    def required_bits(self, rows: int, dim: int) -> int:
        """Bits every row's codes (D codes) must have together: ``min_code_bits``, or fewer where that many tell
        all ``rows`` apart, or where the given D and K (K_tail) allow no more."""
        _, high = self.centroid_range(None)
        most = max(
            groups * self.narrowest_bits(rows, high, tail if tail is None else min(tail, high - 1))
            for groups in self.group_choices(dim)
            for tail in self.tail_choices()
        )
        return min(self.min_code_bits, code_bits(rows), most)

    def narrowest_bits(self, rows: int, centroids: int, tail_centroids: int | None) -> int:
        """Bits of the narrowest code of a row (per group): the tail's where there are tail rows."""
        if tail_centroids is None or self.hot_count(rows) == rows:
            return code_bits(centroids)
        return code_bits(tail_centroids)

    def layouts(self, rows: int, dim: int, mapping_bytes: int, budget_bytes: int) -> list[Layout]:
        """For each D (and K_tail), the largest K that fits, where every row's codes have the required bits."""
        required = self.required_bits(rows, dim)
        found = []
        for groups in self.group_choices(dim):
            for tail in self.tail_choices():
                def size_of(centroids: int, groups: int = groups, tail: int | None = tail) -> int:
                    return self.size_bytes(rows, groups, centroids, tail, dim, mapping_bytes)

                low, high = self.centroid_range(tail)
                centroids = largest_fitting(size_of, low, high, budget_bytes) if low <= high else None
                if centroids is None or groups * self.narrowest_bits(rows, centroids, tail) < required:
                    continue
                bits = self.code_bits_total(rows, groups, centroids, tail)
                found.append(Layout(groups, centroids, tail, size_of(centroids), bits))
        return found

    @staticmethod
    def choose(layouts: list[Layout], budget_bytes: int) -> Layout | None:
        """Among the layouts that use >= 90% of the budget, the one of fewest groups (then most code bits): K
        grows first, and groups only as the budget needs, since DPQ-SX learns narrow groups less well
        (docs/schemes.md); where none uses 90%, the largest (ties to more bits, then fewer groups)."""
        filled = [layout for layout in layouts if layout.size_bytes >= FILL_TARGET * budget_bytes]
        if filled:
            return max(filled, key=lambda x: (-x.groups, x.code_bits, x.size_bytes, x.centroids))
        return max(layouts, key=lambda x: (x.size_bytes, x.code_bits, -x.groups, x.centroids), default=None)

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim = feature.dim
        notes: dict[str, Any] = {}
        if self.mapping == "per-id" and feature.num_ids > 0:
            dictionary = VocabularyIndex.size_bytes(feature.ids) + ID_BYTES  # and the unseen IDs' hash seed
            layout = self.choose(self.layouts(feature.num_ids, dim, dictionary, budget_bytes), budget_bytes)
            if layout is not None:
                return self.make_plan(feature, budget_bytes, "per-id", feature.num_ids, layout, notes)
            notes["mapping"] = (
                f"hashed rows: a code row per training ID ({feature.num_ids:,}) with "
                f"{self.required_bits(feature.num_ids, dim)} code bits does not fit the budget of "
                f"{budget_bytes:,} bytes"
            )
        rows = self.hashed_rows(feature, budget_bytes)
        layout = self.choose(self.layouts(rows, dim, ID_BYTES, budget_bytes), budget_bytes)
        assert layout is not None  # hashed_rows found that one fits
        return self.make_plan(feature, budget_bytes, "hashed", rows, layout, notes)

    def hashed_rows(self, feature: FeatureSpec, budget_bytes: int) -> int:
        """The most hashed code rows (at most one per training ID, and one) some layout fits with the required
        code bits."""
        def fits(rows: int) -> bool:
            return bool(self.layouts(rows, feature.dim, ID_BYTES, budget_bytes))

        if not fits(1):
            raise BudgetTooSmall(
                self.name, budget_bytes, self.minimum_bytes(feature.dim), "one hashed code row, the fewest centroids"
            )
        low, high = 1, min(MERSENNE_PRIME, feature.num_ids + 1)
        while low < high:  # more rows never fit where fewer do not: a binary search
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

    def minimum_bytes(self, dim: int) -> int:
        """The smallest module: one hashed row, the fewest centroids."""
        sizes = [
            self.size_bytes(1, groups, self.centroid_range(tail)[0], tail, dim, ID_BYTES)
            for groups in self.group_choices(dim)
            for tail in self.tail_choices()
            if self.centroid_range(tail)[0] <= self.centroid_range(tail)[1]
        ]
        return min(sizes)

    def make_plan(
        self, feature: FeatureSpec, budget_bytes: int, mapping: str, rows: int, layout: Layout, notes: dict[str, Any]
    ) -> SchemePlan:
        params = dict(
            self.get_params(), mapping=mapping, rows=rows, hot_rows=self.hot_count(rows), groups=layout.groups,
            centroids=layout.centroids, tail_centroids=layout.tail_centroids,
        )
        notes["code_bits_per_row"] = round(layout.code_bits / rows, 3)
        notes["training_memory"] = (
            f"query table {rows:,} x {feature.dim} fp32 and keys {layout.groups} x {layout.centroids} x "
            f"{feature.dim // layout.groups} fp32 ({(rows + layout.centroids) * feature.dim * FLOAT_BYTES:,} bytes), "
            "not stored"
        )
        return SchemePlan(self.name, params, layout.size_bytes, budget_bytes, notes)

    # -- building -------------------------------------------------------------------------------------------
    def hot_rows_of(self, feature: FeatureSpec, plan: SchemePlan, module_seed: int) -> torch.Tensor | None:
        """bool [rows]: the hot rows (None: all rows are hot)."""
        return None

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        vocabulary = feature.ids if p["mapping"] == "per-id" else None
        return QuantizedLookup(
            feature.dim, p["groups"], p["centroids"], p["tail_centroids"], p["rows"],
            self.hot_rows_of(feature, plan, seed), vocabulary, p["temperature"], p["batch_norm"], seed, p["init_std"],
        )


class MGQE(DifferentiableProductQuantization):
    """MGQE: DPQ whose most frequent IDs (top ``frequent_fraction`` of the code rows by training count) choose
    among K centroids per group and the rest among the first K_tail < K, in fewer bits."""

    summary = "MGQE (Kang et al. 2020): DPQ with K centroids for frequent IDs and fewer (fewer bits) for the tail"

    def __init__(
        self,
        num_groups: int | None = None,
        num_centroids: int | None = None,
        tail_centroids: int | None = None,
        frequent_fraction: float = 0.1,
        min_centroids: int = DEFAULT_MIN_CENTROIDS,
        max_centroids: int = DEFAULT_MAX_CENTROIDS,
        mapping: Literal["per-id", "hashed"] = "per-id",
        min_code_bits: int = DEFAULT_MIN_CODE_BITS,
        temperature: float = 1.0,
        batch_norm: bool = True,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(
            num_groups, num_centroids, min_centroids, max_centroids, mapping, min_code_bits, temperature,
            batch_norm, init_std,
        )
        if tail_centroids is not None:
            most = (num_centroids or max_centroids) - 1
            if not 1 <= tail_centroids <= most:
                raise ValueError(
                    f"tail_centroids must be in [1, {most}] (fewer than num_centroids, or than max_centroids when "
                    f"that is unset) or unset (solved from the budget), got {tail_centroids}"
                )
        if not 0.0 <= frequent_fraction <= 1.0:
            raise ValueError(f"frequent_fraction must be in [0, 1], got {frequent_fraction}")
        self.tail_centroids, self.frequent_fraction = tail_centroids, frequent_fraction

    def hot_count(self, rows: int) -> int:
        return int(self.frequent_fraction * rows)

    def tail_choices(self) -> list[int | None]:
        """The given K_tail, else every power of two below the largest K: a tail code of b bits uses all 2^b
        values, and has fewer bits than the hot codes (K > K_tail)."""
        if self.tail_centroids is not None:
            return [self.tail_centroids]
        _, high = self.centroid_range(None)
        return [1 << bits for bits in range(code_bits(high))]

    def hot_rows_of(self, feature: FeatureSpec, plan: SchemePlan, module_seed: int) -> torch.Tensor | None:
        """The rows of the most frequent training IDs; with hashed rows, the rows whose IDs' training counts sum
        highest (the module hashes with the same seed)."""
        p = plan.params
        counts = np.asarray(feature.counts, dtype=np.float64)
        if p["mapping"] == "per-id":
            keys, row_counts = np.asarray(feature.ids, dtype=np.int64), counts
        else:
            slots = HashFamily(1, p["rows"], seed=module_seed)(torch.as_tensor(feature.ids, dtype=torch.int64))
            row_counts = np.bincount(slots[:, 0].numpy(), weights=counts, minlength=p["rows"])
            keys = np.arange(p["rows"], dtype=np.int64)
        return torch.from_numpy(most_frequent(keys, row_counts, p["hot_rows"]))
