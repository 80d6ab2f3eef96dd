"""``mixed-dim``: frequency-based mixed-dimension embeddings (Ginart et al., ISIT 2021; dlrm's md_solver) —
training IDs sorted by frequency fall into blocks; block i stores rows of dim d_i ~ popularity_i^alpha,
projected up to d. The dims are scaled to fill the budget."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    lookup_sorted,
)

_SCALE_SEARCH_STEPS = 100


def frequency_blocks(feature: FeatureSpec, num_blocks: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The training IDs split into blocks of (nearly) equal count, most frequent first, each block's IDs
    sorted; and each block's popularity (mean share of the training occurrences per ID in it)."""
    order = np.lexsort((feature.ids, -np.asarray(feature.counts)))  # by count descending, ties by ID
    blocks = [part for part in np.array_split(order, min(num_blocks, feature.num_ids)) if len(part)]
    total = max(float(np.sum(feature.counts)), 1.0)
    popularity = np.array([np.sum(feature.counts[part]) / (len(part) * total) for part in blocks])
    return [np.sort(feature.ids[part]) for part in blocks], popularity


def mixed_dim_size_bytes(block_rows: list[int], block_dims: list[int], dim: int, num_ids: int) -> int:
    """Tables [n_i (+1 OOV row in the block of the smallest dim), d_i], projections [d_i, d] where d_i < d,
    and the int64 ID dictionary."""
    oov_block = oov_block_of(block_dims)
    size = num_ids * ID_BYTES
    for block, (rows, block_dim) in enumerate(zip(block_rows, block_dims, strict=True)):
        size += (rows + (block == oov_block)) * block_dim * FLOAT_BYTES
        size += block_dim * dim * FLOAT_BYTES if block_dim < dim else 0
    return size


def oov_block_of(block_dims: list[int]) -> int:
    """Unseen IDs take a row in the block of the smallest dim (the least popular block on ties)."""
    smallest = min(block_dims)
    return max(i for i, block_dim in enumerate(block_dims) if block_dim == smallest)


def power_law_dims(popularity: np.ndarray, alpha: float, scale: float, dim: int) -> list[int]:
    return [int(d) for d in np.clip(np.round(scale * popularity**alpha), 1, dim)]


class MixedDimLookup(TableBackedEmbedding):
    """Raw ID -> (block, row) through per-block sorted ID dictionaries; row of dim d_i -> projection to d."""

    combine_is_linear = True  # a sum of linearly projected rows: a bag pools its rows in the table kernel

    def __init__(self, block_ids: list[torch.Tensor], block_dims: list[int], dim: int, seed: int) -> None:
        super().__init__()
        self.dim, self.block_dims = dim, block_dims
        self.oov_block = oov_block_of(block_dims)
        for block, ids in enumerate(block_ids):
            self.register_buffer(f"ids_{block}", ids.clone())
        self.tables = nn.ModuleList(
            EmbeddingTable(len(ids) + (block == self.oov_block), block_dim, seed=seed + block)
            for block, (ids, block_dim) in enumerate(zip(block_ids, block_dims, strict=True))
        )
        generator = torch.Generator().manual_seed(int(seed) + len(block_ids))
        self.projections = nn.ParameterDict()
        for block, block_dim in enumerate(block_dims):
            if block_dim < dim:  # like nn.Linear's default initialisation, without a bias
                bound = block_dim**-0.5
                weight = (torch.rand(block_dim, dim, generator=generator) * 2 - 1) * bound
                self.projections[str(block)] = nn.Parameter(weight)

    def block_ids(self, block: int) -> torch.Tensor:
        return getattr(self, f"ids_{block}")

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [N] block and int64 [N] row of each ID; unseen IDs get the OOV row (last of the OOV block)."""
        block_of = torch.full_like(ids, self.oov_block)
        row_of = torch.full_like(ids, len(self.block_ids(self.oov_block)))
        for block in range(len(self.block_dims)):
            position, known = lookup_sorted(self.block_ids(block), ids)
            block_of = torch.where(known, block, block_of)
            row_of = torch.where(known, position, row_of)
        return block_of, row_of

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.locate(ids), dim=1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """One read of each block's table, a bag per ID: its row for the IDs in the block, empty elsewhere."""
        block_of, row_of = self.locate(ids)
        reads = []
        for block, table in enumerate(self.tables):
            members = block_of == block
            reads.append(table.lookup(row_of[members], lengths=members.to(torch.int64)))
        return reads

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sum of each block's projected rows: an ID's own block gives its embedding, the others zeros."""
        out = torch.zeros(len(ids), self.dim, device=ids.device)
        for block, rows in enumerate(pooled):
            if str(block) in self.projections:
                rows = rows @ self.projections[str(block)]
            out = out + rows
        return out


class MixedDimension(Scheme):
    """Mixed-dimension embeddings: ``num_blocks`` frequency blocks, block dims ~ popularity^alpha, projected to d."""

    summary = "mixed-dim (Ginart et al. 2021): frequency blocks with dims ~ popularity^alpha, projected to d"
    unseen = "dedicated"
    # The int64 ID dictionary alone costs 8 bytes per training ID, more than budgets of 1/16 of a d = 32 table
    # allow; above the dictionary's cost the dims are scaled to use >= 90% of the budget.
    fills_budget = False

    def __init__(self, num_blocks: int = 4, alpha: float = 0.3) -> None:
        if not 1 <= num_blocks <= 64:
            raise ValueError(f"num_blocks must be in [1, 64], got {num_blocks}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.num_blocks, self.alpha = num_blocks, alpha

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        blocks, popularity = frequency_blocks(feature, self.num_blocks)
        block_rows = [len(ids) for ids in blocks]

        def size_of(block_dims: list[int]) -> int:
            return mixed_dim_size_bytes(block_rows, block_dims, feature.dim, feature.num_ids)

        minimum = size_of([1] * len(blocks))
        if minimum > budget_bytes:
            raise BudgetTooSmall(
                self.name, budget_bytes, minimum, "the int64 ID dictionary and every block at dim 1"
            )
        # The largest scale lambda with d_i = round(lambda * p_i^alpha) fitting, by bisection on log lambda.
        weights = np.maximum(popularity / popularity.max(), 1e-12)  # IDs counted 0 times
        low, high = 0.0, np.log(feature.dim) - np.log(weights.min() ** self.alpha) + 1.0
        for _ in range(_SCALE_SEARCH_STEPS):
            middle = (low + high) / 2
            fits = size_of(power_law_dims(weights, self.alpha, np.exp(middle), feature.dim)) <= budget_bytes
            low, high = (middle, high) if fits else (low, middle)
        block_dims = power_law_dims(weights, self.alpha, np.exp(low), feature.dim)
        if size_of(block_dims) > budget_bytes:
            block_dims = [1] * len(blocks)
        # Rounding leaves up to one dim per block unspent: hand it out, most popular block first.
        grown = True
        while grown:
            grown = False
            for block in range(len(blocks)):
                wider = block_dims[:block] + [block_dims[block] + 1] + block_dims[block + 1 :]
                if block_dims[block] < feature.dim and size_of(wider) <= budget_bytes:
                    block_dims, grown = wider, True
        params = dict(self.get_params(), block_rows=block_rows, block_dims=block_dims)
        notes = {"block_popularity": [float(p) for p in popularity]}
        return SchemePlan(self.name, params, size_of(block_dims), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        blocks, _ = frequency_blocks(feature, self.num_blocks)
        block_ids = [torch.as_tensor(ids, dtype=torch.int64) for ids in blocks]
        return MixedDimLookup(block_ids, plan.params["block_dims"], feature.dim, seed)
