"""The suite settings, declared once: type, default, allowed values and role of every top-level key of a
suite file. Parsing, validation, the cell identity, the training configuration and writing a suite back out
all read this table; adding a setting is adding a row here (and using its value where it matters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from embbench.bags import BAG_MODES
from embbench.collection import TABLE_OPTIMIZERS
from embbench.data import LEAVE_LAST_OUT, SPLIT_PROTOCOLS, SplitProtocol
from embbench.errors import ConfigError, closest
from embbench.optimizers import ADAM_VARIANTS
from embbench.schemes import Budget
from embbench.tables import DEFAULT_INIT_STD, INIT_KINDS
from embbench.training import EARLY_STOPPING, LR_SCHEDULES

#: roles: what a setting is for
META = "meta"  # describes the suite; not part of any cell
CELL = "cell"  # one value for every cell; part of a cell's identity
TRAINING = "training"  # a field of embbench.training.TrainConfig; part of a cell's identity
AXIS = "axis"  # a list: one cell per value; the value is part of a cell's identity
MEASURE = "measure"  # what is measured after training; not part of a cell's identity

PRECISIONS = ("fp32", "fp16", "int8", "int4")
INIT_CHOICES = ("scheme", *INIT_KINDS)
BASE_PRECISION = "fp32"
DEVICES = ("cpu", "cuda", "auto")
BACKENDS = ("auto", "torchrec", "torch")
#: "auto": unsharded in one process, table-wise under --nproc N > 1
SHARDINGS = ("auto", "data-parallel", "table-wise", "row-wise", "column-wise", "table-column-wise")
#: the largest values a 24 GB machine is asked to honour
MAX_DIM = 1 << 16
MAX_SEED = 2**31 - 1
#: how a budget is shared over a cell's features: in proportion to their full tables, or equal bytes each
BUDGET_SPLITS = ("proportional", "equal")


@dataclass(frozen=True)
class Setting:
    """One top-level key of a suite file.

    ``kind`` is the TOML type of a value (``int``, ``float``, ``str``, or ``budget``: a fraction of the full
    table or bytes); an axis is a non-empty list of such values without repeats, whose single value in a cell
    is called ``cell_name``. ``minimum``/``maximum`` bound numbers (inclusive); ``choices`` enumerates strings.
    A default of ``None`` means "derived" (see ``derive``).
    """

    name: str
    kind: str
    default: Any
    role: str
    doc: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    cell_name: str | None = None
    allow_empty: bool = False
    in_quick: bool = True
    #: a setting added after cells were stored: part of a cell's identity only when it differs from its default,
    #: so that its default (the old behaviour) keeps the keys of finished cells
    omit_default: bool = False

    @property
    def is_list(self) -> bool:
        return self.role == AXIS or self.name in ("latency_batch_sizes", "bags")


SETTINGS: tuple[Setting, ...] = (
    Setting("name", "str", None, META, "suite name (defaults to the file name)", in_quick=False),
    Setting("description", "str", "", META, "what the suite measures", in_quick=False),
    Setting("reference", "str", "", META, "what the suite reproduces (paper, table)", in_quick=False),
    Setting("task", "str", "ranking", CELL, "what is learned and scored: ranking, rating-classification, ctr",
            in_quick=False),
    Setting("dim", "int", 32, CELL, "embedding dimension", minimum=1, maximum=MAX_DIM),
    Setting("init", "str", "scheme", CELL,
            "how every embedding table starts: scheme (each scheme's own), normal (N(0, init_std^2)), uniform "
            "(U(±init_scale/sqrt(dim))); network schemes (dhe, tt-rec) keep their own",
            choices=INIT_CHOICES, omit_default=True),
    Setting("init_std", "float", DEFAULT_INIT_STD, CELL, "standard deviation of init = normal", minimum=0.0,
            maximum=10.0, omit_default=True),
    Setting("init_scale", "float", 1.0, CELL, "bound of init = uniform, in units of 1/sqrt(dim)", positive=True,
            maximum=100.0, omit_default=True),
    Setting("embedding_optimizers", "str", ["adam"], AXIS,
            "table optimizers: adam (row-sparse Adam), sgd, adagrad, rowwise-adagrad, dense-adam (Adam over every row)",
            choices=TABLE_OPTIMIZERS, cell_name="embedding_optimizer"),
    Setting("embedding_learning_rate", "float", None, CELL,
            "table learning rate (default: learning_rate for adam and dense-adam, 0.01 for the others)",
            positive=True, maximum=1e6),
    Setting("epochs", "int", 20, TRAINING, "maximum training epochs", minimum=1, maximum=100_000),
    Setting("batch_size", "int", 1024, TRAINING, "training batch size", minimum=1, maximum=1 << 24),
    Setting("learning_rate", "float", 1e-3, TRAINING, "Adam learning rate of the dense parameters",
            positive=True, maximum=1e6),
    Setting("num_negatives", "int", 4, TRAINING, "sampled negatives per positive (ranking)", minimum=1, maximum=1000),
    Setting("patience", "int", 2, TRAINING, "epochs without validation improvement before stopping",
            minimum=1, maximum=100_000),
    Setting("weight_decay", "float", 0.0, TRAINING,
            "weight decay of the dense parameters (decoupled under optimizer adamw, L2 under adam); 0 is plain "
            "Adam; tables never decay", minimum=0.0, maximum=1.0),
    Setting("early_stopping", "str", "auc", TRAINING,
            "validation metric to stop on: auc, hr@10 (ranking), logloss; none trains every epoch and tests the last",
            choices=EARLY_STOPPING),
    Setting("optimizer", "str", "adamw", TRAINING,
            "optimizer of the dense parameters: adamw (weight_decay decoupled, as before this setting) or adam "
            "(weight_decay added to the gradient, L2); the same without weight_decay",
            choices=ADAM_VARIANTS, omit_default=True),
    Setting("lr_schedule", "str", "none", TRAINING,
            "learning-rate schedule of every optimizer: none, reduce-on-plateau (of the early-stopping metric; "
            "auc when early_stopping is none)", choices=LR_SCHEDULES, omit_default=True),
    Setting("lr_plateau_factor", "float", 0.5, TRAINING,
            "reduce-on-plateau: the factor every learning rate is multiplied by", positive=True, maximum=1.0,
            omit_default=True),
    Setting("lr_plateau_patience", "int", 1, TRAINING,
            "reduce-on-plateau: epochs without validation improvement before the learning rates drop",
            minimum=1, maximum=100_000, omit_default=True),
    Setting("target_val_metric", "float", None, TRAINING,
            "a validation value of the early-stopping metric (auc when early_stopping is none) to record the "
            "epochs, training seconds and steps to reach (epochs_to_target, ...); default: none",
            minimum=-1e6, maximum=1e6, omit_default=True),
    Setting("bags", "str", [], CELL,
            "bag (multivalent) features of the dataset to embed, e.g. [\"genres\"]: each a feature of its own, "
            "planned from the budget like any, its pooled embedding added to its user's or item's vector; a "
            "[[schemes]] entry's own bags replace these",
            allow_empty=True, omit_default=True),
    Setting("bag_mode", "str", "mean", CELL, "how a bag's embeddings are pooled: mean or sum",
            choices=BAG_MODES, omit_default=True),
    Setting("budget_split", "str", "proportional", CELL,
            "how a budget is shared over a cell's features: proportional (to their full tables) or equal (bytes)",
            choices=BUDGET_SPLITS, omit_default=True),
    Setting("split", "str", LEAVE_LAST_OUT, CELL,
            "how interactions are held out: leave-last-out (per user, the last two by time; each task's own "
            "hold-out) or global-temporal (one cut-off time for every user: train before it; ranking only)",
            choices=SPLIT_PROTOCOLS, omit_default=True),
    Setting("validation_fraction", "float", SplitProtocol.validation_fraction, CELL,
            "global-temporal: the share of interactions, by time, in the validation period (before the test "
            "period)", positive=True, maximum=0.9, omit_default=True),
    Setting("test_fraction", "float", SplitProtocol.test_fraction, CELL,
            "global-temporal: the share of interactions, by time, in the test period (the latest)",
            positive=True, maximum=0.9, omit_default=True),
    Setting("budgets", "budget", ["1"], AXIS, "size budgets: fractions of the full tables ('1/4') or bytes ('64MB')",
            cell_name="budget"),
    Setting("devices", "str", ["cpu"], AXIS, "devices: cpu, cuda, auto", choices=DEVICES, cell_name="device"),
    Setting("backends", "str", ["auto"], AXIS, "table backends: auto, torchrec, torch", choices=BACKENDS,
            cell_name="backend"),
    Setting("shardings", "str", ["auto"], AXIS,
            "sharding types: auto, data-parallel, table-wise, row-wise, column-wise, table-column-wise",
            choices=SHARDINGS, cell_name="sharding"),
    Setting("seeds", "int", [0], AXIS, "random seeds, one cell each", minimum=0, maximum=MAX_SEED, cell_name="seed"),
    Setting("precisions", "str", [BASE_PRECISION], AXIS,
            "table precisions evaluated after training: fp32, fp16, int8, int4", choices=PRECISIONS,
            cell_name="precision"),
    Setting("latency_batch_sizes", "int", [1, 128, 4096], MEASURE,
            "batch sizes of the inference latency measurement; [] skips it", minimum=1, maximum=1 << 20,
            allow_empty=True),
)
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
#: the entry tables of a suite file, and the keys an entry may have
ENTRY_SECTIONS: dict[str, tuple[str, ...]] = {
    "datasets": ("name", "params", "label"),
    "models": ("name", "params", "label"),
    "schemes": ("name", "params", "label", "budgets", "search", "bags"),
}
#: the keys of a [[references]] entry (a published number to compare with; not part of any cell): required
#: first, then optional
REFERENCE_KEYS = ("source", "method", "budget", "metric", "value", "note", "url", "size_bytes", "dataset", "model")
TOP_LEVEL_KEYS = (*BY_NAME, *ENTRY_SECTIONS, "references", "tuning", "quick")


def defaults() -> dict[str, Any]:
    return {setting.name: setting.default for setting in SETTINGS}


def table_learning_rate(optimizer: str, learning_rate: float) -> float:
    """The default table learning rate: the dense one for Adam, 0.01 for SGD and the Adagrads."""
    return learning_rate if optimizer in ("adam", "dense-adam") else 0.01


def derive(cell: dict[str, Any]) -> dict[str, Any]:
    """Fill the settings of one cell whose default depends on its other values."""
    if cell.get("embedding_learning_rate") is None:
        cell["embedding_learning_rate"] = table_learning_rate(cell["embedding_optimizer"], cell["learning_rate"])
    return cell


def split_protocol(values: Mapping[str, Any], where: str = "") -> SplitProtocol:
    """The split protocol of a suite's (or a cell's) settings; the fractions apply to global-temporal only."""
    location = f"{where}: " if where else ""
    fractions = ("validation_fraction", "test_fraction")
    if values["split"] == LEAVE_LAST_OUT:
        changed = [name for name in fractions if values[name] != BY_NAME[name].default]
        if changed:
            raise ConfigError(
                f"{location}'{changed[0]}' applies to split = \"global-temporal\" only; set split = "
                f"\"global-temporal\" or remove '{changed[0]}'"
            )
    try:
        return SplitProtocol(values["split"], values["validation_fraction"], values["test_fraction"])
    except ConfigError as exc:
        raise ConfigError(f"{location}{exc}") from None


def _type_name(setting: Setting) -> str:
    names = {"int": "an integer", "float": "a number", "str": "a string", "budget": "a budget ('1/4', 0.25 or '64MB')"}
    return names[setting.kind]


def _plural(setting: Setting) -> str:
    names = {"int": "integers", "float": "numbers", "str": "strings", "budget": "budgets ('1/4', 0.25 or '64MB')"}
    return names[setting.kind]


def _check_value(setting: Setting, value: Any, where: str) -> Any:
    """The validated (normalised) value of one item, or a ConfigError naming ``where``."""
    if setting.kind == "budget":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: must be {_type_name(setting)}, got {type(value).__name__} {value!r}")
        try:
            return str(Budget.parse(value))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if setting.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif setting.kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: must be {_type_name(setting)}, got {type(value).__name__} {value!r}")
    if setting.kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value}")
    if setting.positive and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value}")
    low, high = setting.minimum, setting.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{where}: must be in {bounds}, got {value}")
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(
            f"{where}: unknown {setting.cell_name or setting.name} {value!r}{closest(str(value), setting.choices)}; "
            f"use one of {', '.join(setting.choices)}"
        )
    return value


def check_setting(setting: Setting, value: Any, where: str) -> Any:
    """A suite file's value of ``setting``, validated and normalised (budgets as their canonical text)."""
    spot = f"{where}: '{setting.name}'"
    if not setting.is_list:
        return _check_value(setting, value, spot)
    if not isinstance(value, list):
        raise ConfigError(
            f"{spot} must be a list of {_plural(setting)}, got {type(value).__name__} {value!r}"
        )
    if not value and not setting.allow_empty:
        raise ConfigError(f"{spot} must not be empty")
    items = [_check_value(setting, item, f"{spot}[{index}]") for index, item in enumerate(value)]
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        if item in seen:
            raise ConfigError(f"{spot} lists {value[index]!r} twice (as item {seen[item]} and {index}); remove one")
        seen[item] = index
    return items


def check_keys(table: Mapping[str, Any], known: Any, where: str, section: str) -> None:
    """Unknown keys are errors that suggest the closest known key."""
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' in {section}{closest(str(key), known)}; "
                f"known keys: {', '.join(sorted(known))}"
            )


def parse_settings(raw: Mapping[str, Any], where: str, quick: bool) -> dict[str, Any]:
    """Every setting's value for a suite file's top level ``raw`` (defaults filled, ``[quick]`` applied when
    ``quick``), validated against the table; derived defaults resolved."""
    values = defaults()
    for name, value in raw.items():
        if name in BY_NAME:
            values[name] = check_setting(BY_NAME[name], value, where)
    overrides = raw.get("quick", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: 'quick' must be a table of settings ([quick]), got {overrides!r}")
    quick_keys = [setting.name for setting in SETTINGS if setting.in_quick]
    check_keys(overrides, quick_keys, where, "[quick]")
    checked = {name: check_setting(BY_NAME[name], value, f"{where}: [quick]") for name, value in overrides.items()}
    if quick:
        values.update(checked)
    split_protocol(values, where)
    return values


def setting_lines(values: Mapping[str, Any], keep: Callable[[Setting], bool]) -> list[str]:
    """TOML lines ``key = value`` of the settings ``keep`` selects whose value differs from the default."""
    lines = []
    for setting in SETTINGS:
        if not keep(setting) or setting.name not in values:
            continue
        value = values[setting.name]
        if value is None or value == setting.default:
            continue
        lines.append(f"{setting.name} = {toml_value(value)}")
    return lines


def toml_value(value: Any) -> str:
    """A TOML literal for a setting or parameter value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ValueError("TOML has no null")
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)
