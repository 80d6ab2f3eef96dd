"""Training speed and accuracy of GMF with every registered scheme on a fixed, seeded synthetic task.

The task is small (1000 users, 500 items, 20 interactions each) so the whole grid runs in seconds per
scheme; every random choice is seeded and torch runs on one thread, so a change in a tracked AUC is a
change in the code, not noise.
"""

from __future__ import annotations

import torch
from embbench_plugins.tasks.ranking import RankingData

from embbench import FeatureEmbeddings, registry
from embbench.data import Split, features_of, prepare_split
from embbench.tasks import TaskData
from embbench.training import PlainStep, TrainConfig, TrainResult

from .common import BUDGETS, SCHEMES, TABLES, build, plan_embedding, use_benchmark_threads

TASK = {"num_users": 1000, "num_items": 500, "interactions_per_user": 20, "seed": 0}
DIM = 32
SEED = 0


def synthetic_split() -> Split:
    """The leave-last-out split of the fixed synthetic task (never read from or written to the cache)."""
    return prepare_split(registry.create_dataset("synthetic", **TASK), use_cache=False)


def train_gmf(split: Split, scheme: str, budget: str, config: TrainConfig) -> TrainResult:
    """GMF with ``scheme`` embeddings for users and items at ``budget``, trained and tested as the runner does
    (the ranking task, the table collection, row-sparse Adam for tables and Adam for the rest)."""
    features = features_of(split, DIM)
    modules = {
        name: build(scheme, budget, feature, seed=SEED * 1000 + offset + 1)
        for offset, (name, feature) in enumerate(features.items())
    }
    task = registry.create_task("ranking")
    data = TaskData(features, RankingData(split))
    torch.manual_seed(SEED)
    model = registry.get_model_class("gmf")(FeatureEmbeddings(modules, TABLES), DIM)
    return task.fit(model, data, config, SEED, PlainStep(model, config, torch.device("cpu")))


class _SyntheticTask:
    params = [SCHEMES, BUDGETS]
    param_names = ["scheme", "budget"]

    def setup_cache(self) -> Split:
        return synthetic_split()

    def setup(self, split: Split, scheme: str, budget: str) -> None:
        use_benchmark_threads()  # also fixes the summation order, hence the tracked AUC
        for feature in features_of(split, DIM).values():
            plan_embedding(scheme, budget, feature)  # NotImplementedError (skip) when the cell cannot run


class GMFEpoch(_SyntheticTask):
    """One GMF training epoch (4 sampled negatives per positive, batch 1024, Adam), then validation and
    test ranking over the 500-item catalogue: the runner's code path end to end."""

    def time_gmf_epoch(self, split: Split, scheme: str, budget: str) -> None:
        train_gmf(split, scheme, budget, TrainConfig(epochs=1))


class GMFAccuracy(_SyntheticTask):
    """Test AUC of GMF after a fixed short training (3 epochs, the best by validation AUC)."""

    unit = "AUC"

    def track_test_auc(self, split: Split, scheme: str, budget: str) -> float:
        return train_gmf(split, scheme, budget, TrainConfig(epochs=3, patience=3)).test["auc"]
