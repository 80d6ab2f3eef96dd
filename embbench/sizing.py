"""What ``embbench size`` answers: a scheme resolved for a vocabulary and budget, its exact size, and the
collision statistics of its index mapping over that vocabulary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from embbench import registry
from embbench.collisions import MAX_EXACT_IDS, collision_stats, has_index_tuples
from embbench.schemes import Budget, FeatureSpec, build_embedding, full_table_bytes


def size_report(
    scheme: str,
    vocab: int,
    dim: int,
    budget: str | float | int,
    params: dict[str, Any] | None = None,
    collisions: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Resolved hyper-parameters and exact size of ``scheme`` for IDs 0..vocab-1 at ``budget``.

    With ``collisions`` (and vocab <= MAX_EXACT_IDS) the module is built and the exact fraction of IDs that
    share their full index tuple with another ID is added under ``collisions``; otherwise that key is None.
    """
    instance = registry.create("schemes", scheme, where="--param", **(params or {}))
    feature = FeatureSpec.from_vocabulary("feature", vocab, dim)
    budget_bytes = Budget.parse(budget).resolve(vocab, dim)
    plan = instance.plan(feature, budget_bytes)
    full = full_table_bytes(vocab, dim)
    result: dict[str, Any] = {
        "scheme": scheme,
        "params": plan.params,
        "size_bytes": plan.size_bytes,
        "budget_bytes": budget_bytes,
        "full_bytes": full,
        "compression": full / plan.size_bytes if plan.size_bytes else math.inf,
        "budget_used": plan.size_bytes / budget_bytes,
        "unseen_ids": type(instance).unseen,
        "collisions": None,
    }
    if collisions and vocab <= MAX_EXACT_IDS:
        module, _ = build_embedding(instance, scheme, feature, budget_bytes, seed)
        if has_index_tuples(module):
            result["collisions"] = collision_stats(module, np.arange(vocab, dtype=np.int64)).as_dict()
    return result
