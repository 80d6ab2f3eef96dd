"""The scheme contract as named checks that a test suite (or ``embbench check``) runs on a registered scheme or a
Scheme instance, like scikit-learn's ``check_estimator`` and ``parametrize_with_checks``."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embbench.errors import BudgetTooSmall, ConfigError
from embbench.schemes import (
    UNSEEN_KINDS,
    Budget,
    FeatureSpec,
    Scheme,
    SchemePlan,
    state_size_bytes,
)

#: distinct training IDs of the feature the checks embed
VOCABULARY = 5000
#: budgets at which the size accounting is checked: the full table's size, then fractions of it
SIZE_BUDGETS = ("1", "1/2", "1/4", "1/8", "1/16", "1/32", "1/64", "1/128", "1/1000")
#: the budget the other checks build at: the first of these the scheme fits in
BUILD_BUDGETS = ("1/4", "1/2", "1")
#: budgets at which a scheme that ``fills_budget`` must use >= BUDGET_USE of it, for a large vocabulary
BUDGET_USE_BUDGETS = ("1/2", "1/4", "1/8", "1/16", "1/64")
BUDGET_USE_VOCABULARY = 200_000
BUDGET_USE_DIM = 32
BUDGET_USE = 0.9
#: (table backend, table optimizer) pairs a table-backed module must embed the same under
COLLECTION_TRAININGS = (("torch", "adam"), ("torch", "dense-adam"), ("torchrec", "sgd"))
COLLECTION_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``message`` is the failure, or a note on a pass (e.g. why it did not apply)."""

    name: str
    passed: bool
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "passed": self.passed, "message": self.message}


class CheckFailed(AssertionError):
    """A scheme broke the contract; the message says where."""


def _expect(condition: Any, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _extreme_ids(vocabulary: int) -> torch.Tensor:
    """The edges of the vocabulary, unseen IDs just past it, negative IDs and the ends of int64."""
    return torch.tensor(
        [0, 1, vocabulary - 1, vocabulary, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)], dtype=torch.int64
    )


class _Subject:
    """The scheme under check: a fresh instance for every use, its name, and the feature the checks embed."""

    def __init__(self, scheme: str | Scheme, params: Mapping[str, Any] | None, dim: int) -> None:
        if isinstance(scheme, Scheme) and params:
            raise ConfigError("hyper-parameters apply to a registered scheme name; pass a configured instance alone")
        self.scheme = scheme
        self.params = dict(params or {})
        self.dim = dim
        self.feature = FeatureSpec.from_vocabulary("item", VOCABULARY, dim)

    def create(self) -> Scheme:
        if isinstance(self.scheme, Scheme):
            return copy.deepcopy(self.scheme)
        from embbench.registry import create_scheme

        return create_scheme(self.scheme, **self.params)

    def configured(self) -> bool:
        """Whether the scheme runs with parameters other than its defaults (given, or an instance's own)."""
        if not isinstance(self.scheme, Scheme):
            return bool(self.params)
        try:
            return self.scheme.get_params() != type(self.scheme)().get_params()
        except Exception:  # no default construction: every instance is configured
            return True

    @staticmethod
    def budget_bytes(budget: str, feature: FeatureSpec) -> int:
        return Budget.parse(budget).resolve(feature.num_ids, feature.dim)

    def build(self, budget: str, seed: int = 0) -> tuple[nn.Module, SchemePlan]:
        """Plan and build at ``budget``. The stated size is not held to the module's here (as
        :func:`embbench.schemes.build_embedding` does) but by the size check, so that a size bug fails it alone."""
        scheme = self.create()
        plan = scheme.plan(self.feature, self.budget_bytes(budget, self.feature))
        return scheme.build(self.feature, plan, seed), plan

    def default_budget(self) -> str:
        """The first of BUILD_BUDGETS the scheme fits in."""
        scheme = self.create()
        for budget in BUILD_BUDGETS:
            try:
                scheme.plan(self.feature, self.budget_bytes(budget, self.feature))
            except BudgetTooSmall:
                continue
            return budget
        raise CheckFailed(f"the scheme fits in none of the budgets {', '.join(BUILD_BUDGETS)} of the full table")

    def build_default(self, seed: int = 0) -> nn.Module:
        module, _ = self.build(self.default_budget(), seed)
        return module


def check_loads(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """The plugin loads, and creating it gives a Scheme named as it is registered."""
    subject = _Subject(scheme, params, dim)
    instance = subject.create()
    _expect(isinstance(instance, Scheme), f"creating it gives {type(instance).__name__}, not a Scheme")
    if isinstance(scheme, str):
        _expect(instance.name == scheme, f"the registry named it '{scheme}' but its name is '{instance.name}'")
    _expect(instance.unseen_for() in UNSEEN_KINDS, f"unseen must be one of {UNSEEN_KINDS}, got {instance.unseen!r}")
    return ""


def check_get_params(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """``get_params`` reports the constructor's arguments (the given ones among them), and constructing the
    scheme's class from them gives a scheme with the same parameters."""
    subject = _Subject(scheme, params, dim)
    instance = subject.create()
    reported = instance.get_params()
    for key, value in subject.params.items():
        _expect(key in reported, f"get_params() lacks the parameter '{key}' it was created with: {reported}")
        _expect(reported[key] == value, f"get_params()['{key}'] is {reported[key]!r}, created with {value!r}")
    signature = inspect.signature(type(instance).__init__)
    named = [
        p.name for p in list(signature.parameters.values())[1:]
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    missing = [key for key in named if key not in reported]
    _expect(not missing, f"get_params() lacks the constructor parameter(s) {', '.join(missing)}: {reported}")
    rebuilt = type(instance)(**reported).get_params()
    _expect(rebuilt == reported, f"{type(instance).__name__}(**get_params()) reports {rebuilt}, not {reported}")
    return ""


def check_plan_names_scheme(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """The plan names the scheme by its registered name and states the budget it was planned for."""
    subject = _Subject(scheme, params, dim)
    instance = subject.create()
    budget_bytes = subject.budget_bytes(subject.default_budget(), subject.feature)
    plan = instance.plan(subject.feature, budget_bytes)
    _expect(isinstance(plan, SchemePlan), f"plan() returns {type(plan).__name__}, not a SchemePlan")
    _expect(plan.scheme == instance.name, f"the plan names scheme '{plan.scheme}', not '{instance.name}'")
    _expect(plan.budget_bytes == budget_bytes, f"the plan states a budget of {plan.budget_bytes}, not {budget_bytes}")
    return ""


def check_forward_shapes(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """The module maps int64 IDs [N] to float32 rows [N, dim]."""
    subject = _Subject(scheme, params, dim)
    module = subject.build_default()
    module.eval()
    with torch.no_grad():
        out = module(torch.tensor([3, 17, VOCABULARY - 1]))
    _expect(out.shape == (3, dim), f"3 IDs embed to shape {tuple(out.shape)}, not (3, {dim})")
    _expect(out.dtype == torch.float32, f"embeddings are {out.dtype}, not torch.float32")
    return ""


def check_determinism(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """The same seed builds the same embeddings; another seed builds others."""
    subject = _Subject(scheme, params, dim)
    ids = torch.arange(0, VOCABULARY, 7)
    first, second, other = (subject.build_default(seed) for seed in (3, 3, 4))
    with torch.no_grad():
        for module in (first, second, other):
            module.eval()
        _expect(torch.equal(first(ids), second(ids)), "two modules built with seed 3 embed the IDs differently")
        _expect(not torch.equal(first(ids), other(ids)), "modules built with seeds 3 and 4 embed the IDs alike")
    return ""


def check_unseen_and_extreme_ids(
    scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16
) -> str:
    """Unseen, negative and extreme int64 IDs embed to finite rows."""
    subject = _Subject(scheme, params, dim)
    module = subject.build_default()
    module.eval()
    ids = _extreme_ids(VOCABULARY)
    with torch.no_grad():
        out = module(ids)
    _expect(out.shape == (len(ids), dim), f"{len(ids)} IDs embed to shape {tuple(out.shape)}, not ({len(ids)}, {dim})")
    bad = ids[~torch.isfinite(out).all(dim=1)].tolist()
    _expect(not bad, f"IDs {bad} embed to non-finite values")
    return ""


def check_size_accounting(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """At budgets 1, 1/2 ... 1/1000 of the full table the stated size equals the module's state and fits the
    budget, or the scheme raises BudgetTooSmall naming itself and a minimum above the budget; it builds at one
    budget at least."""
    subject = _Subject(scheme, params, dim)
    name = subject.create().name
    built, too_small = [], []
    for budget in SIZE_BUDGETS:
        allowed = subject.budget_bytes(budget, subject.feature)
        instance = subject.create()
        try:
            plan = instance.plan(subject.feature, allowed)
        except BudgetTooSmall as exc:
            _expect(f"minimum of scheme '{name}'" in str(exc), f"budget {budget}: BudgetTooSmall names another "
                    f"scheme: {exc}")
            _expect(exc.minimum_bytes > allowed, f"budget {budget}: BudgetTooSmall states a minimum of "
                    f"{exc.minimum_bytes:,} bytes, within the budget of {allowed:,}")
            too_small.append(budget)
            continue
        _expect(plan.budget_bytes == allowed, f"budget {budget}: the plan states a budget of {plan.budget_bytes:,} "
                f"bytes, not {allowed:,}")
        _expect(plan.size_bytes <= allowed, f"budget {budget}: the plan states {plan.size_bytes:,} bytes, over the "
                f"budget of {allowed:,}, and does not raise BudgetTooSmall")
        stored = state_size_bytes(instance.build(subject.feature, plan, 0))
        _expect(stored == plan.size_bytes, f"budget {budget}: the plan states {plan.size_bytes:,} bytes but the "
                f"module stores {stored:,}")
        built.append(budget)
    _expect(built, f"it builds at none of the budgets {', '.join(SIZE_BUDGETS)}")
    return f"below the minimum at {', '.join(too_small)}" if too_small else ""


def check_budget_use(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """A scheme that ``fills_budget`` plans at least 90% of budgets 1/2 ... 1/64 of a large feature's full table
    (200,000 IDs of dimension 32); skipped where given parameters fix the size (it is the same at every budget)."""
    subject = _Subject(scheme, params, dim)
    instance = subject.create()
    if not instance.fills_budget:
        return f"skipped: {type(instance).__name__}.fills_budget is False"
    feature = FeatureSpec.from_vocabulary("item", BUDGET_USE_VOCABULARY, BUDGET_USE_DIM)
    allowed = {budget: subject.budget_bytes(budget, feature) for budget in BUDGET_USE_BUDGETS}
    plans = {budget: subject.create().plan(feature, allowed[budget]) for budget in BUDGET_USE_BUDGETS}
    if len({plan.size_bytes for plan in plans.values()}) == 1 and subject.configured():
        return "skipped: with these parameters the size does not depend on the budget"
    for budget, plan in plans.items():
        _expect(plan.size_bytes >= BUDGET_USE * allowed[budget], f"budget {budget}: plans {plan.size_bytes:,} "
                f"bytes, {plan.size_bytes / allowed[budget]:.1%} of {allowed[budget]:,} (at least {BUDGET_USE:.0%} "
                "expected)")
    return ""


def check_gradients(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """A loss on a batch of seen and unseen IDs gives every parameter a non-zero gradient."""
    subject = _Subject(scheme, params, dim)
    module = subject.build_default()
    module.train()
    ids = torch.randint(0, VOCABULARY + 1000, (512,), generator=torch.Generator().manual_seed(0))
    module(ids).pow(2).sum().backward()
    for name, parameter in module.named_parameters():
        _expect(parameter.grad is not None, f"parameter '{name}' gets no gradient")
        _expect(parameter.grad.abs().sum() > 0, f"parameter '{name}' gets a zero gradient")
    return ""


def check_index_tuples(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """Where the module offers ``index_tuples``: int64 [N, t], and IDs with equal tuples embed equally (checked at
    the smallest budget it builds at, where collisions show)."""
    subject = _Subject(scheme, params, dim)
    module: nn.Module | None = None
    for budget in ("1/64", "1/16", "1/4", "1/2", "1"):
        try:
            module, _ = subject.build(budget)
            break
        except BudgetTooSmall:
            continue
    _expect(module is not None, "it builds at none of the budgets 1/64, 1/16, 1/4, 1/2, 1")
    assert module is not None
    if not callable(getattr(module, "index_tuples", None)):
        return f"skipped: {type(module).__name__} has no index_tuples"
    module.eval()
    ids = torch.arange(0, 4 * VOCABULARY)
    tuples = module.index_tuples(ids)
    _expect(tuples.dtype == torch.int64, f"index_tuples gives {tuples.dtype}, not torch.int64")
    _expect(tuples.shape[0] == len(ids), f"index_tuples of {len(ids)} IDs has {tuples.shape[0]} rows")
    _, inverse = torch.unique(tuples.reshape(len(ids), -1), dim=0, return_inverse=True)
    first_of = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64)
    first_of[inverse.flip(0)] = ids.flip(0)  # the first ID of each tuple group
    with torch.no_grad():
        try:
            torch.testing.assert_close(module(ids), module(first_of[inverse]))
        except AssertionError as exc:
            raise CheckFailed(f"IDs with equal index tuples embed differently: {exc}") from None
    return ""


def check_epoch_end_keeps_size(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """Where the module offers ``on_epoch_end``: after a training step and the call, it stores as many bytes as
    before and still embeds to finite rows."""
    subject = _Subject(scheme, params, dim)
    module = subject.build_default()
    if not callable(getattr(module, "on_epoch_end", None)):
        return f"skipped: {type(module).__name__} has no on_epoch_end"
    before = state_size_bytes(module)
    module.train()
    ids = torch.randint(0, VOCABULARY + 1000, (512,), generator=torch.Generator().manual_seed(1))
    module(ids).pow(2).sum().backward()
    module.on_epoch_end(0)
    after = state_size_bytes(module)
    _expect(after == before, f"on_epoch_end changes the module's state from {before:,} to {after:,} bytes")
    module.eval()
    with torch.no_grad():
        _expect(torch.isfinite(module(ids)).all(), "after on_epoch_end, IDs embed to non-finite values")
    return ""


def check_collection_matches_standalone(
    scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16
) -> str:
    """A table-backed module embeds the same looked up through a model's table collection
    (``FeatureEmbeddings({"f": module}, TableTraining(backend, optimizer))``) as standalone, for each table
    kernel: in training mode batch after batch (a scheme may learn from the IDs it sees), then in evaluation."""
    from embbench.collection import FeatureEmbeddings, TableTraining, torchrec_available
    from embbench.tables import TableBackedEmbedding

    subject = _Subject(scheme, params, dim)
    module = subject.build_default()
    if not isinstance(module, TableBackedEmbedding):
        return f"skipped: {type(module).__name__} is not a TableBackedEmbedding"
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCABULARY + 500, (256,), generator=generator) for _ in range(2)]
    batches.append(torch.cat([torch.arange(0, VOCABULARY + 500, 3), _extreme_ids(VOCABULARY)]))
    checked, note = [], ""
    for backend, optimizer in COLLECTION_TRAININGS:
        if backend == "torchrec" and not torchrec_available():
            note = "; torchrec is not available here"
            continue
        standalone = copy.deepcopy(module)
        embeddings = FeatureEmbeddings({"f": copy.deepcopy(module)}, TableTraining(backend, optimizer))
        where = f"through the collection ({backend}, {optimizer}: the {embeddings.kernel} kernel)"
        for training in (True, False):
            standalone.train(training)
            embeddings.train(training)
            for index, ids in enumerate(batches):
                with torch.no_grad(), torch.random.fork_rng():
                    torch.manual_seed(index)
                    got = embeddings.embed("f", ids)
                    torch.manual_seed(index)
                    want = standalone(ids)
                try:
                    torch.testing.assert_close(got, want, **COLLECTION_TOLERANCE)
                except AssertionError as exc:
                    mode = "training" if training else "evaluation"
                    raise CheckFailed(f"{where}, in {mode}, batch {index} embeds otherwise than the standalone "
                                      f"module: {' '.join(str(exc).split())}") from None
        checked.append(f"{backend}/{optimizer}")
    return f"checked {', '.join(checked)}{note}"


def check_bags_pool_embeddings(scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16) -> str:
    """A bag of IDs (:mod:`embbench.bags`) embeds as the sum, or the mean, of its IDs' embeddings and an empty bag
    as zeros, standalone and, for a table-backed module, through the collection's kernels. A module with its own
    ``embed_bags`` (DHE pooling encodings) is held to one-ID bags embedding as the ID and empty bags as zeros."""
    from embbench.bags import BAG_MODES, Bags, bag_route, embed_bags
    from embbench.collection import FeatureEmbeddings, TableTraining, torchrec_available
    from embbench.tables import TableBackedEmbedding

    subject = _Subject(scheme, params, dim)
    module = subject.build_default()
    module.eval()
    route = bag_route(module)
    generator = torch.Generator().manual_seed(5)
    lengths = torch.tensor([1, 1] if route == "own" else [3, 0, 1, 5, 0, 2])
    values = torch.randint(0, VOCABULARY + 500, (int(lengths.sum()),), generator=generator)
    if route != "own":
        values[1] = values[0]  # an ID twice in one bag
    lengths = torch.cat((lengths, torch.zeros(1, dtype=torch.int64)))  # an empty bag last
    offsets = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    with torch.no_grad():
        singles = [module(values[start:stop]) if stop > start else None
                   for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    zeros = torch.zeros(dim)
    embedded = [("standalone", module)]
    note = ""
    if isinstance(module, TableBackedEmbedding):
        for backend, optimizer in COLLECTION_TRAININGS:
            if backend == "torchrec" and not torchrec_available():
                note = "; torchrec is not available here"
                continue
            embeddings = FeatureEmbeddings({"f": copy.deepcopy(module)}, TableTraining(backend, optimizer)).eval()
            embedded.append((f"through the collection ({backend}, {optimizer})", embeddings["f"]))
    for mode in BAG_MODES:
        want = torch.stack([
            zeros if rows is None else rows.sum(0) / (len(rows) if mode == "mean" else 1) for rows in singles
        ])
        for where, embedder in embedded:
            with torch.no_grad():
                got = embed_bags(embedder, Bags(values, offsets, mode))
            try:
                torch.testing.assert_close(got, want, **COLLECTION_TOLERANCE)
            except AssertionError as exc:
                raise CheckFailed(f"{where}, {mode} bags (route '{route}') embed otherwise than the {mode} of their "
                                  f"IDs' embeddings: {' '.join(str(exc).split())}") from None
    return f"route '{route}': checked {', '.join(where for where, _ in embedded)}{note}"


#: every check, in the order they run. Each takes a scheme (a registered name, or a Scheme instance), optional
#: hyper-parameters and the embedding dimension; it returns a note ("", or why it did not apply) when the scheme
#: keeps that part of the contract and raises AssertionError saying what broke when not.
CHECKS: tuple[Callable[..., str], ...] = (
    check_loads,
    check_get_params,
    check_plan_names_scheme,
    check_forward_shapes,
    check_determinism,
    check_unseen_and_extreme_ids,
    check_size_accounting,
    check_budget_use,
    check_gradients,
    check_index_tuples,
    check_epoch_end_keeps_size,
    check_collection_matches_standalone,
    check_bags_pool_embeddings,
)


def check_name(check: Callable[..., Any]) -> str:
    """``check_forward_shapes`` -> ``forward_shapes``."""
    return check.__name__.removeprefix("check_")


def scheme_checks(
    scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16
) -> Iterator[tuple[str, Callable[[], str]]]:
    """(check name, check) for every check, each check a callable of no arguments that returns a note or raises
    AssertionError. Nothing is loaded until a check runs, so a broken plugin fails only its own checks."""
    for check in CHECKS:
        yield check_name(check), functools.partial(check, scheme, params, dim)


def _validate(scheme: str | Scheme, params: Mapping[str, Any] | None, dim: int) -> None:
    """Raise the user's error (unknown scheme, rejected parameters, bad dim) before any check runs."""
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}")
    if isinstance(scheme, Scheme):
        _Subject(scheme, params, dim)
        return
    from embbench.registry import create_scheme, get_info

    if get_info("schemes", scheme).status == "ok" and params:
        create_scheme(scheme, **params)


def check_scheme(
    scheme: str | Scheme, params: Mapping[str, Any] | None = None, dim: int = 16
) -> list[CheckResult]:
    """Run every check on ``scheme`` (a registered name, or an instance), never stopping at a failure.

    Raises :class:`embbench.errors.EmbbenchError` for bad input: an unknown name, parameters the scheme
    rejects, a dim below 1. A broken plugin is not bad input: its checks fail, naming its error.
    """
    _validate(scheme, params, dim)
    results = []
    for name, check in scheme_checks(scheme, params, dim):
        try:
            note = check()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin's fault, whatever it raises, fails only this check
            results.append(CheckResult(name, False, _describe(exc)))
        else:
            results.append(CheckResult(name, True, note or ""))
    return results


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckFailed):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parametrize_with_checks(
    schemes: Iterable[str | Scheme | tuple[str, Mapping[str, Any]]], dim: int = 16
) -> Any:
    """A ``pytest.mark.parametrize`` over (scheme, check) for every check of every scheme (a name, an instance,
    or a (name, params) pair)::

        @parametrize_with_checks(list_schemes())
        def test_scheme_contract(scheme, check):
            check()
    """
    import pytest

    cases = []
    for item in schemes:
        scheme, params = item if isinstance(item, tuple) else (item, None)
        label = scheme if isinstance(scheme, str) else scheme.name
        if params:
            label += "(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"
        for name, check in scheme_checks(scheme, params, dim):
            cases.append(pytest.param(scheme, check, id=f"{label}-{name}"))
    return pytest.mark.parametrize(("scheme", "check"), cases)
