"""``managed-collision``: torchrec's zero-collision hashing (MCHManagedCollisionModule) in front of a table.

A remapping table of ``rows - 1`` slots holds the raw IDs seen most often (LFU), most recently (LRU) or both
(distance-LFU) during training; each admitted ID owns a row, and every other ID (unseen, or not admitted)
shares the last row. The remapping is learnt online: in training mode each batch's IDs are recorded, and every
``eviction_interval`` batches torchrec's ``profile`` admits the winners and evicts the losers (an admitted ID
takes over the evicted ID's row and its trained vector, as torchrec's unsharded module does). Evaluation only
remaps. The size counts all that the module stores, torchrec's remapping state included: per slot the raw ID,
its row and the eviction metadata (int64 each), plus torchrec's fixed sharding metadata (1,025 int64 output
segments and an iteration counter).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    Lookup,
    PluginError,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
)

#: eviction policy name -> number of int64 metadata buffers torchrec keeps per slot
EVICTION_POLICIES = {"lfu": 1, "lru": 1, "distance-lfu": 2}
#: torchrec's ManagedCollisionModule state outside the slots: 1,025 output segments and the iteration counter
FIXED_STATE_BYTES = (1025 + 1) * ID_BYTES
MIN_ROWS = 2  # one admitted ID and the shared row of every other ID


def managed_collision_size_bytes(rows: int, dim: int, eviction_policy: str) -> int:
    """The table, and per slot the raw ID, its row and the policy's metadata, plus torchrec's fixed state."""
    per_slot = dim * FLOAT_BYTES + (2 + EVICTION_POLICIES[eviction_policy]) * ID_BYTES
    return FIXED_STATE_BYTES + rows * per_slot


def _torchrec_mch() -> Any:
    # torch.fx logs a deprecation warning when torchrec imports; it is not the user's concern.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        from torchrec.modules import mc_modules
        from torchrec.sparse.jagged_tensor import JaggedTensor
    except Exception as exc:  # ImportError, or fbgemm failing to load its library
        raise PluginError(
            "scheme 'managed-collision' wraps torchrec's MCHManagedCollisionModule, and torchrec cannot be "
            f"imported here ({type(exc).__name__}: {exc}); install it as the README says (requirements/torchrec.txt)"
        ) from None
    return mc_modules, JaggedTensor


class ManagedCollisionLookup(TableBackedEmbedding):
    """Raw IDs -> torchrec MCH remapping -> rows of one table."""

    combine_is_linear = True  # one row per ID: a bag pools its rows in the table kernel

    def __init__(self, rows: int, dim: int, eviction_policy: str, eviction_interval: int, seed: int) -> None:
        super().__init__()
        mc_modules, self._jagged = _torchrec_mch()
        policy = {
            "lfu": mc_modules.LFU_EvictionPolicy,
            "lru": mc_modules.LRU_EvictionPolicy,
            "distance-lfu": mc_modules.DistanceLFU_EvictionPolicy,
        }[eviction_policy]()
        # torchrec's own interval is 1: this module buffers batches itself, so that a batch of any size is
        # profiled whole (torchrec sizes its history buffer from the first batch it sees).
        self.mch = mc_modules.MCHManagedCollisionModule(
            zch_size=rows, device=torch.device("cpu"), eviction_policy=policy, eviction_interval=1
        )
        self.table = EmbeddingTable(rows, dim, seed=seed)
        self.eviction_interval = eviction_interval
        self._pending: list[torch.Tensor] = []
        self._profile_capacity: int | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> ManagedCollisionLookup:
        # torchrec's MCH keeps Python references to its buffers (eviction metadata, history) that a device move
        # would leave behind; it stays on the CPU and remaps IDs there, and only the table moves.
        self.table._apply(fn, recurse)
        return self

    def _features(self, ids: torch.Tensor) -> dict[str, Any]:
        values = ids.detach().to("cpu", torch.int64).contiguous()
        return {"ids": self._jagged(values=values, lengths=torch.tensor([values.numel()], dtype=torch.int64))}

    @torch.no_grad()
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Each ID's row: its slot's row if admitted, else the shared last row."""
        return self.mch.remap(self._features(ids))["ids"].values().to(ids.device)

    @torch.no_grad()
    def update_remapping(self) -> None:
        """Profile the buffered training IDs: admit and evict by the eviction policy."""
        if not self._pending:
            return
        ids = torch.cat(self._pending)
        self._pending.clear()
        if self._profile_capacity is None:
            self._profile_capacity = max(ids.numel(), 1)
        self.mch.train()
        for chunk in ids.split(self._profile_capacity):  # each call must fit torchrec's history buffer
            self.mch.profile(self._features(chunk))

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).unsqueeze(1)

    def record(self, ids: torch.Tensor) -> None:
        """Buffer a training batch's IDs; every ``eviction_interval`` batches, update the remapping."""
        self._pending.append(ids.detach().cpu())
        if len(self._pending) >= self.eviction_interval:
            self.update_remapping()

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        # Recorded here, not in forward: inside a collection only lookups() sees the batch.
        if self.training:
            self.record(ids)
        return [self.table.lookup(self.rows(ids))]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return pooled[0]

    def on_epoch_end(self, epoch: int) -> None:
        self.update_remapping()  # evaluation sees every ID of the epoch profiled

    def extra_repr(self) -> str:
        return f"eviction_interval={self.eviction_interval}"


class ManagedCollision(Scheme):
    """Managed collision hashing (torchrec MCH): the IDs that win the eviction policy own a row each; the rest
    share one. Rows (slots) solved from the budget, the remapping state counted in the size."""

    summary = "torchrec managed collisions (MCH): IDs admitted by LFU/LRU own rows, the rest share one"
    unseen = "collided"

    def __init__(self, rows: int | None = None, eviction_policy: str = "lfu", eviction_interval: int = 1) -> None:
        if rows is not None and rows < MIN_ROWS:
            raise ValueError(f"rows must be >= {MIN_ROWS} or unset (solved from the budget), got {rows}")
        if eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction_policy must be one of {', '.join(EVICTION_POLICIES)}, got '{eviction_policy}'"
            )
        if eviction_interval < 1:
            raise ValueError(f"eviction_interval must be >= 1 (training batches), got {eviction_interval}")
        self.rows, self.eviction_policy, self.eviction_interval = rows, eviction_policy, eviction_interval

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        def size_of(rows: int) -> int:
            return managed_collision_size_bytes(rows, feature.dim, self.eviction_policy)

        minimum = size_of(self.rows or MIN_ROWS)
        if minimum > budget_bytes:
            raise BudgetTooSmall(self.name, budget_bytes, minimum, "torchrec's fixed state is 8,208 bytes")
        if self.rows is not None:
            rows = self.rows
        else:  # more than a slot per training ID (plus the shared row) would stay empty
            per_slot = size_of(1) - FIXED_STATE_BYTES
            rows = min((budget_bytes - FIXED_STATE_BYTES) // per_slot, feature.num_ids + 1)
        params = {"rows": rows, "eviction_policy": self.eviction_policy, "eviction_interval": self.eviction_interval}
        return SchemePlan(self.name, params, size_of(rows), budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        params = plan.params
        return ManagedCollisionLookup(
            params["rows"], feature.dim, params["eviction_policy"], params["eviction_interval"], seed
        )
