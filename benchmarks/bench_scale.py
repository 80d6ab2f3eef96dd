"""Click-through training at growing vocabularies: a compressed scheme's step time and memory must stay flat.

DLRM on ``synthetic-ctr`` (8 fields, 8,192 training rows) with 8 MB of embeddings for all fields together, at
10^5, 10^7 and 10^9 IDs per field: the same code path as ``embbench run suite scale``, scaled down to seconds.
"""

from __future__ import annotations

import torch

from embbench import FeatureEmbeddings, registry
from embbench.run.resolve import plan_features
from embbench.schemes import Budget, build_planned
from embbench.training import PlainStep, TrainConfig

from .common import TABLES, use_benchmark_threads

DIM = 16
BUDGET = "8MB"
ROWS = {"train_rows": 8192, "validation_rows": 1024, "test_rows": 1024}


class DLRMAtScale:
    params = [[10**5, 10**7, 10**9], ["hashing-trick", "robe", "dhe"]]
    param_names = ["vocabulary", "scheme"]

    def setup(self, vocabulary: int, scheme: str) -> None:
        use_benchmark_threads()
        dataset = registry.create_dataset("synthetic-ctr", vocabulary_size=vocabulary, **ROWS)
        task = registry.create("tasks", "ctr")
        data = task.prepare(dataset, DIM)
        instance = registry.create_scheme(scheme)
        plans = plan_features(instance, data.features, Budget.parse(BUDGET))
        modules = {
            name: build_planned(instance, scheme, feature, plans[name], seed=index + 1)
            for index, (name, feature) in enumerate(data.features.items())
        }
        torch.manual_seed(0)
        embeddings = FeatureEmbeddings(modules, TABLES)
        model = task.build_model(registry.get_model_class("dlrm"), embeddings, data, DIM, {})
        self.step = PlainStep(model, TrainConfig(learning_rate=1e-3), torch.device("cpu"))
        rows = data.payload["train"]
        self.inputs = tuple(tensor[:1024] for tensor in rows.inputs)
        self.labels = rows.labels[:1024]

    def _step(self) -> None:
        self.step(self.inputs, self.labels)

    def time_training_step(self, vocabulary: int, scheme: str) -> None:
        """One DLRM step (batch 1024, forward, backward, row-sparse Adam for tables, Adam for the rest)."""
        self._step()

    def peakmem_training_step(self, vocabulary: int, scheme: str) -> None:
        """Peak memory of the process: data, model and a training step (flat in the vocabulary)."""
        self._step()
