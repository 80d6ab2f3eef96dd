"""Universal hashing of raw int64 IDs, shared by every hash-based scheme.

h_j(x) = ((a_j * (x mod p) + b_j) mod p) mod m with p = 2^31 - 1 (a Mersenne prime), a_j in [1, p), b_j in
[0, p): the Carter–Wegman family used by the DHE paper (Kang et al., KDD 2021, Algorithm 1). Keeping every
operand below 2^31 keeps a_j * x below 2^62, so the arithmetic is exact in int64 for any int64 ID, negative
or near 2^63. IDs that are congruent modulo p share all their hashes; distinct IDs below p never do in the
reduction step.

The coefficients are regenerated from one stored 64-bit seed, so a hash family costs 8 bytes of state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MERSENNE_PRIME = 2**31 - 1


class HashFamily(nn.Module):
    """``num_hashes`` universal hash functions into ``num_buckets`` buckets: forward(int64 [N]) -> int64 [N, k]."""

    def __init__(self, num_hashes: int, num_buckets: int, seed: int) -> None:
        super().__init__()
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
        if not 1 <= num_buckets <= MERSENNE_PRIME:
            raise ValueError(f"num_buckets must be in [1, {MERSENNE_PRIME}], got {num_buckets}")
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.register_buffer("hash_seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("a", torch.empty(num_hashes, dtype=torch.int64), persistent=False)
        self.register_buffer("b", torch.empty(num_hashes, dtype=torch.int64), persistent=False)
        self._regenerate()

    def _regenerate(self) -> None:
        generator = torch.Generator().manual_seed(int(self.hash_seed))
        a = torch.randint(1, MERSENNE_PRIME, (self.num_hashes,), generator=generator, dtype=torch.int64)
        b = torch.randint(0, MERSENNE_PRIME, (self.num_hashes,), generator=generator, dtype=torch.int64)
        self.a.copy_(a)
        self.b.copy_(b)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._regenerate()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"expected a 1-D int64 tensor of IDs, got {ids.dtype} with shape {tuple(ids.shape)}")
        reduced = torch.remainder(ids, MERSENNE_PRIME).unsqueeze(1)
        hashed = torch.remainder(reduced * self.a + self.b, MERSENNE_PRIME)
        if self.num_buckets == MERSENNE_PRIME:
            return hashed
        return torch.remainder(hashed, self.num_buckets)

    def extra_repr(self) -> str:
        return f"num_hashes={self.num_hashes}, num_buckets={self.num_buckets}"
