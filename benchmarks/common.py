"""Shared fixtures of the asv benchmarks: the scheme × budget grid, the reference feature, seeded inputs.

The grid is read from the plugin registry when asv imports the suite, so a newly installed or newly
landed scheme plugin is benchmarked without editing any file here. Only schemes whose status is ``ok``
are listed (``embbench list schemes`` shows the broken ones and why).

Nothing here runs a torch operation at import time: asv forks one child per benchmark from the process
that imported the suite, and torch's thread pools should start in the child.
"""

from __future__ import annotations

import torch
from torch import nn

from embbench import FeatureEmbeddings, TableTraining, registry
from embbench.errors import BudgetTooSmall
from embbench.schemes import Budget, FeatureSpec, SchemePlan, build_embedding

#: the fixed reference table: 10^6 IDs of dimension 32 (budget fractions are fractions of its size)
VOCAB = 10**6
DIM = 32
#: IDs per forward pass
BATCH_SIZES = [4096]
#: every registered scheme with status "ok", naturally sorted
SCHEMES = registry.list_schemes()
#: budget fractions of the full table; each scheme runs at the smallest one where it fits (see below)
BUDGETS = ["1", "1/4"]
SEED = 1
#: torch threads in every benchmark: one, so that a number depends neither on the core count nor on what
#: else runs on the machine (two threads on two busy cores are many times slower than one)
THREADS = 1


def use_benchmark_threads() -> None:
    """Called first in every benchmark's setup (in the forked child, never at import)."""
    torch.set_num_threads(THREADS)


def skip_unless_runnable(scheme: str, budget: str, feature: FeatureSpec | None = None) -> None:
    """Raise NotImplementedError (asv records the cell as skipped, n/a) for cells outside the grid's design.

    Every scheme runs at the smallest budget of :data:`BUDGETS` where it fits; budget 1 is the reference
    size, where only schemes that cannot compress (``full``) run.
    """
    feature = feature or reference_feature()
    fitting = [b for b in BUDGETS if _fits(scheme, b, feature)]
    if not fitting:
        raise NotImplementedError(f"{scheme} fits none of the budgets {BUDGETS} of {feature.num_ids:,} IDs")
    smallest = min(fitting, key=lambda b: Budget.parse(b).resolve(feature.num_ids, feature.dim))
    if budget != smallest:
        raise NotImplementedError(f"{scheme} is benchmarked at budget {smallest}, not {budget}")


def _fits(scheme: str, budget: str, feature: FeatureSpec) -> bool:
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    try:
        registry.create_scheme(scheme).plan(feature, budget_bytes)
    except BudgetTooSmall:
        return False
    return True


#: made at import (numpy only), so every forked benchmark process shares it
_REFERENCE = FeatureSpec.from_vocabulary("item", VOCAB, DIM)


def reference_feature() -> FeatureSpec:
    """IDs 0..10^6-1, each seen once, d = 32."""
    return _REFERENCE


def plan_embedding(scheme: str, budget: str, feature: FeatureSpec | None = None) -> SchemePlan:
    """The scheme's plan at ``budget`` (a fraction of ``feature``'s full table); skip when it cannot fit."""
    feature = feature or reference_feature()
    skip_unless_runnable(scheme, budget, feature)
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return registry.create_scheme(scheme).plan(feature, budget_bytes)


def build(scheme: str, budget: str, feature: FeatureSpec | None = None, seed: int = SEED) -> nn.Module:
    """The scheme's embedding module at ``budget`` of ``feature`` (default: the 10^6 x 32 reference)."""
    feature = feature or reference_feature()
    plan = plan_embedding(scheme, budget, feature)
    module, _ = build_embedding(registry.create_scheme(scheme), scheme, feature, plan.budget_bytes, seed)
    return module


def batch_ids(batch_size: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """A seeded batch of IDs drawn uniformly from the vocabulary."""
    return torch.randint(0, vocab, (batch_size,), generator=torch.Generator().manual_seed(seed))


#: how tables train in the benchmarks: the runner's default on a CPU (row-sparse Adam on the torch kernel)
TABLES = TableTraining("torch", "adam", 1e-3)


class Embedded(nn.Module):
    """One feature's scheme module in a FeatureEmbeddings, as a model holds it; forward(ids) -> [N, dim]."""

    def __init__(self, module: nn.Module, training: TableTraining = TABLES) -> None:
        super().__init__()
        self.embeddings = FeatureEmbeddings({"item": module}, training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings.embed("item", ids)


def train_step(model: nn.Module, optimizers: object, ids: torch.Tensor, target: torch.Tensor) -> None:
    """One forward, backward and optimizer step (``embbench.optimizers.make_optimizers``) on a squared-error
    loss against a fixed target."""
    loss = (model(ids) - target).square().mean()
    optimizers.zero_grad()  # type: ignore[attr-defined]
    loss.backward()
    optimizers.step()  # type: ignore[attr-defined]
