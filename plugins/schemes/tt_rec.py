"""``tt-rec``: tensor-train embeddings (Yin et al., "TT-Rec", MLSys 2021) — the [V, d] table is never stored;
row i is the product of k small core slices picked by i's mixed-radix digits. Ranks are solved from the budget.

Raw IDs become a dense index either by a universal hash into V >= index_space * (n + 1) (the default: no
dictionary, so the scheme reaches the tiny budgets it is meant for) or through the sorted training vocabulary
(exact, no collisions, unseen IDs share index n; costs 8 bytes per training ID).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    MERSENNE_PRIME,
    BudgetTooSmall,
    FeatureSpec,
    HashFamily,
    Scheme,
    SchemePlan,
    largest_fitting,
    lookup_sorted,
)

MAPPINGS = ("hash", "vocabulary")
MAX_RANK = 1 << 12
#: the standard deviation of the initial embedding values, as for the schemes' tables
TARGET_INIT_STD = 0.01
#: gathered core slices held at once in a forward, bounding its memory (evaluation embeds 65536 IDs at once)
_CHUNK_FLOATS = 1 << 24


def balanced_factors(number: int, count: int) -> list[int]:
    """``count`` positive integers with product ``number``, as equal as possible, the smallest in the middle
    (middle cores cost rank^2 per unit of their factor, the end cores only rank)."""
    divisors = [f for f in range(1, number + 1) if number % f == 0]
    best: tuple[int, int, list[int]] | None = None
    for head in itertools.product(divisors, repeat=count - 1):
        last, remainder = divmod(number, math.prod(head))
        if remainder or math.prod(head) * last != number:
            continue
        factors = sorted([*head, last], reverse=True)
        factors = [factors[0], *sorted(factors[2:]), factors[1]] if count > 2 else factors
        key = (max(factors), sum(factors[1:-1]))
        if best is None or key < best[:2]:
            best = (*key, factors)
    assert best is not None
    return best[2]


def covering_factors(size: int, count: int) -> list[int]:
    """``count`` integers, as equal as possible, whose product is the smallest found that is >= ``size``."""
    factors = [max(1, math.ceil(size ** (1 / count)))] * count
    while math.prod(factors) < size:  # floating-point root fell short
        factors[0] += 1
    for position in range(count):
        while factors[position] > 1 and math.prod(factors) // factors[position] * (factors[position] - 1) >= size:
            factors[position] -= 1
    return factors


def cores_floats(row_factors: list[int], dim_factors: list[int], ranks: list[int]) -> int:
    """Floats in the cores G_i [r_{i-1}, v_i, d_i, r_i] with r_0 = r_k = 1."""
    bounds = [1, *ranks, 1]
    return sum(bounds[i] * v * d * bounds[i + 1] for i, (v, d) in enumerate(zip(row_factors, dim_factors, strict=True)))


class TTLookup(nn.Module):
    """Dense index -> its mixed-radix digits -> the contraction of the cores' slices at those digits."""

    def __init__(
        self,
        row_factors: list[int],
        dim_factors: list[int],
        ranks: list[int],
        mapping: str,
        index_size: int,
        vocabulary: torch.Tensor | None,
        seed: int,
    ) -> None:
        super().__init__()
        self.row_factors, self.dim_factors, self.ranks = row_factors, dim_factors, ranks
        self.mapping, self.index_size, self.dim = mapping, index_size, math.prod(dim_factors)
        if mapping == "hash":
            self.hash = HashFamily(1, index_size, seed=seed)
        else:
            assert vocabulary is not None
            self.register_buffer("vocabulary", vocabulary.clone())
        # TT-Rec's sampled Gaussian initialisation: every core entry N(0, s^2) with s chosen so that the
        # product of k cores, summed over the r_1 ... r_{k-1} rank terms, has variance TARGET_INIT_STD^2.
        core_std = (TARGET_INIT_STD**2 / math.prod(ranks)) ** (1 / (2 * len(row_factors)))
        generator = torch.Generator().manual_seed(int(seed) + 1)
        bounds = [1, *ranks, 1]
        # Stored as [v_i, r_{i-1}, d_i, r_i] so that gathering the slices of a batch is one index per core.
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(v, bounds[i], d, bounds[i + 1], generator=generator) * core_std)
            for i, (v, d) in enumerate(zip(row_factors, dim_factors, strict=True))
        )

    def dense_index(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mapping == "hash":
            return self.hash(ids)[:, 0]
        position, known = lookup_sorted(self.vocabulary, ids)
        return torch.where(known, position, torch.full_like(position, self.vocabulary.numel()))

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense_index(ids).unsqueeze(1)

    def digits(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Mixed-radix digits of ``index``, most significant first (digit i in [0, v_i))."""
        digits = []
        for factor in reversed(self.row_factors):
            digits.append(torch.remainder(index, factor))
            index = torch.div(index, factor, rounding_mode="floor")
        return digits[::-1]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float [N, d]: the rows of the implicit table at dense ``index``."""
        digits = self.digits(index)
        # partial[n] holds the product of the first cores' slices: [N, d_1 ... d_i, r_i].
        partial = self.cores[0][digits[0]].squeeze(1)
        for core, digit in zip(self.cores[1:], digits[1:], strict=True):
            slices = core[digit]  # [N, r_{i-1}, d_i, r_i]
            partial = torch.einsum("nar,nrbs->nabs", partial, slices).flatten(1, 2)
        return partial.squeeze(2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        index = self.dense_index(ids)
        per_id = max(self.ranks) ** 2 * max(self.dim_factors) + self.dim * max(self.ranks)
        chunk = max(1, _CHUNK_FLOATS // per_id)
        if len(index) <= chunk:
            return self.rows(index)
        return torch.cat([self.rows(part) for part in index.split(chunk)])

    def full_table(self) -> torch.Tensor:
        """float [prod v_i, d]: every row of the implicit table, by contracting the whole cores (for checks)."""
        table = self.cores[0].squeeze(1)  # [v_1, d_1, r_1]
        for core in self.cores[1:]:
            table = torch.einsum("ibr,jrcs->ijbcs", table, core)
            table = table.reshape(table.shape[0] * table.shape[1], -1, table.shape[-1])
        return table.squeeze(2)

    def extra_repr(self) -> str:
        return f"rows={self.row_factors}, dims={self.dim_factors}, ranks={self.ranks}, mapping={self.mapping}"


class TTRec(Scheme):
    """TT-Rec: the embedding table as a tensor train of ``num_cores`` cores; TT ranks solved from the budget."""

    summary = "TT-Rec (Yin et al. 2021): the table as a tensor train of small cores; ranks solved from the budget"
    unseen = "collided"

    def __init__(
        self, num_cores: int = 3, rank: int | None = None, mapping: str = "hash", index_space: float = 4.0
    ) -> None:
        if not 2 <= num_cores <= 8:
            raise ValueError(f"num_cores must be in [2, 8], got {num_cores}")
        if rank is not None and not 1 <= rank <= MAX_RANK:
            raise ValueError(f"rank must be in [1, {MAX_RANK}] or unset (solved from the budget), got {rank}")
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(MAPPINGS)}, got '{mapping}'")
        if not 1.0 <= index_space <= 1024.0:
            raise ValueError(f"index_space must be in [1, 1024] (hashed indices per training ID), got {index_space}")
        self.num_cores, self.rank, self.mapping, self.index_space = num_cores, rank, mapping, index_space

    def shapes(self, feature: FeatureSpec) -> tuple[list[int], list[int], int]:
        """The vocabulary factors v_i, the dimension factors d_i, and the size of the dense index space."""
        if self.mapping == "vocabulary":
            wanted = feature.num_ids + 1  # one index per training ID and one shared by unseen IDs
        else:
            wanted = min(MERSENNE_PRIME, math.ceil(self.index_space * (feature.num_ids + 1)))
        row_factors = covering_factors(wanted, self.num_cores)
        index_size = min(math.prod(row_factors), MERSENNE_PRIME) if self.mapping == "hash" else wanted
        return row_factors, balanced_factors(feature.dim, self.num_cores), index_size

    def size_bytes(self, feature: FeatureSpec, ranks: list[int]) -> int:
        row_factors, dim_factors, _ = self.shapes(feature)
        mapping_bytes = ID_BYTES if self.mapping == "hash" else feature.num_ids * ID_BYTES
        return cores_floats(row_factors, dim_factors, ranks) * FLOAT_BYTES + mapping_bytes

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        num_ranks = self.num_cores - 1
        lowest = [self.rank or 1] * num_ranks
        minimum = self.size_bytes(feature, lowest)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum, f"{self.num_cores} cores of TT rank {lowest[0]}")
        if self.rank is not None:
            ranks = lowest
        else:
            uniform = largest_fitting(lambda r: self.size_bytes(feature, [r] * num_ranks), 1, MAX_RANK, budget_bytes)
            ranks = [uniform] * num_ranks
            # Raise single ranks, the last first, to spend what one more step of the uniform rank would overshoot.
            for position in reversed(range(num_ranks)):
                def size_of(rank: int, position: int = position) -> int:
                    return self.size_bytes(feature, ranks[:position] + [rank] + ranks[position + 1 :])

                ranks[position] = largest_fitting(size_of, ranks[position], MAX_RANK, budget_bytes)
        row_factors, dim_factors, index_size = self.shapes(feature)
        params = dict(
            self.get_params(), ranks=ranks, row_factors=row_factors, dim_factors=dim_factors, index_size=index_size
        )
        return SchemePlan(self.name, params, self.size_bytes(feature, ranks), budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        vocabulary = torch.as_tensor(feature.ids, dtype=torch.int64) if p["mapping"] == "vocabulary" else None
        return TTLookup(
            p["row_factors"], p["dim_factors"], p["ranks"], p["mapping"], p["index_size"], vocabulary, seed
        )
