"""Suite files: TOML, validated against a schema, expanded into cells.

A suite sweeps datasets x models x schemes x budgets x devices x seeds. Unknown keys are errors that
suggest the closest known key; every error names the file and the field. See docs/suites.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from embbench.errors import ConfigError, closest
from embbench.quantization import PRECISIONS
from embbench.schemes import Budget
from embbench.training import EARLY_STOPPING_METRICS

DEVICES = ("cpu", "cuda", "auto")
BACKENDS = ("auto", "torchrec", "torch")
BASE_PRECISION = "fp32"
DEFAULT_TASK = "ranking"
DEFAULT_BACKEND = "auto"
#: "auto": unsharded in one process, table-wise under --nproc N > 1
SHARDINGS = ("auto", "data-parallel", "table-wise", "row-wise", "column-wise", "table-column-wise")
DEFAULT_SHARDING = "auto"
EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise-adagrad")
DEFAULT_EMBEDDING_OPTIMIZER = "adagrad"

# key -> (expected python types, description); the schema of the top level of a suite file
TOP_LEVEL: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "suite name (defaults to the file name)"),
    "description": ((str,), "what the suite measures"),
    "reference": ((str,), "what the suite reproduces (paper, table)"),
    "task": ((str,), "what is learned and scored: ranking (default), rating-classification, ctr"),
    "backends": ((list,), "table backends: auto (default), torchrec, torch"),
    "shardings": ((list,), "sharding types: auto (default), data-parallel, table-wise, row-wise, column-wise, ..."),
    "embedding_optimizer": ((str,), "fused table optimizer of sharded runs: sgd, adagrad (default), rowwise-adagrad"),
    "embedding_learning_rate": ((float, int), "learning rate of the fused table optimizer of sharded runs"),
    "epochs": ((int,), "maximum training epochs"),
    "seeds": ((list,), "random seeds, one cell each"),
    "devices": ((list,), "devices: cpu, cuda, auto"),
    "budgets": ((list,), "size budgets: fractions of the full table ('1/4') or bytes ('64MB')"),
    "dim": ((int,), "embedding dimension"),
    "batch_size": ((int,), "training batch size"),
    "learning_rate": ((float, int), "Adam learning rate"),
    "num_negatives": ((int,), "sampled negatives per positive"),
    "patience": ((int,), "epochs without validation improvement before stopping"),
    "early_stopping": ((str,), "validation metric for early stopping: auc, hr@10 (ranking) or logloss"),
    "latency_batch_sizes": ((list,), "batch sizes of the inference latency measurement; [] skips it"),
    "precisions": ((list,), "table precisions evaluated after training: fp32, fp16, int8, int4"),
    "datasets": ((list,), "[[datasets]] entries"),
    "models": ((list,), "[[models]] entries"),
    "schemes": ((list,), "[[schemes]] entries"),
    "quick": ((dict,), "[quick] overrides applied by --quick"),
}
ENTRY_KEYS = {
    "datasets": {"name", "params", "label"},
    "models": {"name", "params", "label"},
    "schemes": {"name", "params", "label", "budgets"},
}
DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "seeds": [0],
    "devices": ["cpu"],
    "budgets": ["1"],
    "dim": 32,
    "batch_size": 1024,
    "learning_rate": 1e-3,
    "num_negatives": 4,
    "patience": 2,
    "early_stopping": "auc",
    "latency_batch_sizes": [1, 128, 4096],
    "precisions": [BASE_PRECISION],
    "task": DEFAULT_TASK,
    "backends": [DEFAULT_BACKEND],
    "shardings": [DEFAULT_SHARDING],
    "embedding_optimizer": DEFAULT_EMBEDDING_OPTIMIZER,
    "embedding_learning_rate": 0.01,
}
TRAINING_KEYS = ("epochs", "batch_size", "learning_rate", "num_negatives", "patience", "early_stopping")


@dataclass(frozen=True)
class Entry:
    """One [[datasets]], [[models]] or [[schemes]] entry."""

    name: str
    params: dict[str, Any]
    label: str
    where: str
    budgets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One unit of work: a dataset, model, scheme at one budget, on one device, with one seed, its tables
    evaluated at one precision.

    Cells that differ only in precision share one training run: the fp32 model is trained, then its tables are
    quantised for each other precision (see :mod:`embbench.quantization`).
    """

    suite: str
    dataset: Entry
    model: Entry
    scheme: Entry
    budget: str
    device: str
    seed: int
    dim: int
    training: dict[str, Any]
    # What is measured after training; not part of the key, since it does not change what is trained.
    latency_batch_sizes: tuple[int, ...] = (1, 128, 4096)
    precision: str = BASE_PRECISION
    task: str = DEFAULT_TASK
    backend: str = DEFAULT_BACKEND
    sharding: str = DEFAULT_SHARDING
    world_size: int = 1  # processes (--nproc); not in the suite file
    embedding_optimizer: str = DEFAULT_EMBEDDING_OPTIMIZER
    embedding_learning_rate: float = 0.01

    @property
    def sharded(self) -> bool:
        """Whether the cell trains under torchrec DMP / DDP (a sharding type named, or several processes)."""
        return self.sharding != DEFAULT_SHARDING or self.world_size > 1

    @property
    def sharding_type(self) -> str | None:
        """The sharding type a sharded cell uses ("auto" is table-wise); None when unsharded."""
        if not self.sharded:
            return None
        return "table-wise" if self.sharding == DEFAULT_SHARDING else self.sharding

    def config(self) -> dict[str, Any]:
        config = {
            "suite": self.suite,
            "dataset": {"name": self.dataset.name, "params": self.dataset.params},
            "model": {"name": self.model.name, "params": self.model.params},
            "scheme": {"name": self.scheme.name, "params": self.scheme.params},
            "budget": self.budget,
            "device": self.device,
            "seed": self.seed,
            "dim": self.dim,
            "training": self.training,
        }
        # Axes added later appear only when not at their default, so earlier results keep their keys.
        if self.precision != BASE_PRECISION:
            config["precision"] = self.precision
        if self.task != DEFAULT_TASK:
            config["task"] = self.task
        if self.backend != DEFAULT_BACKEND:
            config["backend"] = self.backend
        if self.sharded:
            config.update(sharding=self.sharding, world_size=self.world_size,
                          embedding_optimizer=self.embedding_optimizer,
                          embedding_learning_rate=self.embedding_learning_rate)
        return config

    @property
    def trained(self) -> Cell:
        """The fp32 cell whose trained model this cell evaluates (itself for an fp32 cell)."""
        return dataclasses.replace(self, precision=BASE_PRECISION)

    @property
    def label(self) -> str:
        """The scheme label, with the precision when it is not fp32 (as the report shows it)."""
        if self.precision == BASE_PRECISION:
            return self.scheme.label
        return f"{self.scheme.label} ({self.precision})"

    @property
    def key(self) -> str:
        canonical = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def describe(self) -> str:
        backend = "" if self.backend == DEFAULT_BACKEND else f"/{self.backend}"
        if self.sharded:
            backend += f"/{self.sharding_type}x{self.world_size}"
        return (
            f"{self.dataset.label}/{self.model.label}/{self.label}@{self.budget}/{self.device}{backend}/seed{self.seed}"
        )


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    reference: str
    settings: dict[str, Any]
    datasets: list[Entry]
    models: list[Entry]
    schemes: list[Entry]
    raw: dict[str, Any] = field(default_factory=dict)

    def cells(self, world_size: int = 1) -> list[Cell]:
        """The suite's cells, for a run over ``world_size`` processes."""
        s = self.settings
        training = {key: s[key] for key in TRAINING_KEYS}
        cells = []
        for dataset, model, scheme in itertools.product(self.datasets, self.models, self.schemes):
            budgets = scheme.budgets or tuple(s["budgets"])
            # precision varies fastest, so the cells sharing one training run are adjacent
            for budget, device, backend, sharding, seed, precision in itertools.product(
                budgets, s["devices"], s["backends"], s["shardings"], s["seeds"], s["precisions"]
            ):
                cells.append(Cell(
                    self.name, dataset, model, scheme, budget, device, seed, s["dim"], training,
                    tuple(s["latency_batch_sizes"]), precision, s["task"], backend, sharding, world_size,
                    s["embedding_optimizer"], float(s["embedding_learning_rate"]),
                ))
        return cells


def builtin_suites() -> dict[str, Path]:
    """Suite files shipped with embbench, by name."""
    folder = resources.files("embbench_suites")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def find_suite(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"suite file '{name_or_path}' does not exist")
        return path
    known = builtin_suites()
    if name_or_path not in known:
        raise ConfigError(
            f"unknown suite '{name_or_path}'{closest(name_or_path, known)}; give a path to a .toml file or "
            f"one of: {', '.join(sorted(known))}"
        )
    return known[name_or_path]


def _check_type(value: Any, types: tuple[type, ...], where: str, key: str) -> None:
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        expected = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{where}: '{key}' must be {expected}, got {type(value).__name__} {value!r}")


def _check_keys(table: dict[str, Any], known: Any, where: str, section: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' in {section}{closest(key, known)}; "
                f"known keys: {', '.join(sorted(known))}"
            )


def _entries(raw: dict[str, Any], section: str, where: str) -> list[Entry]:
    items = raw.get(section)
    if not items:
        raise ConfigError(f"{where}: at least one [[{section}]] entry is required")
    entries, labels = [], set()
    for index, item in enumerate(items):
        spot = f"{where}: {section}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{spot}: must be a table like [[{section}]] name = \"...\"")
        _check_keys(item, ENTRY_KEYS[section], where, f"[[{section}]] entry {index}")
        if "name" not in item or not isinstance(item["name"], str):
            raise ConfigError(f"{spot}: 'name' (a string) is required")
        params = item.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{spot}: 'params' must be a table, got {params!r}")
        label = item.get("label", item["name"])
        if label in labels:
            raise ConfigError(f"{spot}: label '{label}' is used twice; give each entry a distinct 'label'")
        labels.add(label)
        budgets: tuple[str, ...] = ()
        if "budgets" in item:
            if not isinstance(item["budgets"], list) or not item["budgets"]:
                raise ConfigError(f"{spot}: 'budgets' must be a non-empty list such as [\"1/2\", \"1/4\"]")
            budgets = tuple(_budget(b, f"{spot}.budgets") for b in item["budgets"])
        entries.append(Entry(item["name"], params, label, f"{spot} ({item['name']})", budgets))
    return entries


def _budget(value: Any, where: str) -> str:
    try:
        return str(Budget.parse(value))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_suite(path: Path, quick: bool = False) -> Suite:
    """Read and validate a suite file (schema only: plugin names are checked by the runner)."""
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read suite file: {exc.strerror}") from None
    _check_keys(raw, TOP_LEVEL, where, "the top level")
    for key, value in raw.items():
        _check_type(value, TOP_LEVEL[key][0], where, key)
    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in raw.items() if k in DEFAULTS})
    if quick:
        overrides = raw.get("quick", {})
        allowed = set(DEFAULTS) - {"task", "embedding_optimizer", "embedding_learning_rate"}
        _check_keys(overrides, allowed, where, "[quick]")
        for key, value in overrides.items():
            _check_type(value, TOP_LEVEL[key][0], where, f"quick.{key}")
        settings.update(overrides)
    elif "quick" in raw:
        _check_keys(raw["quick"], set(DEFAULTS), where, "[quick]")
    for key in ("epochs", "dim", "batch_size", "num_negatives", "patience"):
        if settings[key] < 1:
            raise ConfigError(f"{where}: '{key}' must be >= 1, got {settings[key]}")
    if settings["embedding_learning_rate"] <= 0:
        raise ConfigError(f"{where}: 'embedding_learning_rate' must be > 0, got {settings['embedding_learning_rate']}")
    if settings["learning_rate"] <= 0:
        raise ConfigError(f"{where}: 'learning_rate' must be > 0, got {settings['learning_rate']}")
    if settings["early_stopping"] not in EARLY_STOPPING_METRICS:
        raise ConfigError(
            f"{where}: 'early_stopping' must be one of {', '.join(EARLY_STOPPING_METRICS)}, "
            f"got '{settings['early_stopping']}'"
        )
    # latency_batch_sizes may be empty: no latency
    for key in ("seeds", "devices", "budgets", "precisions", "backends", "shardings"):
        if not settings[key]:
            raise ConfigError(f"{where}: '{key}' must not be empty")
    for seed in settings["seeds"]:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{where}: seeds must be non-negative integers, got {seed!r}")
    for size in settings["latency_batch_sizes"]:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"{where}: latency_batch_sizes must be positive integers, got {size!r}")
    for device in settings["devices"]:
        if device not in DEVICES:
            raise ConfigError(
                f"{where}: unknown device '{device}'{closest(str(device), DEVICES)}; use {', '.join(DEVICES)}"
            )
    for precision in settings["precisions"]:
        if precision not in PRECISIONS:
            raise ConfigError(
                f"{where}: unknown precision {precision!r}{closest(str(precision), PRECISIONS)}; "
                f"use {', '.join(PRECISIONS)}"
            )
    for backend in settings["backends"]:
        if backend not in BACKENDS:
            raise ConfigError(
                f"{where}: unknown table backend {backend!r}{closest(str(backend), BACKENDS)}; "
                f"use {', '.join(BACKENDS)}"
            )
    for sharding in settings["shardings"]:
        if sharding not in SHARDINGS:
            raise ConfigError(
                f"{where}: unknown sharding {sharding!r}{closest(str(sharding), SHARDINGS)}; use {', '.join(SHARDINGS)}"
            )
    if settings["embedding_optimizer"] not in EMBEDDING_OPTIMIZERS:
        raise ConfigError(
            f"{where}: unknown embedding_optimizer {settings['embedding_optimizer']!r}"
            f"{closest(settings['embedding_optimizer'], EMBEDDING_OPTIMIZERS)}; use {', '.join(EMBEDDING_OPTIMIZERS)}"
        )
    if len(set(settings["precisions"])) != len(settings["precisions"]):
        raise ConfigError(f"{where}: 'precisions' lists a precision twice: {settings['precisions']}")
    settings["budgets"] = [_budget(b, f"{where}: budgets") for b in settings["budgets"]]
    settings["learning_rate"] = float(settings["learning_rate"])
    return Suite(
        name=raw.get("name", path.stem),
        path=path,
        description=raw.get("description", ""),
        reference=raw.get("reference", ""),
        settings=settings,
        datasets=_entries(raw, "datasets", where),
        models=_entries(raw, "models", where),
        schemes=_entries(raw, "schemes", where),
        raw=raw,
    )
