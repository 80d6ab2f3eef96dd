"""Fair tuning: every point (dataset, model, scheme entry, budget and the other axes but seed and precision) gets
the same number of trials, proposed by a seeded Optuna TPE sampler from the point's trials stored so far and
selected on validation only; the chosen configuration is then trained for every seed and precision and tested.

Trials are ordinary cells (their identity holds the trial and its values), so a tuned sweep resumes and runs in
parallel like any other: round ``t`` holds trial ``t`` of every point, and the proposal of trial ``t`` depends
only on the stored results of trials ``0 .. t-1`` of the same point and on the sampler seed — the same in every
runner. A trial cell never evaluates the test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embbench import registry
from embbench.errors import ConfigError, closest
from embbench.run.settings import BASE_PRECISION, BY_NAME, CELL, TRAINING, check_keys, check_setting, derive

if TYPE_CHECKING:
    from embbench.run.cells import Cell

#: settings a search space may vary (numbers and choices that leave the experiment the same experiment)
NOT_TUNABLE = ("task", "dim", "init")  # init: tune init_std / init_scale, or list init's values as choices
TUNING_KEYS = ("trials", "seed", "metric", "space")
SPEC_KEYS = ("low", "high", "log", "choices")
#: trial roles stored in the `tuning` column
TRIAL, SELECTED = "trial", "selected"
MAX_TRIALS = 1000
TUNED_SUFFIX = " (tuned)"


@dataclass(frozen=True)
class Dimension:
    """One searched value: a suite setting (``name``) or a scheme hyper-parameter (``params.NAME``); numbers
    between ``low`` and ``high`` (on a log scale with ``log``), or one of ``choices``."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def is_param(self) -> bool:
        return self.name.startswith("params.")

    @property
    def key(self) -> str:
        """The setting or parameter name."""
        return self.name.split(".", 1)[1] if self.is_param else self.name

    @property
    def integer(self) -> bool:
        return not self.choices and isinstance(self.low, int) and isinstance(self.high, int)

    def contains(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high  # type: ignore[operator]

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices:
            return CategoricalDistribution(list(self.choices))
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return FloatDistribution(float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Tuning:
    """A suite's ``[tuning]`` table: ``trials`` per point, the sampler ``seed``, the validation ``metric`` it
    selects on (None: the suite's early-stopping metric) and the search ``space`` of every scheme (an entry's
    ``search`` adds to it or replaces a dimension of the same name)."""

    trials: int
    seed: int = 0
    metric: str | None = None
    space: tuple[Dimension, ...] = ()


def parse_tuning(raw: Any, where: str) -> Tuning | None:
    """The ``[tuning]`` table of a suite file, validated (None when absent)."""
    if raw is None:
        return None
    spot = f"{where}: [tuning]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{spot} must be a table (trials = 8, space = {{ learning_rate = {{ ... }} }})")
    check_keys(raw, TUNING_KEYS, where, "[tuning]")
    trials = raw.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"{spot}: 'trials' (per point) must be an integer in [1, {MAX_TRIALS}], got {trials!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"{spot}: 'seed' must be an integer in [0, 2^31), got {seed!r}")
    metric = raw.get("metric")
    if metric is not None:
        from embbench.training import EARLY_STOPPING_METRICS

        if metric not in EARLY_STOPPING_METRICS:
            raise ConfigError(
                f"{spot}: unknown metric {metric!r}{closest(str(metric), EARLY_STOPPING_METRICS)}; use one of "
                f"{', '.join(EARLY_STOPPING_METRICS)} (a validation metric)"
            )
    space = parse_space(raw.get("space", {}), f"{spot} space")
    return Tuning(trials, seed, metric, space)


def parse_space(raw: Any, spot: str) -> tuple[Dimension, ...]:
    """A search space table: ``{ setting = SPEC, params = { hyper_parameter = SPEC } }``, SPEC being
    ``{ low = , high = [, log = true] }`` or ``{ choices = [...] }``. Setting values are checked against the
    settings table here; scheme hyper-parameters when the suite is prepared (:func:`check_space`)."""
    if not isinstance(raw, dict):
        example = "{ learning_rate = { low = 1e-4, high = 1e-2, log = true } }"
        raise ConfigError(f"{spot} must be a table like {example}")
    tunable = [s.name for s in BY_NAME.values() if s.role in (CELL, TRAINING) and s.name not in NOT_TUNABLE]
    dimensions = []
    for name, spec in raw.items():
        if name == "params":
            if not isinstance(spec, dict):
                raise ConfigError(f"{spot}: 'params' must be a table of scheme hyper-parameters, got {spec!r}")
            dimensions += [_dimension(f"params.{key}", value, f"{spot}: params.{key}") for key, value in spec.items()]
            continue
        if name not in tunable:
            raise ConfigError(
                f"{spot}: '{name}' cannot be searched{closest(name, tunable)}; searchable: {', '.join(tunable)}, "
                "or a scheme hyper-parameter under 'params'"
            )
        dimension = _dimension(name, spec, f"{spot}: {name}")
        setting = BY_NAME[name]
        values = dimension.choices or (dimension.low, dimension.high)
        for value in values:
            check_setting(dataclasses.replace(setting, role=CELL), value, f"{spot}: {name}")
        dimensions.append(dimension)
    return tuple(dimensions)


def _dimension(name: str, spec: Any, spot: str) -> Dimension:
    if not isinstance(spec, dict):
        raise ConfigError(f"{spot}: must be a table {{ low = ..., high = ... }} or {{ choices = [...] }}, got {spec!r}")
    check_keys(spec, SPEC_KEYS, spot, "a search dimension")
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise ConfigError(f"{spot}: give either 'choices' or 'low'/'high', not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{spot}: 'choices' must be a non-empty list, got {choices!r}")
        plain = all(isinstance(c, (str, int, float, bool)) for c in choices)
        if not plain or len(set(map(repr, choices))) < len(choices):
            raise ConfigError(f"{spot}: 'choices' must be distinct strings, numbers or booleans, got {choices!r}")
        return Dimension(name, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{spot}: needs 'low' and 'high' (or 'choices')")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{spot}: '{key}' must be a finite number, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{spot}: 'log' must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{spot}: 'low' must be below 'high', got {low} and {high}")
    if log and low <= 0:
        raise ConfigError(f"{spot}: a log scale needs low > 0, got {low}")
    if isinstance(low, int) != isinstance(high, int):
        low, high = float(low), float(high)
    return Dimension(name, low, high, log)


def space_table(space: Sequence[Dimension]) -> dict[str, Any]:
    """A space as the suite file writes it (scheme hyper-parameters under ``params``)."""
    table: dict[str, Any] = {d.name: d.as_dict() for d in space if not d.is_param}
    params = {d.key: d.as_dict() for d in space if d.is_param}
    if params:
        table["params"] = params
    return table


def tuning_table(tuning: Tuning) -> dict[str, Any]:
    """The ``[tuning]`` table of a suite file that parses back to ``tuning``."""
    table: dict[str, Any] = {"trials": tuning.trials, "seed": tuning.seed}
    if tuning.metric is not None:
        table["metric"] = tuning.metric
    if tuning.space:
        table["space"] = space_table(tuning.space)
    return table


def point_space(tuning: Tuning, search: Sequence[Dimension]) -> tuple[Dimension, ...]:
    """The space of one scheme entry: the suite's, with the entry's dimensions added or replacing."""
    merged = {d.name: d for d in tuning.space}
    merged.update({d.name: d for d in search})
    return tuple(merged[name] for name in sorted(merged))


def check_space(scheme_name: str, space: Sequence[Dimension], where: str) -> None:
    """Every scheme hyper-parameter of ``space`` is one the scheme takes, every value of the right type."""
    for dimension in space:
        if not dimension.is_param:
            continue
        for value in dimension.choices or (dimension.low, dimension.high):
            spot = f"{where}: search params.{dimension.key}"
            registry.check_params("schemes", scheme_name, {dimension.key: value}, spot)


def default_values(cell: Cell, space: Sequence[Dimension], raw_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The values the point's untuned cells use for each dimension (the scheme constructor's default for a
    hyper-parameter the entry does not set)."""
    values: dict[str, Any] = {}
    signature = inspect.signature(registry.get_plugin("schemes", cell.scheme.name).__init__)
    for dimension in space:
        if dimension.is_param:
            if dimension.key in cell.scheme.params:
                values[dimension.name] = cell.scheme.params[dimension.key]
            else:
                parameter = signature.parameters.get(dimension.key)
                if parameter is not None and parameter.default is not inspect.Parameter.empty:
                    values[dimension.name] = parameter.default
        else:
            values[dimension.name] = cell.settings[dimension.name]
    return values


def trial_seed(seed: int, trial: int) -> int:
    digest = hashlib.sha256(f"{seed}:{trial}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def propose(
    space: Sequence[Dimension],
    history: Sequence[tuple[Mapping[str, Any], float | None]],
    trial: int,
    seed: int,
    maximize: bool,
    total_trials: int,
    default: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The values of trial ``trial``, given the point's earlier trials (values, validation metric or None for a
    failed one). Trial 0 is the default configuration when it lies in the space; the first half of the trials
    (at most 10) are drawn at random, the rest by TPE. Deterministic: the same history, trial and seed give the
    same values."""
    if trial == 0 and default is not None and len(default) == len(space):
        if all(d.contains(default[d.name]) for d in space):
            return {d.name: default[d.name] for d in space}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {d.name: d.distribution() for d in space}
    startup = max(1, min(10, total_trials // 2))
    sampler = optuna.samplers.TPESampler(seed=trial_seed(seed, trial), n_startup_trials=startup)
    study = optuna.create_study(direction="maximize" if maximize else "minimize", sampler=sampler)
    for values, metric in history:
        known = {name: values[name] for name in distributions if name in values}
        if len(known) != len(distributions) or not all(distributions[n]._contains(  # noqa: SLF001
                distributions[n].to_internal_repr(v)) for n, v in known.items()):
            continue  # a default outside the space: nothing TPE can learn from
        state = optuna.trial.TrialState.COMPLETE if metric is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(
            state=state, value=metric, params=known, distributions=distributions,
        ))
    return dict(study.ask(distributions).params)


def apply(cell: Cell, values: Mapping[str, Any], raw_settings: Mapping[str, Any], label: str, where: str,
          tuning: Mapping[str, Any], seed: int | None = None, precision: str | None = None,
          measure: bool = True) -> Cell:
    """``cell`` with the searched ``values`` set: settings re-derived (a table learning rate the suite leaves
    to its default follows a searched learning rate), hyper-parameters in a scheme entry of its own."""
    settings = dict(cell.settings)
    if raw_settings.get("embedding_learning_rate") is None:
        settings["embedding_learning_rate"] = None
    params = dict(cell.scheme.params)
    for name, value in values.items():
        if name.startswith("params."):
            params[name.split(".", 1)[1]] = value
        else:
            settings[name] = value
    if seed is not None:
        settings["seed"] = seed
    if precision is not None:
        settings["precision"] = precision
    if not measure:
        settings["latency_batch_sizes"] = []
    derive(settings)
    scheme = dataclasses.replace(cell.scheme, params=params, label=label, where=where)
    return dataclasses.replace(cell, scheme=scheme, settings=settings, tuning=dict(tuning))


def point_key(cell: Cell) -> str:
    """What a point is: the cell's identity without its seed and precision."""
    identity = cell.identity()
    for name in ("seed", "precision"):
        identity.pop(name, None)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Point:
    """One tuned point: its base cell (first seed, fp32), its cells (every seed and precision), its space and
    the trials so far."""

    base: Cell
    cells: list[Cell]
    space: tuple[Dimension, ...]
    default: dict[str, Any]
    trials: list[Cell] = dataclasses.field(default_factory=list)
    history: list[tuple[dict[str, Any], float | None]] = dataclasses.field(default_factory=list)


def points(cells: Sequence[Cell], tuning: Tuning, searches: Mapping[str, Sequence[Dimension]],
           raw_settings: Mapping[str, Any]) -> list[Point]:
    """The suite's points, each with its untuned cells, in order (``searches`` maps an entry's ``where`` to its
    own dimensions)."""
    grouped: dict[str, list[Cell]] = {}
    for cell in cells:
        grouped.setdefault(point_key(cell), []).append(cell)
    found = []
    for group in grouped.values():
        first_seed = min(c.seed for c in group)
        base = next(c for c in group if c.seed == first_seed and c.precision == BASE_PRECISION)
        space = point_space(tuning, searches.get(base.scheme.where, ()))
        found.append(Point(base, group, space, default_values(base, space, raw_settings)))
    return found


def tuning_identity(tuning: Tuning, space: Sequence[Dimension], metric: str) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        # the sampler's version: another Optuna may propose other values (pinned in pyproject.toml)
        "sampler": f"optuna {version('optuna')} TPE",
        "trials": tuning.trials, "sampler_seed": tuning.seed, "metric": metric,
        "space": {d.name: d.as_dict() for d in space},
    }


def trial_cell(point: Point, trial: int, tuning: Tuning, metric: str, maximize: bool,
               raw_settings: Mapping[str, Any]) -> Cell:
    """Trial ``trial`` of ``point`` (its earlier trials' results in ``point.history``)."""
    values = propose(point.space, point.history, trial, tuning.seed, maximize, tuning.trials, point.default)
    info = {**tuning_identity(tuning, point.space, metric), "role": TRIAL, "trial": trial, "values": values}
    where = f"{point.base.scheme.where} trial {trial}"
    return apply(point.base, values, raw_settings, point.base.scheme.label, where, info, measure=False)


def select(history: Sequence[tuple[Mapping[str, Any], float | None]], maximize: bool) -> int | None:
    """The index of the trial with the best validation metric (the earliest of equals); None when none ran."""
    scored = [(metric if maximize else -metric, -index) for index, (_, metric) in enumerate(history)
              if metric is not None and math.isfinite(metric)]
    return -max(scored)[1] if scored else None


def selected_cells(point: Point, chosen: int, tuning: Tuning, metric: str,
                   raw_settings: Mapping[str, Any]) -> list[Cell]:
    """The point's cells (every seed and precision) with the chosen trial's values, labelled tuned."""
    values = point.history[chosen][0]
    info = {**tuning_identity(tuning, point.space, metric), "role": SELECTED, "trial": chosen, "values": values}
    label = point.base.scheme.label + TUNED_SUFFIX
    where = f"{point.base.scheme.where} tuned"
    return [apply(cell, values, raw_settings, label, where, info) for cell in point.cells]


def selection_metric(tuning: Tuning, early_stopping: str) -> tuple[str, bool]:
    """The validation metric trials are selected on, and whether higher is better."""
    from embbench.training import LOWER_IS_BETTER

    metric = tuning.metric or (early_stopping if early_stopping != "none" else "auc")
    return metric, metric not in LOWER_IS_BETTER


def metric_column(metric: str) -> str:
    from embbench.tasks import METRIC_COLUMNS

    return f"val_{METRIC_COLUMNS[metric]}"



def tuning_rounds(
    suite: Any,
    cells: Sequence[Cell],
    stored: Callable[[list[str]], Mapping[str, Mapping[str, Any]]],
    failures: list[str],
) -> Iterator[list[Cell]]:
    """The cells a tuned suite adds to its untuned ``cells``, batch by batch: trial ``t`` of every point, for
    each ``t``, then the chosen configuration of every point (every seed and precision). ``stored(keys)`` gives
    the stored rows of keys once a batch has run; a point none of whose trials finished is named in
    ``failures`` and gets no tuned cells."""
    tuning: Tuning = suite.tuning
    metric, maximize = selection_metric(tuning, suite.settings["early_stopping"])
    column = metric_column(metric)
    searches = {entry.where: entry.search for entry in suite.schemes}
    found = points(cells, tuning, searches, suite.settings)
    for trial in range(tuning.trials):
        batch = [trial_cell(point, trial, tuning, metric, maximize, suite.settings) for point in found]
        yield batch
        rows = stored([cell.key for cell in batch])
        for point, cell in zip(found, batch, strict=True):
            row = rows.get(cell.key)
            value = row.get(column) if row is not None and row.get("status") == "ok" else None
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            point.trials.append(cell)
            point.history.append((dict(cell.tuning["values"]), float(value) if finite else None))  # type: ignore[index]
    chosen_cells = []
    for point in found:
        chosen = select(point.history, maximize)
        if chosen is None:
            failures.append(f"{point.base.describe()}: none of its {tuning.trials} trials finished; no tuned cells")
            continue
        chosen_cells += selected_cells(point, chosen, tuning, metric, suite.settings)
    if chosen_cells:
        yield chosen_cells


def resolve_each(
    cells: Sequence[Cell], task: Any, data: Mapping[str, Any], available_memory: int | None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """The runs of ``cells``, resolved one training run at a time: a searched configuration the budget cannot
    hold (or the scheme refuses) is that cell's failed row, not the sweep's end."""
    from embbench.measure.environment import git_commit, host
    from embbench.run.execute import now
    from embbench.run.resolve import resolve_runs

    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.trained.key, []).append(cell)
    runs, failed = [], []
    for group in groups.values():
        try:
            runs += resolve_runs(group, task, data, available_memory)
        except ConfigError as exc:
            for cell in group:
                failed.append({
                    "cell_key": cell.key, "suite": cell.suite, "task": cell["task"], "dataset": cell.dataset.label,
                    "model": cell.model.label, "scheme": cell.scheme.name, "scheme_label": cell.label,
                    "precision": cell.precision, "budget": cell.budget, "device": cell.device, "seed": cell.seed,
                    "status": "failed", "error": f"searched configuration cannot run: {exc}",
                    "config_json": cell.config(), **tuning_record(cell), "started_at": now(), "finished_at": now(),
                    "git_commit": git_commit(), "host": host(), "threads": cell.threads,
                })
    return runs, failed


def tuning_record(cell: Cell) -> dict[str, Any]:
    """The tuning columns of a cell's row: its role (trial or selected), the trial, and the search."""
    if cell.tuning is None:
        return {}
    return {"tuning": cell.tuning["role"], "trial": cell.tuning["trial"], "tuning_json": dict(cell.tuning)}


def check_suite_tuning(suite: Any) -> None:
    """Every scheme entry's search space holds hyper-parameters its scheme takes (values of the right type)."""
    if suite.tuning is None:
        return
    for entry in suite.schemes:
        check_space(entry.name, point_space(suite.tuning, entry.search), entry.where)
