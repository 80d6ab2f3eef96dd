"""Cells: one dataset x model x scheme with one value of every axis; what identifies a cell and its result.

A cell's identity (:meth:`Cell.identity`, hashed into :attr:`Cell.key`) is everything that changes what is
trained or measured: the entries and their parameters, every cell, training and axis setting, the number of
processes and torch threads, and the distribution and version of every plugin involved. A finished cell is
"the same" only when all of these are; a new plugin version, thread count or setting runs it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embbench.run.settings import AXIS, BASE_PRECISION, CELL, MEASURE, SETTINGS, TRAINING, derive
from embbench.run.suites import Entry, Suite
from embbench.training import TrainConfig


@dataclass(frozen=True)
class Cell:
    """One unit of work. ``settings`` holds every cell and training setting, each axis's value under its
    singular name (``budget``, ``device``, ``backend``, ``sharding``, ``seed``, ``precision``) and the
    measurement settings. Cells that differ only in precision share one training run (:attr:`trained`)."""

    suite: str
    dataset: Entry
    model: Entry
    scheme: Entry
    settings: Mapping[str, Any]
    world_size: int = 1
    threads: int = 1
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: a tuning trial or a tuned cell: the search space, the trial and its values (see embbench.run.tuning)
    tuning: Mapping[str, Any] | None = None

    def __getitem__(self, name: str) -> Any:
        return self.settings[name]

    @property
    def budget(self) -> str:
        return self.settings["budget"]

    @property
    def device(self) -> str:
        return self.settings["device"]

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def precision(self) -> str:
        return self.settings["precision"]

    @property
    def sharded(self) -> bool:
        """Whether the cell trains under torchrec DMP / DDP (a sharding type named, or several processes)."""
        return self.settings["sharding"] != "auto" or self.world_size > 1

    @property
    def sharding_type(self) -> str | None:
        """The sharding type a sharded cell uses ("auto" is table-wise); None when unsharded."""
        if not self.sharded:
            return None
        return "table-wise" if self.settings["sharding"] == "auto" else self.settings["sharding"]

    def training_config(self) -> TrainConfig:
        """The cell's training configuration; a tuning trial never evaluates the test split."""
        trial = self.tuning is not None and self.tuning.get("role") == "trial"
        settings = {s.name: self.settings[s.name] for s in SETTINGS if s.role == TRAINING}
        return TrainConfig(**settings, evaluate_test=not trial)

    def config(self) -> dict[str, Any]:
        """The cell as stored with its result (``config_json``): its identity plus the entries' labels."""
        config = self.identity()
        for key, entry in (("dataset", self.dataset), ("model", self.model), ("scheme", self.scheme)):
            config[key] = {**config[key], "label": entry.label}
        config["latency_batch_sizes"] = list(self.settings["latency_batch_sizes"])
        return config

    def identity(self) -> dict[str, Any]:
        """Everything that makes a finished cell the same cell (see the module docstring)."""
        identity: dict[str, Any] = {
            "suite": self.suite,
            "dataset": {"name": self.dataset.name, "params": self.dataset.params},
            "model": {"name": self.model.name, "params": self.model.params},
            "scheme": {"name": self.scheme.name, "params": self.scheme.params},
        }
        for setting in SETTINGS:
            if setting.role not in (CELL, TRAINING, AXIS):
                continue
            name = setting.cell_name if setting.role == AXIS else setting.name
            value = self.settings[name]
            default = setting.default[0] if setting.role == AXIS and setting.default else setting.default
            if setting.omit_default and value == default:
                continue
            identity[name] = value
        identity.update(world_size=self.world_size, threads=self.threads, provenance=dict(self.provenance))
        if self.tuning is not None:
            identity["tuning"] = dict(self.tuning)
        return identity

    @property
    def key(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @property
    def trained(self) -> Cell:
        """The fp32 cell whose trained model this cell evaluates (itself for an fp32 cell)."""
        return dataclasses.replace(self, settings={**self.settings, "precision": BASE_PRECISION})

    @property
    def label(self) -> str:
        """The scheme label, with the precision when it is not fp32 (as the report shows it)."""
        if self.precision == BASE_PRECISION:
            return self.scheme.label
        return f"{self.scheme.label} ({self.precision})"

    def describe(self) -> str:
        backend = "" if self.settings["backend"] == "auto" else f"/{self.settings['backend']}"
        if self.sharded:
            backend += f"/{self.sharding_type}x{self.world_size}"
        label = self.label
        if self.tuning is not None and self.tuning.get("role") == "trial":
            label += f" [trial {self.tuning['trial']}]"
        return f"{self.dataset.label}/{self.model.label}/{label}@{self.budget}/{self.device}{backend}/seed{self.seed}"


def expand(suite: Suite, world_size: int, provenance: Mapping[str, Any], threads: int) -> list[Cell]:
    """Every cell of ``suite``: entries x axis values, precision varying fastest so that the cells sharing a
    training run are adjacent. ``provenance`` maps "scheme:NAME" (and "model:", "dataset:", "task:") to the
    plugin's distribution and version."""
    axes = [s for s in SETTINGS if s.role == AXIS and s.name != "budgets"]
    fixed = {s.name: suite.settings[s.name] for s in SETTINGS if s.role in (CELL, TRAINING, MEASURE)}
    task = suite.settings["task"]
    cells = []
    for dataset, model, scheme in itertools.product(suite.datasets, suite.models, suite.schemes):
        budgets = scheme.budgets or tuple(suite.settings["budgets"])
        origin = {
            "task": provenance.get(f"task:{task}"),
            "dataset": provenance.get(f"dataset:{dataset.name}"),
            "model": provenance.get(f"model:{model.name}"),
            "scheme": provenance.get(f"scheme:{scheme.name}"),
        }
        for budget in budgets:
            for values in itertools.product(*(suite.settings[s.name] for s in axes)):
                settings = {**fixed, "budget": budget, **{s.cell_name: v for s, v in zip(axes, values, strict=True)}}
                if scheme.bags is not None:  # the entry's own bag features
                    settings["bags"] = list(scheme.bags)
                derive(settings)
                cells.append(Cell(suite.name, dataset, model, scheme, settings, world_size, threads, origin))
    return cells
