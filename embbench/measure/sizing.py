"""What ``embbench size`` answers: a scheme resolved for a vocabulary and budget exactly as a suite cell with one
feature would be (:func:`embbench.run.resolve.plan_features`), its exact size, and the collision statistics of
its index mapping over that vocabulary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from embbench import registry
from embbench.errors import ConfigError
from embbench.measure.collisions import MAX_EXACT_IDS, collision_stats, estimated_collisions, has_index_tuples
from embbench.measure.environment import available_memory_bytes
from embbench.run.resolve import MEMORY_HEADROOM, plan_features
from embbench.schemes import ID_BYTES, Budget, FeatureSpec, build_planned, full_table_bytes

#: the largest module ``size_report`` builds to count collisions
MAX_BUILD_BYTES = 2 * 10**9


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

    With ``collisions`` the module is built and the fraction of IDs that share their full index tuple with
    another ID is added under ``collisions``: counted exactly up to MAX_EXACT_IDS IDs, estimated from an exact
    count on a random sample of that many beyond (``estimated``: true; see ``estimated_collisions``). A module
    that would store more than MAX_BUILD_BYTES is not built, and ``collisions`` is None, as it is without
    ``collisions`` or for a scheme without index tuples.
    """
    instance = registry.create("schemes", scheme, where="--param", **(params or {}))
    available = available_memory_bytes()
    if available is not None and vocab * ID_BYTES > MEMORY_HEADROOM * available:
        fits = int(MEMORY_HEADROOM * available) // ID_BYTES
        raise ConfigError(
            f"--vocab {vocab:,}: sizing lists every ID (8 bytes each, {vocab * ID_BYTES:,} bytes), more than "
            f"{MEMORY_HEADROOM:.0%} of the {available:,} bytes this machine has available; use at most {fits:,} IDs"
        )
    feature = FeatureSpec.from_vocabulary("feature", vocab, dim)
    plan = plan_features(instance, {"feature": feature}, Budget.parse(budget))["feature"]
    budget_bytes = plan.budget_bytes
    full = full_table_bytes(vocab, dim)
    result: dict[str, Any] = {
        "scheme": scheme,
        "params": plan.params,
        "size_bytes": plan.size_bytes,
        "budget_bytes": budget_bytes,
        "full_bytes": full,
        "compression": full / plan.size_bytes if plan.size_bytes else math.inf,
        "budget_used": plan.size_bytes / budget_bytes,
        "unseen_ids": instance.unseen_for(plan),
        "notes": plan.notes,
        "collisions": None,
    }
    if collisions and plan.size_bytes <= MAX_BUILD_BYTES:
        module = build_planned(instance, scheme, feature, plan, seed)
        if has_index_tuples(module):
            if vocab <= MAX_EXACT_IDS:
                result["collisions"] = collision_stats(module, np.arange(vocab, dtype=np.int64)).as_dict()
            else:
                result["collisions"] = estimated_collisions(module, vocab, seed=seed)
    return result
