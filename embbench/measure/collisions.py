"""Collision statistics of a scheme's index mapping: how many IDs share their full index tuple with another.

A built embedding module may expose ``index_tuples(ids: int64 [N]) -> int64 [N, t]``: the rows (or codes)
that alone determine an ID's embedding. Two IDs with equal tuples get equal embeddings whatever the training
does, so the fraction of IDs sharing their tuple with another ID is the scheme's collision rate: 0 for a
full table, quotient-remainder and binary-code tables; about 1 - e^(-n/m) for the hashing trick.

The count is exact. Each tuple is first reduced to a 64-bit key by a mixing function (equal tuples give
equal keys); IDs with a unique key are collision-free; only IDs whose key is shared are compared on their
full tuples. Memory is O(n) keys plus the tuples of the shared-key IDs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: the largest vocabulary whose collisions are counted exactly by default (n keys of 8 bytes each)
MAX_EXACT_IDS = 10**7
#: index entries computed at once (IDs per chunk x tuple width), bounding the memory of one chunk
_CHUNK_ENTRIES = 1 << 24

_MIX_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX_SHIFT = np.uint64(31)


@dataclass(frozen=True)
class CollisionStats:
    num_ids: int
    tuple_width: int
    distinct_tuples: int
    colliding_ids: int  # IDs whose index tuple equals another ID's
    collision_fraction: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_index_tuples(module: nn.Module) -> bool:
    return callable(getattr(module, "index_tuples", None))


def _mix(keys: np.ndarray, column: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        mixed = (keys ^ column.astype(np.uint64)) * _MIX_MULTIPLIER
        return mixed ^ (mixed >> _MIX_SHIFT)


def _tuples(module: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        tuples = module.index_tuples(ids)
    if tuples.dim() == 1:
        tuples = tuples.unsqueeze(1)
    return tuples.to(torch.int64).cpu().numpy()


def collision_stats(module: nn.Module, ids: np.ndarray | torch.Tensor) -> CollisionStats:
    """Exact collision statistics of ``module.index_tuples`` over the distinct ``ids``."""
    if not has_index_tuples(module):
        raise TypeError(f"{type(module).__name__} has no index_tuples(ids) method")
    ids = torch.as_tensor(np.unique(np.asarray(ids, dtype=np.int64)))
    num_ids = len(ids)
    if num_ids == 0:
        return CollisionStats(0, 0, 0, 0, 0.0)
    width = _tuples(module, ids[:1]).shape[1]
    chunk = max(1, _CHUNK_ENTRIES // max(width, 1))
    keys = np.empty(num_ids, dtype=np.uint64)
    for start in range(0, num_ids, chunk):
        tuples = _tuples(module, ids[start : start + chunk])
        key = np.full(len(tuples), np.uint64(width), dtype=np.uint64)
        for column in range(width):
            key = _mix(key, tuples[:, column])
        keys[start : start + chunk] = key
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts[inverse] > 1)
    if len(shared) == 0:
        return CollisionStats(num_ids, width, num_ids, 0, 0.0)
    # Keys can collide where tuples do not: compare the shared-key IDs on their full tuples.
    full = np.concatenate([_tuples(module, ids[shared[s : s + chunk]]) for s in range(0, len(shared), chunk)])
    _, tuple_inverse, tuple_counts = np.unique(full, axis=0, return_inverse=True, return_counts=True)
    colliding = int((tuple_counts[tuple_inverse.reshape(-1)] > 1).sum())
    distinct = (num_ids - len(shared)) + len(tuple_counts)
    return CollisionStats(num_ids, width, distinct, colliding, colliding / num_ids)


def estimated_collisions(
    module: nn.Module, vocabulary: int, sample: int = MAX_EXACT_IDS, seed: int = 0
) -> dict[str, Any]:
    """Collision statistics over IDs 0..vocabulary-1 estimated from an exact count on a random sample.

    On ``sample`` distinct IDs drawn uniformly, the exact colliding fraction f_n gives, for an index mapping
    that spreads IDs uniformly over R tuples, R from f_n = 1 - (1 - 1/R)^(n-1); the whole vocabulary's fraction
    is then 1 - (1 - 1/R)^(V-1). Exact for a uniform hash and 0 where the sample has no collision (a
    dictionary); a mapping that crowds some tuples makes it an underestimate.
    """
    generator = np.random.default_rng(seed)
    ids = np.unique(generator.integers(0, vocabulary, size=min(sample, vocabulary), dtype=np.int64))
    measured = collision_stats(module, ids)
    n, fraction = measured.num_ids, measured.collision_fraction
    if fraction == 0.0 or n < 2:
        estimate, tuples = 0.0, None
    elif fraction >= 1.0:
        estimate, tuples = 1.0, None
    else:
        inverse_tuples = -math.expm1(math.log1p(-fraction) / (n - 1))  # 1/R
        estimate = -math.expm1((vocabulary - 1) * math.log1p(-inverse_tuples))
        tuples = 1.0 / inverse_tuples
    return {
        "num_ids": vocabulary,
        "tuple_width": measured.tuple_width,
        "distinct_tuples": None,
        "colliding_ids": round(estimate * vocabulary),
        "collision_fraction": estimate,
        "estimated": True,
        "sample_ids": n,
        "sample_collision_fraction": fraction,
        "implied_tuples": tuples,
    }
