"""``robe``: Random Offset Block Embedding (Desai et al., MLSys 2022) — every embedding is read, block by block,
out of one shared circular array of M floats at hashed offsets; M is solved from the budget."""

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


class RobeLookup(TableBackedEmbedding):
    """Element i of x's embedding is array[(h_{i // Z}(x) + i mod Z) mod M]: d/Z blocks of Z consecutive values."""

    combine_is_linear = True  # a concatenation of blocks: a bag pools its rows in the table kernel

    def __init__(self, array_size: int, dim: int, block_size: int, seed: int, init: TableInit | None = None) -> None:
        super().__init__()
        num_blocks = -(-dim // block_size)  # the last block is shorter when Z does not divide d
        self.hash = HashFamily(num_blocks, array_size, seed=seed)
        # The array is a table of M rows of width 1, so it lives (and shards) like every other table; element i
        # of an embedding is one read of it (d reads per forward).
        self.array = EmbeddingTable(array_size, 1, seed=seed + 1, lookups=dim, init=init)
        self.array_size, self.dim, self.block_size = array_size, dim, block_size
        element = torch.arange(dim)
        self.register_buffer("block_of_element", element // block_size, persistent=False)
        self.register_buffer("offset_in_block", element % block_size, persistent=False)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The block offsets h_j(x): they alone fix where x's values are read."""
        return self.hash(ids)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N, d]: the array position of every embedding value."""
        starts = self.hash(ids)[:, self.block_of_element]
        return torch.remainder(starts + self.offset_in_block, self.array_size)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Read i: the array value of element i of every ID's embedding."""
        positions = self.positions(ids)
        return [self.array.lookup(positions[:, element]) for element in range(self.dim)]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(pooled), dim=1)


class ROBE(Scheme):
    """ROBE-Z: one circular array of M floats; x's embedding is d/Z blocks of Z values at offsets h(x, j)."""

    summary = "ROBE (Desai et al. 2022): blocks of Z values at hashed offsets in one shared circular array"
    unseen = "collided"

    def __init__(self, block_size: int | None = None, init: Literal["normal", "uniform"] = "normal") -> None:
        if block_size is not None and not 1 <= block_size <= 1 << 16:
            raise ValueError(f"block_size must be in [1, 65536] or unset (Z = the embedding dim), got {block_size}")
        if init not in ("normal", "uniform"):
            raise ValueError(f"init must be normal (N(0, 0.01^2)) or uniform (U(±dim^-½)), got {init!r}")
        self.block_size, self.init = block_size, init

    def array_init(self, dim: int) -> TableInit:
        """``normal``: N(0, 0.01²); ``uniform``: U(±d^-½) of the embedding dim d (the array is 1 wide), as the
        reference code of ROBE and HashedNets starts it."""
        return TableInit("normal") if self.init == "normal" else TableInit("uniform", scale=dim**-0.5)

    @staticmethod
    def size_bytes(array_size: int) -> int:
        return array_size * FLOAT_BYTES + ID_BYTES  # the array and the hash seed

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        block_size = min(self.block_size or feature.dim, feature.dim)
        minimum = self.size_bytes(1)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum, "an array of one float and the hash seed")
        array_size = min(MERSENNE_PRIME, (budget_bytes - ID_BYTES) // FLOAT_BYTES)
        params = {"block_size": block_size, "array_size": array_size, "init": self.init}
        notes = {"init": "normal(0, 0.01^2)" if self.init == "normal" else f"uniform(±1/sqrt({feature.dim}))"}
        return SchemePlan(self.name, params, self.size_bytes(array_size), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        init = self.array_init(feature.dim)
        return RobeLookup(plan.params["array_size"], feature.dim, plan.params["block_size"], seed, init)
