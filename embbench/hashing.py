"""Universal hashing of raw int64 IDs, shared by every hash-based scheme.

h_j(x) = ((a_j * (x mod p) + b_j) mod p) mod m with p = 2^31 - 1 (a Mersenne prime), a_j in [1, p), b_j in
[0, p): the Carter–Wegman family used by the DHE paper (Kang et al., KDD 2021, Algorithm 1). Keeping every
operand below 2^31 keeps a_j * x below 2^62, so the arithmetic is exact in int64 for any int64 ID, negative
or near 2^63. IDs that are congruent modulo p share all their hashes; distinct IDs below p never do in the
reduction step.

The coefficients are regenerated from one stored 64-bit seed, so a hash family costs 8 bytes of state.

Pre-mixing (``premix=True``, the default): with one fixed (a, b), a run of consecutive IDs (MovieLens, any
auto-increment key) maps to an arithmetic progression mod p, whose buckets mod m form a lattice: depending on
the seed, 5,000 consecutive IDs filled all 5,000 of 20,384 buckets or only 1,910 (a random function: about
4,434). Results would then hinge on the seed and on how IDs happen to be numbered. So x mod p is first
permuted by the power map x -> x^5 mod p, a bijection of Z_p (gcd(5, p - 1) = 1) that destroys the
arithmetic structure: the same IDs then fill 4,398..4,451 buckets over seeds. Being a bijection, it keeps
every property above (IDs below p still never collide in the reduction). ``premix=False`` is the formula
as written, which DHE uses to follow its paper's Algorithm 1 exactly.

Speed: integer division (``torch.remainder`` on int64) does not vectorise on CPUs, and the [N, k] temporaries
of a large batch spill out of the caches. Large batches are therefore hashed in float64, where every
intermediate is an exact integer below 2^53 and both reductions are a multiply by a rounded-up reciprocal
and a floor (see :func:`_floor_divisor`), one cache-sized block of rows at a time. The values are identical
to the int64 formula for every int64 input; tests/test_hashing.py holds them equal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import torch
from torch import nn

MERSENNE_PRIME = 2**31 - 1
#: exponent of the pre-mixing power map; a bijection of Z_p because gcd(5, p - 1) = 1
PREMIX_EXPONENT = 5

#: below this many hash values the int64 formula is used: it is fewer kernel launches for small batches
_FLOAT_PATH_MIN_VALUES = 1 << 14
#: hash values per block of the float64 path: its two float64 scratch blocks (8 MiB) stay in L3. Measured
#: on 2 cores, 2^17..2^20 were best: smaller blocks pay per-call and per-parallel-region overhead (severe
#: when the cores are oversubscribed), larger ones spill to memory
_BLOCK_VALUES = 1 << 19


@functools.cache
def _floor_divisor(divisor: int) -> float:
    """The smallest float64 c >= 1/divisor. With it, floor(fl(z * c)) == z // divisor exactly for every
    integer 0 <= z < 2^49 (divisor = p) and 0 <= z < 2^31 (any divisor <= p): c overshoots 1/divisor by
    at most 2^-52 relatively, which moves z * c by less than the gap 1/divisor between z / divisor and the
    next integer above it, and never below z / divisor, so the floor cannot land on a wrong integer."""
    reciprocal = 1.0 / divisor
    if Fraction(reciprocal) < Fraction(1, divisor):
        reciprocal = math.nextafter(reciprocal, math.inf)
    return reciprocal


class HashFamily(nn.Module):
    """``num_hashes`` universal hash functions into ``num_buckets`` buckets: forward(int64 [N]) -> int64 [N, k]."""

    def __init__(self, num_hashes: int, num_buckets: int, seed: int, premix: bool = True) -> None:
        super().__init__()
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
        if not 1 <= num_buckets <= MERSENNE_PRIME:
            raise ValueError(f"num_buckets must be in [1, {MERSENNE_PRIME}], got {num_buckets}")
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.premix = premix
        self.register_buffer("hash_seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("a", torch.empty(num_hashes, dtype=torch.int64), persistent=False)
        self.register_buffer("b", torch.empty(num_hashes, dtype=torch.int64), persistent=False)
        # The float64 path splits x mod p into 16-bit halves: a x = a x_low + ((a 2^16) mod p) x_high (mod p),
        # each product below 2^47 and their sum with b below 2^48, exact in float64.
        for name in ("a_float", "a_shifted_float", "b_float"):
            self.register_buffer(name, torch.empty(num_hashes, dtype=torch.float64), persistent=False)
        self._regenerate()

    def _regenerate(self) -> None:
        generator = torch.Generator().manual_seed(int(self.hash_seed))
        a = torch.randint(1, MERSENNE_PRIME, (self.num_hashes,), generator=generator, dtype=torch.int64)
        b = torch.randint(0, MERSENNE_PRIME, (self.num_hashes,), generator=generator, dtype=torch.int64)
        self.a.copy_(a)
        self.b.copy_(b)
        self.a_float.copy_(a.double())
        self.a_shifted_float.copy_(torch.remainder(a << 16, MERSENNE_PRIME).double())
        self.b_float.copy_(b.double())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._regenerate()

    @staticmethod
    def _check_ids(ids: torch.Tensor) -> None:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"expected a 1-D int64 tensor of IDs, got {ids.dtype} with shape {tuple(ids.shape)}")

    def reduce(self, ids: torch.Tensor) -> torch.Tensor:
        """x mod p, then (with premix) the power map x^5 mod p: int64 in [0, p), once per ID."""
        reduced = torch.remainder(ids, MERSENNE_PRIME)
        if not self.premix:
            return reduced
        squared = torch.remainder(reduced * reduced, MERSENNE_PRIME)  # products stay below 2^62
        fourth = torch.remainder(squared * squared, MERSENNE_PRIME)
        return torch.remainder(fourth * reduced, MERSENNE_PRIME)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        if ids.numel() * self.num_hashes < _FLOAT_PATH_MIN_VALUES:
            return self.hash_int64(ids)
        out = torch.empty(ids.numel(), self.num_hashes, dtype=torch.int64, device=ids.device)
        for rows, values in self.hash_blocks(ids):
            out[rows].copy_(values)  # exact: the values are integers below 2^31
        return out

    def hash_int64(self, ids: torch.Tensor) -> torch.Tensor:
        """The formula in int64, as written (the reference the float64 path equals)."""
        self._check_ids(ids)
        reduced = self.reduce(ids).unsqueeze(1)
        hashed = torch.remainder(reduced * self.a + self.b, MERSENNE_PRIME)
        if self.num_buckets == MERSENNE_PRIME:
            return hashed
        return torch.remainder(hashed, self.num_buckets)

    def hash_blocks(self, ids: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """The hash values block by block: (rows, float64 [rows, k] of exact integers), for consumers that
        turn them into something else (DHE's encoding) without an [N, k] int64 or float64 intermediate.
        The block tensor is scratch space, overwritten by the next block."""
        self._check_ids(ids)
        reduced = self.reduce(ids)
        low = (reduced & 0xFFFF).to(torch.float64).unsqueeze(1)
        high = (reduced >> 16).to(torch.float64).unsqueeze(1)
        rows_per_block = max(1, _BLOCK_VALUES // self.num_hashes)
        scratch = torch.empty(
            2, min(rows_per_block, ids.numel()), self.num_hashes, dtype=torch.float64, device=ids.device
        )
        for start in range(0, ids.numel(), rows_per_block):  # cache blocking: one block is many IDs
            stop = min(start + rows_per_block, ids.numel())
            values, quotient = scratch[0, : stop - start], scratch[1, : stop - start]
            torch.addcmul(self.b_float, low[start:stop], self.a_float, out=values)
            values.addcmul_(high[start:stop], self.a_shifted_float)  # a x + b, exact and below 2^48
            torch.mul(values, _floor_divisor(MERSENNE_PRIME), out=quotient)
            values.add_(quotient.floor_(), alpha=-MERSENNE_PRIME)  # mod p
            if self.num_buckets != MERSENNE_PRIME:
                torch.mul(values, _floor_divisor(self.num_buckets), out=quotient)
                values.add_(quotient.floor_(), alpha=-self.num_buckets)  # mod m
            yield slice(start, stop), values

    def extra_repr(self) -> str:
        return f"num_hashes={self.num_hashes}, num_buckets={self.num_buckets}, premix={self.premix}"
