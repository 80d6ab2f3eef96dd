"""The scheme API: what every embedding scheme plugin provides, and how its size is counted.

A scheme is a recipe (hyper-parameters, validated once in ``__init__``). Given one categorical feature and
a size budget, ``plan`` resolves the remaining hyper-parameters (a table's rows, an MLP's width) and states
the exact size; ``build`` returns a torch module mapping a 1-D int64 tensor of raw IDs (any int64, seen in
training or not) to a float tensor [N, dim]. The size of a module is counted from its state: every
parameter and persistent buffer, in bytes. :func:`build_embedding` holds the two equal.

A built module may also offer, and the core uses when present:

- ``index_tuples(ids) -> int64 [N, t]``: the rows or codes that alone determine each ID's embedding, for
  collision statistics (:mod:`embbench.collisions`);
- ``on_epoch_end(epoch: int) -> None``: called by the trainer after each training epoch (e.g. CCE
  re-clusters there). It must not change the module's size.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
from torch import nn

from embbench.errors import BudgetTooSmall, ConfigError

FLOAT_BYTES = 4
ID_BYTES = 8

UNSEEN_KINDS = ("dedicated", "collided", "generated")


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical feature as the training split sees it.

    ``ids`` are the distinct raw IDs of the training split, sorted; ``counts`` their frequencies in it;
    ``side`` optional side features, float32 [len(ids), s] aligned with ``ids`` (e.g. an item's genres), that
    schemes may use as input (DHE's side-feature encoding); like the ID itself, they are input data, not state.
    ``vocabulary_size`` is the feature's declared cardinality where the data knows it (a generator's
    vocabulary, larger than the IDs a training sample happens to contain); budget fractions and the full
    table refer to it. Without it, the vocabulary is the training IDs.
    """

    name: str
    ids: np.ndarray
    counts: np.ndarray
    dim: int
    side: np.ndarray | None = None
    vocabulary_size: int | None = None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"feature '{self.name}': embedding dim must be >= 1, got {self.dim}")
        if len(self.ids) != len(self.counts):
            raise ValueError("ids and counts must have the same length")
        if self.side is not None and (self.side.ndim != 2 or len(self.side) != len(self.ids)):
            raise ValueError(f"side features must be [len(ids), s], got shape {self.side.shape}")
        if self.vocabulary_size is not None and self.vocabulary_size < len(self.ids):
            raise ValueError(
                f"feature '{self.name}': vocabulary_size {self.vocabulary_size:,} is smaller than the "
                f"{len(self.ids):,} distinct training IDs"
            )

    @property
    def num_ids(self) -> int:
        """The distinct training IDs."""
        return int(len(self.ids))

    @property
    def vocabulary(self) -> int:
        """The feature's cardinality: ``vocabulary_size`` where declared, else the distinct training IDs."""
        return int(self.vocabulary_size) if self.vocabulary_size is not None else self.num_ids

    @classmethod
    def from_vocabulary(cls, name: str, num_ids: int, dim: int) -> FeatureSpec:
        """A feature whose IDs are 0..num_ids-1, each seen once (for sizing without data)."""
        if num_ids < 1:
            raise ConfigError(f"feature '{name}': vocabulary size must be >= 1, got {num_ids}")
        # Every count is 1: a read-only broadcast view, so a vocabulary of 10^9 costs only its 8 GB of IDs.
        return cls(name, np.arange(num_ids, dtype=np.int64), np.broadcast_to(np.int64(1), (num_ids,)), dim)


def full_table_bytes(num_ids: int, dim: int) -> int:
    """The reference size that budget fractions refer to: a dedicated fp32 row for each of the ``num_ids``
    IDs, one out-of-vocabulary row, and the sorted int64 ID dictionary that maps raw IDs to rows."""
    return (num_ids + 1) * dim * FLOAT_BYTES + num_ids * ID_BYTES


_BYTES_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """A size budget: a fraction of the full table's size ("1/4", 0.25) or absolute bytes ("64MB", "1.5GiB")."""

    fraction: Fraction | None = None
    absolute_bytes: int | None = None

    @classmethod
    def parse(cls, value: Any) -> Budget:
        if isinstance(value, Budget):
            return value
        text = str(value).strip().lower().replace("_", "")
        match = re.fullmatch(r"([0-9.]+)\s*(b|kb|mb|gb|kib|mib|gib)", text)
        if match:
            number = float(match.group(1))
            size = int(number * _BYTES_UNITS[match.group(2)])
            if size < 1:
                raise ConfigError(f"budget '{value}' must be at least 1 byte")
            return cls(absolute_bytes=size)
        try:
            fraction = Fraction(text) if "/" in text else Fraction(text).limit_denominator(10**6)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(
                f"budget '{value}' is neither a fraction of the full table (1, 1/4, 0.25) nor a size in "
                "bytes (65536b, 64MB, 1.5GiB)"
            ) from None
        if fraction <= 0:
            raise ConfigError(f"budget '{value}' must be positive")
        return cls(fraction=fraction)

    def resolve(self, num_ids: int, dim: int) -> int:
        """Bytes allowed for one feature of ``num_ids`` IDs and dimension ``dim``."""
        if self.absolute_bytes is not None:
            return self.absolute_bytes
        assert self.fraction is not None
        return math.floor(full_table_bytes(num_ids, dim) * self.fraction)

    def allocate(self, features: Mapping[str, FeatureSpec]) -> dict[str, int]:
        """Bytes for each feature when the budget applies to the sum over ``features``.

        A fraction applies to each feature's full table alike. Absolute bytes are shared in proportion to the
        features' full-table sizes, so every feature is compressed by the same ratio (and no feature gets more
        than its full table when the budget exceeds their sum).
        """
        if self.fraction is not None:
            return {name: self.resolve(f.vocabulary, f.dim) for name, f in features.items()}
        assert self.absolute_bytes is not None
        full = {name: full_table_bytes(f.vocabulary, f.dim) for name, f in features.items()}
        total = sum(full.values())
        if self.absolute_bytes >= total:
            return full
        return {name: self.absolute_bytes * size // total for name, size in full.items()}

    def __str__(self) -> str:
        if self.absolute_bytes is not None:
            return f"{self.absolute_bytes}b"
        return str(self.fraction)


@dataclass(frozen=True)
class SchemePlan:
    """A scheme resolved for one feature and budget: every hyper-parameter, and the exact size."""

    scheme: str
    params: dict[str, Any]
    size_bytes: int
    budget_bytes: int
    notes: dict[str, Any] = field(default_factory=dict)


class Scheme(ABC):
    """Base class of embedding scheme plugins (see docs/plugins.md).

    Subclasses take their hyper-parameters as explicit keyword arguments with defaults and validate them in
    ``__init__`` (raise ``ValueError`` naming the parameter and its allowed range).
    """

    #: one-line description shown by ``embbench list schemes``
    summary: ClassVar[str] = ""
    #: how an ID never seen in training is embedded: "dedicated", "collided" or "generated"
    unseen: ClassVar[str] = "collided"
    #: registry name, set by :func:`embbench.registry` users; informative only
    name: ClassVar[str] = ""
    #: whether ``plan`` solves its knobs from the budget and so uses at least 90% of it (the contract tests
    #: hold schemes to that); False for schemes of a fixed size, such as the full table
    fills_budget: ClassVar[bool] = True

    @abstractmethod
    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        """Resolve hyper-parameters to fit ``budget_bytes``; raise :class:`BudgetTooSmall` if impossible."""

    @abstractmethod
    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        """The embedding module for ``plan``: forward(int64 [N]) -> float [N, feature.dim]."""

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters this scheme was created with (scikit-learn style)."""
        return dict(getattr(self, "_params", {}))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.unseen not in UNSEEN_KINDS:
            raise TypeError(f"{cls.__name__}.unseen must be one of {UNSEEN_KINDS}")


def state_size_bytes(module: nn.Module) -> int:
    """Bytes a module must store: its parameters and persistent buffers (its state_dict), shared storage once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def mlp_size_bytes(widths: list[int], batch_norm: bool) -> int:
    """Bytes of a stack of Linear layers through ``widths`` (with bias), with BatchNorm1d (weight, bias,
    running mean/var: 4 floats per unit, plus one int64 batch counter) after every layer but the last."""
    total = 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=False):
        total += (fan_in * fan_out + fan_out) * FLOAT_BYTES
    if batch_norm:
        total += sum(4 * width * FLOAT_BYTES + ID_BYTES for width in widths[1:-1])
    return total


def largest_fitting(size_of: Any, lower: int, upper: int, budget_bytes: int) -> int | None:
    """The largest integer x in [lower, upper] with size_of(x) <= budget_bytes, for size_of increasing in x;
    None when even ``lower`` does not fit."""
    if size_of(lower) > budget_bytes:
        return None
    lo, hi = lower, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_embedding(
    scheme: Scheme, scheme_name: str, feature: FeatureSpec, budget_bytes: int, seed: int
) -> tuple[nn.Module, SchemePlan]:
    """Plan and build a scheme, and hold its stated size equal to the module's state and within budget."""
    plan = scheme.plan(feature, budget_bytes)
    if plan.size_bytes > budget_bytes:
        raise BudgetTooSmall(scheme_name, budget_bytes, plan.size_bytes)
    module = scheme.build(feature, plan, seed)
    actual = state_size_bytes(module)
    if actual != plan.size_bytes:
        raise RuntimeError(
            f"scheme '{scheme_name}' states {plan.size_bytes} bytes but its module stores {actual} bytes; "
            "this is a bug in the scheme's size formula"
        )
    return module, plan
