"""``binary-code``: Binary Code based Hash embedding (Yan et al., CIKM 2021) — an ID's unique binary code is
split into blocks of bits; each block, read as a number, picks a row of its block table; the rows are pooled.
"""

from __future__ import annotations

from collections.abc import Sequence

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
)

STRATEGIES = ("succession", "skip")
FUSIONS = ("sum", "mean")
#: codes are computed exactly in int64 arithmetic, in words of at most 62 bits
WORD_BITS = 62
#: blocks taken from the binary expansion of the row budget: four keep more than 15/16 of it
MAX_SOLVED_BLOCKS = 4
_GOLDEN_RATIO_64 = 0x9E3779B97F4A7C15
_MIX_CONSTANTS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def index_bits(num_indices: int) -> int:
    """Bits needed to write the indices 0..num_indices-1."""
    return max(1, (num_indices - 1).bit_length())


def paper_block_lengths(code_bits: int, block_bits: int) -> list[int]:
    """Blocks of ``block_bits`` over a code of ``code_bits`` bits, the last block taking what is left."""
    lengths = [block_bits] * (code_bits // block_bits)
    if code_bits % block_bits:
        lengths.append(code_bits % block_bits)
    return lengths


def budget_block_lengths(rows: int, min_code_bits: int) -> list[int] | None:
    """Block lengths (largest first) whose tables total at most ``rows`` rows, as close to it as possible,
    over a code of at least ``min_code_bits`` bits; None if ``rows`` is too few.

    A t-bit block costs 2^t rows, so the blocks are the largest set bits of ``rows`` (its binary expansion),
    at most MAX_SOLVED_BLOCKS of them; while the code is shorter than needed for uniqueness, the largest block
    is split into two one bit shorter (same rows, more bits).
    """
    if rows < 2 * min_code_bits:  # one- and two-bit blocks give the most bits per row: one per two rows
        return None
    lengths: list[int] = []
    for bit in reversed(range(1, rows.bit_length())):
        if rows >> bit & 1 and len(lengths) < MAX_SOLVED_BLOCKS:
            lengths.append(bit)
    while sum(lengths) < min_code_bits:
        largest = lengths.pop(0)
        lengths = sorted([*lengths, largest - 1, largest - 1], reverse=True)
    return lengths


def code_bit_layout(lengths: list[int], strategy: str) -> tuple[list[int], list[int]]:
    """For each code bit (least significant first): the block it goes to, and its place in that block.

    succession: block 1 takes the lowest ``lengths[0]`` bits, block 2 the next, and so on. skip: bits are
    dealt to the blocks in turn (bit p to block p mod k while every block still takes bits).
    """
    block_of_bit: list[int] = []
    place_in_block: list[int] = []
    if strategy == "succession":
        for block, length in enumerate(lengths):
            block_of_bit += [block] * length
            place_in_block += list(range(length))
        return block_of_bit, place_in_block
    filled = [0] * len(lengths)
    while len(block_of_bit) < sum(lengths):
        for block, length in enumerate(lengths):
            if filled[block] < length:
                block_of_bit.append(block)
                place_in_block.append(filled[block])
                filled[block] += 1
    return block_of_bit, place_in_block


def multiply_modulo(values: torch.Tensor, multiplier: int, width: int) -> torch.Tensor:
    """(values * multiplier) mod 2^width for values and multiplier below 2^width <= 2^62, exact in int64:
    both factors enter in 31-bit halves (the high halves' product is a multiple of 2^62, hence dropped)."""
    mask = (1 << width) - 1
    low, high = values & (2**31 - 1), values >> 31
    product = (low * (multiplier & (2**31 - 1))) & mask
    if width > 31:
        cross = (high * (multiplier & (2**31 - 1)) + low * (multiplier >> 31)) & ((1 << (width - 31)) - 1)
        product = (product + (cross << 31)) & mask
    return product


def word_multipliers(word: int, width: int) -> tuple[int, int]:
    """Two odd multipliers below 2^width for code word ``word``: top bits of fixed 64-bit mixing constants."""
    offset = (word * _GOLDEN_RATIO_64) % 2**64
    return tuple(((constant ^ offset) >> (64 - width)) | 1 for constant in _MIX_CONSTANTS)


def mix_word(values: torch.Tensor, word: int, width: int) -> torch.Tensor:
    """A bijection of [0, 2^width): multiply, xor-shift, multiply (each step invertible modulo 2^width).

    The xor-shift folds high bits into low ones, so every bit of the word depends on every bit of the index.
    """
    first, second = word_multipliers(word, width)
    mixed = multiply_modulo(values, first, width)
    mixed = mixed ^ (mixed >> ((width + 1) // 2))
    return multiply_modulo(mixed, second, width)


def binary_code_bits(dense: torch.Tensor, code_bits: int) -> torch.Tensor:
    """The code of each dense index as bits [N, code_bits], least significant first.

    The code is a run of words of up to WORD_BITS bits, each a different bijective mix of the index. The
    first word alone is as long as the index, so distinct indices have distinct codes; later words (codes
    longer than one word) add bits that vary with every bit of the index.
    """
    words = []
    for word, start in enumerate(range(0, code_bits, WORD_BITS)):
        width = min(WORD_BITS, code_bits - start)
        mixed = mix_word(dense, word, width)
        words.append((mixed.unsqueeze(1) >> torch.arange(width, device=dense.device)) & 1)
    return torch.cat(words, dim=1)


class BinaryCodeLookup(TableBackedEmbedding):
    """IDs -> dense index -> L-bit code -> k block values (rows) -> pooled block rows."""

    combine_is_linear = True  # a sum (or mean) of block rows: a bag pools its rows in the table kernel

    def __init__(
        self, vocabulary, lengths: list[int], strategy: str, fusion: str, shared_table: bool, dim: int, seed: int
    ) -> None:
        super().__init__()
        self.index = VocabularyIndex(vocabulary)
        self.code_bits = sum(lengths)
        self.fusion = fusion
        block_of_bit, place_in_block = code_bit_layout(lengths, strategy)
        self.register_buffer("block_of_bit", torch.tensor(block_of_bit, dtype=torch.int64), persistent=False)
        self.register_buffer("place_in_block", torch.tensor(place_in_block, dtype=torch.int64), persistent=False)
        rows = [1 << length for length in lengths]
        starts = [sum(rows[:block]) for block in range(len(rows))]
        self.register_buffer("block_starts", torch.tensor(starts, dtype=torch.int64), persistent=False)
        if shared_table:
            self.table = EmbeddingTable(sum(rows), dim, seed=seed)
        else:
            self.tables = nn.ModuleList(
                EmbeddingTable(count, dim, seed=seed + block) for block, count in enumerate(rows)
            )
        self.shared_table = shared_table

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """Each ID's block values: the code's bits regrouped by block; unique per dense index."""
        bits = binary_code_bits(self.index(ids), self.code_bits)
        blocks = torch.zeros(len(ids), len(self.block_starts), dtype=torch.int64, device=ids.device)
        return blocks.scatter_add_(1, self.block_of_bit.expand(len(ids), -1), bits << self.place_in_block)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        blocks = self.index_tuples(ids)
        if self.shared_table:
            # Each block has its own range of rows in the one table, so equal values in two blocks differ.
            return [self.table.lookup(blocks + self.block_starts)]
        return [table.lookup(blocks[:, block]) for block, table in enumerate(self.tables)]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        summed = pooled[0] if self.shared_table else sum(pooled)
        count = len(self.block_starts)
        return summed / count if self.fusion == "mean" else summed


class BinaryCodeEmbedding(Scheme):
    """Binary code hash embedding: unique code -> bit blocks (succession or skip) -> block rows, sum-pooled."""

    summary = "binary code hash embedding (Yan et al. 2021): unique binary code split into blocks of bits"
    unseen = "dedicated"

    def __init__(
        self,
        strategy: str = "succession",
        block_bits: int | None = None,
        fusion: str = "sum",
        shared_table: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
        if block_bits is not None and (not isinstance(block_bits, int) or not 1 <= block_bits <= 31):
            raise ValueError(
                f"block_bits must be an integer in [1, 31] or unset (solved from the budget), got {block_bits}"
            )
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got '{fusion}'")
        if not isinstance(shared_table, bool):
            raise ValueError(f"shared_table must be true or false, got {shared_table!r}")
        self.strategy, self.block_bits, self.fusion, self.shared_table = strategy, block_bits, fusion, shared_table

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        num_indices = feature.num_ids + 1  # the training IDs and one index shared by unseen IDs
        needed_bits = index_bits(num_indices)
        vocabulary_bytes = VocabularyIndex.size_bytes(feature.ids)
        row_bytes = feature.dim * FLOAT_BYTES

        def size_of(lengths: list[int]) -> int:
            return vocabulary_bytes + sum(1 << length for length in lengths) * row_bytes

        if self.block_bits is not None:
            lengths = paper_block_lengths(needed_bits, self.block_bits)
            if size_of(lengths) > budget_bytes:
                raise BudgetTooSmall(
                    self.name, budget_bytes, size_of(lengths),
                    f"blocks of {self.block_bits} bits over {needed_bits}-bit codes; unset block_bits to solve them",
                )
        else:
            # More rows than 2^needed_bits cannot be reached by distinct codes: one block of that size is a full table.
            rows = min((budget_bytes - vocabulary_bytes) // row_bytes, 1 << needed_bits)
            solved = budget_block_lengths(max(rows, 0), needed_bits)
            if solved is None:
                minimum = size_of([1] * needed_bits)
                raise BudgetTooSmall(
                    self.name, budget_bytes, minimum,
                    f"{needed_bits}-bit codes need two rows per bit"
                    f"{'' if vocabulary_bytes == 8 else f', and {vocabulary_bytes:,} bytes of ID dictionary'}",
                )
            lengths = solved
        params = dict(self.get_params(), block_lengths=lengths, code_bits=sum(lengths))
        notes = {"vocabulary_bytes": vocabulary_bytes, "index_bits": needed_bits}
        return SchemePlan(self.name, params, size_of(lengths), budget_bytes, notes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return BinaryCodeLookup(
            feature.ids, p["block_lengths"], p["strategy"], p["fusion"], p["shared_table"], feature.dim, seed
        )
