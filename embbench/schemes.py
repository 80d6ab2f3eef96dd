"""The scheme API: what every embedding scheme plugin provides, and how its size is counted.

A scheme is a recipe (hyper-parameters, validated once in ``__init__``). Given one categorical feature and
a size budget, ``plan`` resolves the remaining hyper-parameters (a table's rows, an MLP's width) and states
the exact size; ``build`` returns a torch module mapping a 1-D int64 tensor of raw IDs (any int64, seen in
training or not) to a float tensor [N, dim]. The size of a module is counted from its state: every
parameter and persistent buffer, in bytes. :func:`build_embedding` holds the two equal.

A built module may also offer, and the core uses when present:

- ``index_tuples(ids) -> int64 [N, t]``: the rows or codes that alone determine each ID's embedding, for
  collision statistics (:mod:`embbench.measure.collisions`);
- ``on_epoch_end(epoch: int) -> None``: called by the trainer after each training epoch (e.g. CCE
  re-clusters there). It must not change the module's size.

A scheme instance may instead embed all of a cell's features with one shared set of weights
(:attr:`Scheme.shares_features`): :meth:`Scheme.plan_shared` plans it once within the sum of the features' budgets,
:meth:`Scheme.build_shared` builds one module per feature over the shared tensors, and their size is counted once
(:func:`distinct_plans`, :func:`build_features`).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from embbench.errors import BudgetTooSmall, ConfigError

FLOAT_BYTES = 4
ID_BYTES = 8

UNSEEN_KINDS = ("dedicated", "collided", "generated")
#: how a scheme that offers it shares one module across a cell's features: "none" (a module per feature) or "all"
SHARE_MODES = ("none", "all")


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


#: the largest byte budget accepted (an exabyte: far beyond any machine; bounds arithmetic on it)
MAX_BUDGET_BYTES = 2**60
_BYTES_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """A size budget: a fraction of the full table's size ("1/4", 0.25) or absolute bytes ("64MB", "1.5GiB")."""

    fraction: Fraction | None = None
    absolute_bytes: int | None = None

    @classmethod
    def parse(cls, value: Any) -> Budget:
        """A budget from its text: a fraction in (0, 1] ("1/4", "0.25", 0.25) or bytes ("65536b", "64MB",
        "1.5GiB", at most 2^60); ConfigError otherwise."""
        if isinstance(value, Budget):
            return value
        text = str(value).strip().lower().replace("_", "")
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|mb|gb|kib|mib|gib)", text)
        if match:
            if len(match.group(1)) > 30:
                raise ConfigError(f"budget '{value}' is too large: at most {MAX_BUDGET_BYTES:,} bytes")
            size = math.floor(Fraction(match.group(1)) * _BYTES_UNITS[match.group(2)])
            if size < 1:
                raise ConfigError(f"budget '{value}' must be at least 1 byte")
            if size > MAX_BUDGET_BYTES:
                raise ConfigError(f"budget '{value}' is too large: at most {MAX_BUDGET_BYTES:,} bytes")
            return cls(absolute_bytes=size)
        if not re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d{1,3})?(/\d+(?:\.\d*)?)?", text) or len(text) > 40:
            raise ConfigError(
                f"budget '{value}' is neither a fraction of the full table (1, 1/4, 0.25) nor a size in "
                "bytes (65536b, 64MB, 1.5GiB)"
            )
        try:
            fraction = Fraction(text) if "/" in text else Fraction(text).limit_denominator(10**6)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"budget '{value}' is not a valid fraction (1, 1/4, 0.25)") from None
        if fraction <= 0:
            raise ConfigError(f"budget '{value}' must be positive")
        if fraction > 1:
            raise ConfigError(
                f"budget '{value}' is more than the full table; a fraction is at most 1 (give bytes, e.g. '64MB', "
                "for an absolute budget)"
            )
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
    """A scheme resolved for one feature and budget: every hyper-parameter, and the exact size.

    ``unseen`` is how this plan embeds IDs never seen in training, where the plan decides it (one of
    ``UNSEEN_KINDS``); None means the scheme class's ``unseen`` (see :meth:`Scheme.unseen_for`).
    ``shared_by`` names the features whose modules share this plan's weights (:meth:`Scheme.plan_shared`), in
    the order the module was built for; their size and budget are this plan's, counted once for all of them.
    Empty for the plan of one feature's own module.
    """

    scheme: str
    params: dict[str, Any]
    size_bytes: int
    budget_bytes: int
    notes: dict[str, Any] = field(default_factory=dict)
    unseen: str | None = None
    shared_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.unseen is not None and self.unseen not in UNSEEN_KINDS:
            raise ValueError(
                f"plan of scheme '{self.scheme}': unseen must be one of {', '.join(UNSEEN_KINDS)} or None, "
                f"got {self.unseen!r}"
            )


class Scheme(ABC):
    """Base class of embedding scheme plugins (see docs/plugins.md).

    Subclasses take their hyper-parameters as explicit keyword arguments with defaults and validate them in
    ``__init__`` (raise ``ValueError`` naming the parameter and its allowed range). The base class records the
    arguments each constructor is called with, so :meth:`get_params` needs no bookkeeping in the subclass.

    ``name`` (an instance attribute) is the name the scheme is registered under: the registry sets it when it
    creates the scheme, so a plugin writes ``SchemePlan(self.name, ...)`` and ``BudgetTooSmall(self.name,
    ...)``. A scheme constructed directly is named after its class (``HashingTrick`` -> ``hashing-trick``).
    """

    #: one-line description shown by ``embbench list schemes``
    summary: ClassVar[str] = ""
    #: how an ID never seen in training is embedded: "dedicated", "collided" or "generated"; a plan may state
    #: its own (``SchemePlan.unseen``)
    unseen: ClassVar[str] = "collided"
    #: whether ``plan`` solves its knobs from the budget and so uses at least 90% of it (the contract tests
    #: hold schemes to that); False for schemes of a fixed size, such as the full table
    fills_budget: ClassVar[bool] = True

    @abstractmethod
    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        """Resolve hyper-parameters to fit ``budget_bytes``; raise :class:`BudgetTooSmall` if impossible."""

    @abstractmethod
    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        """The embedding module for ``plan``: forward(int64 [N]) -> float [N, feature.dim]."""

    @property
    def shares_features(self) -> bool:
        """Whether this instance embeds all of a cell's features (two or more) with one shared set of weights,
        through :meth:`plan_shared` and :meth:`build_shared`, instead of a module per feature. False here; a
        scheme that implements them says True where its parameters ask for it (``dhe``'s ``share = "all"``)."""
        return False

    def plan_shared(self, features: Sequence[FeatureSpec], budget_bytes: int) -> SchemePlan:
        """One plan for the shared weights of all ``features`` within ``budget_bytes`` (the sum of their budgets),
        its ``shared_by`` their names in order; raise :class:`BudgetTooSmall` if impossible."""
        raise NotImplementedError(f"scheme '{self.name}' cannot share one module across features")

    def build_shared(self, features: Sequence[FeatureSpec], plan: SchemePlan, seed: int) -> dict[str, nn.Module]:
        """A module per feature of ``plan.shared_by``, by name, each forward(int64 [N]) -> float [N, dim] like
        :meth:`build`'s, holding the same shared tensors: their state together, shared tensors once, is
        ``plan.size_bytes``."""
        raise NotImplementedError(f"scheme '{self.name}' cannot share one module across features")

    @property
    def name(self) -> str:
        """The registered name (set by the registry), else a name derived from the class."""
        return self.__dict__.get("_scheme_name") or Scheme._name_from_class(type(self).__name__)

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_scheme_name"] = str(value)

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters this scheme was created with (scikit-learn style): the arguments of its
        constructor, bound to the constructor's signature with defaults applied."""
        return dict(self.__dict__.get("_constructor_params", {}))

    @classmethod
    def unseen_for(cls, plan: SchemePlan | None = None) -> str:
        """How IDs never seen in training are embedded under ``plan``: the plan's own ``unseen`` where it
        states one, else the class's."""
        if plan is not None and plan.unseen is not None:
            return plan.unseen
        return cls.unseen

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.unseen not in UNSEEN_KINDS:
            raise TypeError(f"{cls.__name__}.unseen must be one of {UNSEEN_KINDS}")
        if "__init__" in cls.__dict__:
            cls.__init__ = Scheme._recording_params(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @staticmethod
    def _recording_params(init: Any) -> Any:
        """``init`` wrapped so that, called as the instance's own constructor (not through ``super()``), it
        first records its arguments bound to its signature, defaults applied, for :meth:`get_params`."""
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Scheme, *args: Any, **kwargs: Any) -> None:
            if type(self).__init__ is recording_init:
                try:
                    bound = signature.bind(self, *args, **kwargs)
                except TypeError:
                    pass  # the constructor itself raises the error
                else:
                    bound.apply_defaults()
                    params: dict[str, Any] = {}
                    for key, value in list(bound.arguments.items())[1:]:  # after self
                        if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                            params.update(value)
                        else:
                            params[key] = value
                    self.__dict__["_constructor_params"] = params
            init(self, *args, **kwargs)

        return recording_init

    @staticmethod
    def _name_from_class(class_name: str) -> str:
        """``HashingTrick`` -> ``hashing-trick``, ``TTRec`` -> ``tt-rec``, ``ROBE`` -> ``robe``."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", class_name).lower()


def state_size_bytes(module: nn.Module) -> int:
    """Bytes a module must store: its parameters and persistent buffers (its state_dict), shared storage once."""
    return tensor_bytes(module.state_dict(keep_vars=True).values())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, storage shared between them counted once; packed sub-byte tensors (torchrec's
    UInt4Tensor) by the bytes underneath."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        packed = getattr(tensor, "elem", None)  # UIntXTensor wraps its uint8 bytes in .elem
        if isinstance(packed, torch.Tensor):
            tensor = packed
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
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
    return build_planned(scheme, scheme_name, feature, plan, seed), plan


def build_planned(scheme: Scheme, scheme_name: str, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
    """Build ``plan``, holding the stated size equal to what the module stores."""
    module = scheme.build(feature, plan, seed)
    actual = state_size_bytes(module)
    if actual != plan.size_bytes:
        raise RuntimeError(
            f"scheme '{scheme_name}' states {plan.size_bytes} bytes for feature '{feature.name}' but its module "
            f"stores {actual} bytes; this is a bug in the scheme's size formula"
        )
    return module


def modules_size_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes ``modules`` store together: the state of each, tensors shared between them counted once."""
    return tensor_bytes(tensor for module in modules for tensor in module.state_dict(keep_vars=True).values())


def distinct_plans(plans: Mapping[str, SchemePlan]) -> list[SchemePlan]:
    """The plan of each module once: a feature's own plan, and a shared plan once for all its ``shared_by``.
    Sizes and budgets of a cell's features add up over these."""
    seen: set[tuple[str, ...]] = set()
    distinct = []
    for plan in plans.values():
        if plan.shared_by:
            if plan.shared_by in seen:
                continue
            seen.add(plan.shared_by)
        distinct.append(plan)
    return distinct


def build_features(
    scheme: Scheme,
    scheme_name: str,
    features: Mapping[str, FeatureSpec],
    plans: Mapping[str, SchemePlan],
    seeds: Mapping[str, int],
) -> dict[str, nn.Module]:
    """Every feature's module from its plan and seed, by feature name, each stated size held equal to the state:
    a feature's own module alone (:func:`build_planned`); the modules of a shared plan built together by
    :meth:`Scheme.build_shared` from its first feature's seed, and held to the plan's size together."""
    modules: dict[str, nn.Module] = {}
    for name, feature in features.items():
        plan = plans[name]
        if not plan.shared_by:
            modules[name] = build_planned(scheme, scheme_name, feature, plan, seeds[name])
            continue
        if name in modules:
            continue
        group = plan.shared_by
        built = scheme.build_shared([features[member] for member in group], plan, seeds[group[0]])
        if sorted(built) != sorted(group):
            raise RuntimeError(
                f"scheme '{scheme_name}' built shared modules for {sorted(built)}, not for {sorted(group)}"
            )
        actual = modules_size_bytes(built.values())
        if actual != plan.size_bytes:
            raise RuntimeError(
                f"scheme '{scheme_name}' states {plan.size_bytes} bytes for the module shared by "
                f"{', '.join(group)} but the modules store {actual} bytes together; this is a bug in the "
                "scheme's size formula"
            )
        modules.update(built)
    return {name: modules[name] for name in features}
