"""Seeded synthetic interactions: Zipf item popularity plus latent user-item affinity, at any vocabulary size.

Nothing is stored per item, so a catalogue of 10^9 items costs no more memory than one of 10^3: an item's
popularity is its index (index 0 is the most popular), its latent vector is a seeded hash of its index, and
its raw ID is a fixed bijection of its index onto spread-out int64 values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from embbench import Dataset

# Bump when the generated data changes for the same parameters: it is part of the fingerprint.
GENERATOR_VERSION = "synthetic/v1"

_ID_MODULUS_MASK = np.uint64((1 << 62) - 1)
# Odd multipliers are invertible modulo 2^62, so index -> raw ID is a bijection on [0, 2^62).
_USER_ID_MULTIPLIER = np.uint64(0x2545F4914F6CDD1D)
_USER_ID_OFFSET = np.uint64(0x1B873593_0000_0001)
_ITEM_ID_MULTIPLIER = np.uint64(0x1F83D9ABFB41BD6B)
_ITEM_ID_OFFSET = np.uint64(0x0CC9E2D5_1E35_A7BD)
_MAX_ITEMS = 1 << 62
#: rows of interactions a dataset may generate: each costs about 50 bytes while it is split and indexed
_MAX_INTERACTIONS = 200_000_000
_CANDIDATES_PER_INTERACTION = 4
_CELLS_PER_CHUNK = 1 << 21  # user x candidate x latent cells scored at once


def raw_ids(indices: np.ndarray, multiplier: np.uint64, offset: np.uint64) -> np.ndarray:
    """Map indices in [0, 2^62) one-to-one onto spread-out non-negative int64 IDs."""
    spread = (indices.astype(np.uint64) * multiplier + offset) & _ID_MODULUS_MASK
    return spread.astype(np.int64)


def _mix64(values: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (xor-shift-multiply): every input bit affects every output bit."""
    x = values.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hashed_normal(indices: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Standard normal vectors [*indices.shape, dim], a pure function of (index, seed) (Box-Muller)."""
    seed_key = _mix64(np.array([(seed + 0x9E3779B97F4A7C15) % 2**64], dtype=np.uint64))[0]
    base = _mix64(indices.astype(np.uint64) ^ seed_key)[..., None]
    bits = _mix64(base + np.arange(1, dim + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    high = (bits >> np.uint64(32)).astype(np.float64)
    low = (bits & np.uint64(0xFFFFFFFF)).astype(np.float64)
    radius = np.sqrt(-2.0 * np.log((high + 0.5) / 2.0**32))
    return radius * np.cos((2.0 * math.pi / 2.0**32) * low)


class ZipfLaw:
    """The continuous power law x^-exponent on [1, num_items + 1), floored to item indices 0..num_items-1.

    P(index = r) is close to (r + 1)^-exponent / H(num_items, exponent); CDF, point probabilities and
    inverse-CDF sampling are closed forms, so no per-item table is needed however large the catalogue.
    """

    def __init__(self, num_items: int, exponent: float) -> None:
        self.num_items = num_items
        self.slope = 1.0 - exponent
        self.log_span = math.log(num_items + 1.0)
        self.harmonic = abs(self.slope * self.log_span) < 1e-12  # exponent 1: CDF is log x / log(n + 1)

    def _unnormalised_cdf(self, x: np.ndarray) -> np.ndarray:
        log_x = np.log(x)
        return log_x if self.harmonic else np.expm1(self.slope * log_x) / self.slope

    def _total(self) -> float:
        return self.log_span if self.harmonic else math.expm1(self.slope * self.log_span) / self.slope

    def mass(self, first: int, stop: int) -> float:
        """P(first <= index < stop)."""
        low, high = self._unnormalised_cdf(np.array([first + 1.0, stop + 1.0]))
        return float((high - low) / self._total())

    def probabilities(self, stop: int) -> np.ndarray:
        """P(index = r) for r in 0..stop-1."""
        return np.diff(self._unnormalised_cdf(np.arange(1, stop + 2, dtype=np.float64))) / self._total()

    def sample(self, uniform: np.ndarray, first: int = 0) -> np.ndarray:
        """Indices by inverse CDF from uniforms in [0, 1), conditioned on index >= ``first``."""
        low = float(self._unnormalised_cdf(np.array([first + 1.0]))[0])
        target = low + uniform * (self._total() - low)
        x = np.exp(target) if self.harmonic else np.exp(np.log1p(self.slope * target) / self.slope)
        return np.clip(np.floor(x).astype(np.int64) - 1, first, self.num_items - 1)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    upper = f" and <= {high:,}" if high is not None else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {low}{upper}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer >= {low}{upper}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number between {low} and {high}, got {value!r}")


class Synthetic(Dataset):
    """Seeded Zipf item popularity with latent user-item affinity; any vocabulary size, no files needed.

    Each user draws ``interactions_per_user`` = k distinct items without replacement, with weights
    popularity x exp(affinity * <user vector, item vector>) (Gumbel-top-k). The 4k most popular items are
    candidates for everyone; the rest of a large catalogue is represented by 4k draws from its Zipf tail.
    Timestamps are positions 0..k-1 in a random order of the user's items.
    """

    summary = "seeded Zipf popularity with latent user-item affinity; any vocabulary size, no files needed"

    def __init__(
        self,
        num_users: int = 2000,
        num_items: int = 1000,
        interactions_per_user: int = 20,
        zipf_exponent: float = 1.0,
        latent_dim: int = 8,
        affinity: float = 2.0,
        seed: int = 0,
        data_dir: str | Path | None = None,
    ) -> None:
        _check_int("num_users", num_users, 1)
        _check_int("num_items", num_items, 1, _MAX_ITEMS)
        _check_int("interactions_per_user", interactions_per_user, 3, min(num_items, 10_000))
        _check_float("zipf_exponent", zipf_exponent, 0.0, 3.0)
        _check_int("latent_dim", latent_dim, 1, 128)
        _check_float("affinity", affinity, 0.0, 100.0)
        _check_int("seed", seed, 0, 2**63 - 1)
        if num_users * interactions_per_user > _MAX_INTERACTIONS:
            raise ValueError(
                f"num_users x interactions_per_user is {num_users * interactions_per_user:,} interactions; at most "
                f"{_MAX_INTERACTIONS:,} are generated (about 10 GB in memory); use fewer users or interactions"
            )
        params = {
            "num_users": int(num_users),
            "num_items": int(num_items),
            "interactions_per_user": int(interactions_per_user),
            "zipf_exponent": float(zipf_exponent),
            "latent_dim": int(latent_dim),
            "affinity": float(affinity),
            "seed": int(seed),
        }
        super().__init__(data_dir, **params)

    def fingerprint(self) -> str:
        material = json.dumps({"generator": GENERATOR_VERSION, **self.params}, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    def item_ids(self, indices: np.ndarray) -> np.ndarray:
        """Raw item IDs of item indices (index 0 is the most popular item)."""
        return raw_ids(indices, _ITEM_ID_MULTIPLIER, _ITEM_ID_OFFSET)

    def user_ids(self, indices: np.ndarray) -> np.ndarray:
        """Raw user IDs of user indices."""
        return raw_ids(indices, _USER_ID_MULTIPLIER, _USER_ID_OFFSET)

    def load(self) -> pd.DataFrame:
        p = self.params
        num_users, num_items, dim = p["num_users"], p["num_items"], p["latent_dim"]
        k = p["interactions_per_user"]
        rng = np.random.default_rng(p["seed"])
        zipf = ZipfLaw(num_items, p["zipf_exponent"])
        user_vectors = rng.standard_normal((num_users, dim))
        head = min(num_items, _CANDIDATES_PER_INTERACTION * k)
        tail_draws = _CANDIDATES_PER_INTERACTION * k if head < num_items else 0
        # The head items are candidates of every user, weighted by their exact popularity; the tail is
        # represented by draws from it, each carrying an equal share of its probability mass.
        head_prior = np.log(zipf.probabilities(head))
        head_vectors = hashed_normal(np.arange(head), dim, p["seed"]) / math.sqrt(dim)
        tail_mass = zipf.mass(head, num_items)
        tail_share = math.log(max(tail_mass, 1e-300) / tail_draws) if tail_draws else 0.0
        rows_per_chunk = max(1, _CELLS_PER_CHUNK // ((head + tail_draws) * dim))
        chosen = []
        for start in range(0, num_users, rows_per_chunk):
            users = user_vectors[start:start + rows_per_chunk]
            candidates = np.broadcast_to(np.arange(head, dtype=np.int64), (len(users), head))
            scores = head_prior + p["affinity"] * (users @ head_vectors.T)
            if tail_draws:
                tail, tail_scores = self._tail(users, zipf, head, tail_draws, tail_share, rng)
                candidates = np.concatenate([candidates, tail], axis=1)
                scores = np.concatenate([scores, tail_scores], axis=1)
            scores = scores + rng.gumbel(size=scores.shape)
            # Gumbel-top-k: k draws without replacement, weights exp(prior + affinity * <user, item>).
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            chosen.append(np.take_along_axis(candidates, top, axis=1))
        # A random order within each user: the held-out (last) items are not the best-scoring ones.
        items = np.concatenate(chosen)
        items = np.take_along_axis(items, np.argsort(rng.random(items.shape), axis=1), axis=1)
        return pd.DataFrame({
            "user": np.repeat(self.user_ids(np.arange(num_users)), k),
            "item": self.item_ids(items.ravel()),
            "timestamp": np.tile(np.arange(k, dtype=np.int64), num_users),
        })

    def _tail(
        self, users: np.ndarray, zipf: ZipfLaw, head: int, draws: int, share: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tail candidates [users, draws] and their scores before noise; a repeated draw counts once, with
        the mass of all its draws, and its copies score -inf."""
        candidates = np.sort(zipf.sample(rng.random((len(users), draws)), first=head), axis=1)
        repeat = np.zeros(candidates.shape, dtype=bool)
        repeat[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
        run = np.cumsum(~repeat.ravel()) - 1  # every row starts a new run
        run_length = np.bincount(run)[run].reshape(candidates.shape)
        vectors = hashed_normal(candidates, self.params["latent_dim"], self.params["seed"])
        affinity = np.einsum("ucd,ud->uc", vectors, users) / math.sqrt(self.params["latent_dim"])
        scores = share + np.log(run_length) + self.params["affinity"] * affinity
        scores[repeat] = -np.inf
        return candidates, scores
