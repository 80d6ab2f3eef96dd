"""HashFamily: h_j(x) = ((a_j (x mod p) + b_j) mod p) mod m, equal to a plain Python-int computation of the
formula for every int64 ID, on both of its code paths (int64 for small batches, float64 for large ones)."""

from __future__ import annotations

import pytest
import torch

from embbench import MERSENNE_PRIME, HashFamily

P = MERSENNE_PRIME
EXTREME_IDS = [0, 1, -1, P - 1, P, P + 1, 2 * P, -P, 2**31, 2**32 - 1, 2**62, -(2**62), 2**63 - 1, -(2**63),
               -(2**63) + 1, 2**53 + 1]
BUCKETS = [1, 2, 10**6, 999_983, P - 1, P]


def float_path(family: HashFamily, ids: torch.Tensor) -> torch.Tensor:
    """The hash values from the float64 blocks (the path ``forward`` takes for large batches), [N, k]."""
    out = torch.empty(ids.numel(), family.num_hashes, dtype=torch.float64)
    for rows, values in family.hash_blocks(ids):
        out[rows].copy_(values)
    return out


def python_hashes(family: HashFamily, ids: list[int]) -> list[list[int]]:
    """Algorithm 1 of the DHE paper in Python integers (arbitrary precision, floor-mod semantics), on the
    pre-mixed ID x^5 mod p where the family pre-mixes."""
    a, b, m = family.a.tolist(), family.b.tolist(), family.num_buckets
    reduced = [pow(x % P, 5, P) if family.premix else x % P for x in ids]
    return [[((a_j * x + b_j) % P) % m for a_j, b_j in zip(a, b, strict=True)] for x in reduced]


def random_ids(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    wide = torch.randint(-(2**63), 2**63 - 1, (count // 2,), generator=generator, dtype=torch.int64)
    small = torch.randint(-(10**7), 10**7, (count - count // 2,), generator=generator, dtype=torch.int64)
    return torch.cat((wide, small)).tolist() + EXTREME_IDS


@pytest.mark.parametrize("premix", [True, False])
@pytest.mark.parametrize("num_buckets", BUCKETS)
def test_both_paths_equal_python_reference_on_random_and_extreme_ids(num_buckets, premix):
    family = HashFamily(24, num_buckets, seed=11, premix=premix)
    ids = random_ids(600, seed=num_buckets % 1000)
    expected = torch.tensor(python_hashes(family, ids), dtype=torch.int64)
    tensor_ids = torch.tensor(ids, dtype=torch.int64)
    assert torch.equal(family.hash_int64(tensor_ids), expected)
    assert torch.equal(float_path(family, tensor_ids), expected.double())
    assert torch.equal(family(tensor_ids), expected)


@pytest.mark.parametrize("num_buckets", BUCKETS)
def test_float_path_equals_int64_formula_on_many_ids_and_hashes(num_buckets):
    # Enough values that forward takes the float64 path in several blocks, with an uneven last block.
    family = HashFamily(1024, num_buckets, seed=3)
    generator = torch.Generator().manual_seed(7)
    ids = torch.cat((
        torch.randint(-(2**63), 2**63 - 1, (300,), generator=generator, dtype=torch.int64),
        torch.tensor(EXTREME_IDS, dtype=torch.int64),
    ))
    hashed = family(ids)
    assert hashed.dtype == torch.int64 and hashed.shape == (len(ids), 1024)
    assert torch.equal(hashed, family.hash_int64(ids))


def test_coefficients_that_maximise_every_intermediate_hash_exactly():
    # a = p - 1, b = p - 1 and x = p - 1 make a x + b its largest possible value, (p - 1)^2 + p - 1.
    family = HashFamily(3, 10**6, seed=0)
    family.a.fill_(P - 1)
    family.b.fill_(P - 1)
    family.a_float.fill_(P - 1)
    family.a_shifted_float.copy_(torch.remainder(family.a << 16, P).double())
    family.b_float.fill_(P - 1)
    ids = torch.tensor([P - 1, P - 2, 2**63 - 1, -(2**63)] * 8000, dtype=torch.int64)
    expected = torch.tensor(python_hashes(family, ids[:4].tolist()), dtype=torch.int64).repeat(8000, 1)
    assert torch.equal(family(ids), expected)


def test_hash_values_survive_a_state_dict_round_trip():
    family = HashFamily(8, 1000, seed=42)
    other = HashFamily(8, 1000, seed=0)
    other.load_state_dict(family.state_dict())
    ids = torch.arange(-50, 50)
    assert torch.equal(other(ids), family(ids))
    assert torch.equal(float_path(other, ids), float_path(family, ids))


def test_state_is_only_the_seed():
    assert list(HashFamily(64, 10, seed=1).state_dict()) == ["hash_seed"]


@pytest.mark.parametrize("bad", [torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int64)])
def test_rejects_ids_that_are_not_1d_int64(bad):
    with pytest.raises(ValueError, match="1-D int64"):
        HashFamily(2, 10, seed=0)(bad)


def test_premix_spreads_consecutive_ids_like_a_random_function_for_every_seed():
    # Without pre-mixing, seed 2 puts 5,000 consecutive IDs into only 1,910 of 20,384 buckets (a lattice).
    expected = 20384 * (1 - (1 - 1 / 20384) ** 5000)  # about 4,434 for a random function
    for seed in range(8):
        distinct = HashFamily(1, 20384, seed=seed)(torch.arange(5000)).unique().numel()
        assert abs(distinct - expected) < 100, (seed, distinct)
    assert HashFamily(1, 20384, seed=2, premix=False)(torch.arange(5000)).unique().numel() < 2000


def test_premix_is_a_bijection_of_the_residues():
    family = HashFamily(1, P, seed=0)
    residues = torch.arange(0, 2**20)
    assert family.reduce(residues).unique().numel() == 2**20
