"""Suite files: found by name or path, read and validated against the settings table, and written back out.

A suite sweeps datasets x models x schemes x its axis settings (budgets, devices, backends, shardings, seeds,
precisions). Unknown keys are errors that suggest the closest known key; every error names the file and the
field. See docs/suites.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from embbench.errors import ConfigError, closest
from embbench.run.settings import (
    AXIS,
    BY_NAME,
    ENTRY_SECTIONS,
    META,
    REFERENCE_KEYS,
    SETTINGS,
    TOP_LEVEL_KEYS,
    check_keys,
    check_setting,
    parse_settings,
    setting_lines,
    table_learning_rate,
    toml_key,
    toml_value,
)
from embbench.run.tuning import Dimension, Tuning, parse_space, parse_tuning, space_table, tuning_table
from embbench.schemes import Budget
from embbench.tasks import METRIC_COLUMNS

#: the result columns a [[references]] entry may compare: test_auc, val_auc, test_hr10, ...
REFERENCE_METRICS = tuple(f"{split}_{column}" for split in ("test", "val") for column in METRIC_COLUMNS.values())


@dataclass(frozen=True)
class Entry:
    """One [[datasets]], [[models]] or [[schemes]] entry; ``where`` names it in error messages."""

    name: str
    params: dict[str, Any]
    label: str
    where: str
    budgets: tuple[str, ...] = ()
    #: a scheme entry's own search dimensions (added to the suite's [tuning] space)
    search: tuple[Dimension, ...] = ()
    #: a scheme entry's own bag features (the suite's ``bags`` otherwise): with and without bags side by side
    bags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Reference:
    """A published number a suite compares with (a ``[[references]]`` entry); not part of any cell.

    ``label`` is the scheme label ``method`` names (a label, or the name of exactly one scheme entry);
    ``budget`` is the budget's canonical text, as the cells store it; ``dataset``/``model`` (labels) narrow
    the panels it applies to (None: every panel of the suite); ``size_bytes`` is a size the source states.
    """

    source: str
    method: str
    label: str
    budget: str
    metric: str
    value: float
    note: str = ""
    url: str = ""
    size_bytes: int | None = None
    dataset: str | None = None
    model: str | None = None


@dataclass
class Suite:
    """A validated suite file: its settings (every non-meta setting, defaults filled, ``[quick]`` applied when
    read with ``quick``), its entries and the ``[quick]`` overrides as written."""

    name: str
    path: Path
    description: str
    reference: str
    settings: dict[str, Any]
    datasets: list[Entry]
    models: list[Entry]
    schemes: list[Entry]
    quick: dict[str, Any] = field(default_factory=dict)
    references: tuple[Reference, ...] = ()
    #: the [tuning] table: trials per point, sampler seed, search space (None: no tuning)
    tuning: Tuning | None = None

    def cells(self, world_size: int = 1, provenance: Mapping[str, Any] | None = None, threads: int = 1) -> list[Any]:
        """The suite's cells for a run over ``world_size`` processes (see :func:`embbench.run.cells.expand`)."""
        from embbench.run.cells import expand

        return expand(self, world_size, provenance or {}, threads)


def builtin_suites() -> dict[str, Path]:
    """Suite files shipped with embbench, by name."""
    folder = resources.files("embbench_suites")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def find_suite(name_or_path: str | Path) -> Path:
    """A suite file given by path, or a shipped suite by name."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"suite file '{name_or_path}' does not exist")
        return path
    known = builtin_suites()
    name = str(name_or_path)
    if name not in known:
        raise ConfigError(
            f"unknown suite '{name}'{closest(name, known)}; give a path to a .toml file or one of: "
            f"{', '.join(sorted(known))}"
        )
    return known[name]


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; one-line errors for unreadable, non-UTF-8 or invalid files."""
    where = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read suite file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start}); save the suite file as UTF-8") from None
    return _load_toml(text, where)


def _load_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid TOML: nested too deeply") from None


def _entries(raw: Mapping[str, Any], section: str, where: str) -> list[Entry]:
    items = raw.get(section)
    if not items:
        raise ConfigError(f"{where}: at least one [[{section}]] entry is required")
    if not isinstance(items, list):
        raise ConfigError(f"{where}: '{section}' must be a list of [[{section}]] tables")
    entries, labels = [], set()
    for index, item in enumerate(items):
        spot = f"{where}: {section}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f'{spot}: must be a table like [[{section}]] name = "..."')
        check_keys(item, ENTRY_SECTIONS[section], where, f"[[{section}]] entry {index}")
        if not isinstance(item.get("name"), str):
            raise ConfigError(f"{spot}: 'name' (a string) is required")
        params = item.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{spot}: 'params' must be a table, got {params!r}")
        label = item.get("label", item["name"])
        if not isinstance(label, str):
            raise ConfigError(f"{spot}: 'label' must be a string, got {label!r}")
        if label in labels:
            raise ConfigError(f"{spot}: label '{label}' is used twice; give each entry a distinct 'label'")
        labels.add(label)
        budgets: tuple[str, ...] = ()
        if "budgets" in item:
            budgets = tuple(check_setting(BY_NAME["budgets"], item["budgets"], spot))
        search: tuple[Dimension, ...] = ()
        if "search" in item:
            search = parse_space(item["search"], f"{spot}: search")
        bags = tuple(check_setting(BY_NAME["bags"], item["bags"], spot)) if "bags" in item else None
        entries.append(Entry(item["name"], params, label, f"{spot} ({item['name']})", budgets, search, bags))
    return entries


def _text_field(item: Mapping[str, Any], key: str, spot: str, default: str | None = "") -> Any:
    value = item.get(key, default)
    if value is not default and not (isinstance(value, str) and value.strip()):
        raise ConfigError(f"{spot}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _references(
    raw: Mapping[str, Any], where: str, settings: Mapping[str, Any], quick: Mapping[str, Any],
    datasets: list[Entry], models: list[Entry], schemes: list[Entry],
) -> tuple[Reference, ...]:
    """The [[references]] entries, each checked against the suite: its method names a scheme entry, its
    budget is one that entry runs (with or without --quick), its metric is a result column."""
    items = raw.get("references", [])
    if not isinstance(items, list):
        raise ConfigError(f"{where}: 'references' must be a list of [[references]] tables")
    labels = {entry.label: entry for entry in schemes}
    references = []
    for index, item in enumerate(items):
        spot = f"{where}: references[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f'{spot}: must be a table like [[references]] source = "..."')
        check_keys(item, REFERENCE_KEYS, where, f"[[references]] entry {index}")
        for key in REFERENCE_KEYS[:5]:
            if key not in item:
                raise ConfigError(f"{spot}: '{key}' is required (keys: {', '.join(REFERENCE_KEYS[:5])})")
        source, method, metric = (_text_field(item, key, spot, None) for key in ("source", "method", "metric"))
        note, url = _text_field(item, "note", spot), _text_field(item, "url", spot)
        if method in labels:
            entry = labels[method]
        else:
            named = [entry for entry in schemes if entry.name == method]
            if not named:
                raise ConfigError(f"{spot}: method '{method}' is no scheme label or name of this suite"
                                  f"{closest(method, [*labels, *(e.name for e in schemes)])}; use one of: "
                                  f"{', '.join(labels)}")
            if len(named) > 1:
                raise ConfigError(f"{spot}: method '{method}' names {len(named)} scheme entries; give one of their "
                                  f"labels: {', '.join(e.label for e in named)}")
            entry = named[0]
        if metric not in REFERENCE_METRICS:
            raise ConfigError(f"{spot}: unknown metric '{metric}'{closest(metric, REFERENCE_METRICS)}; use one of "
                              f"{', '.join(REFERENCE_METRICS)}")
        value = item["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{spot}: 'value' must be a finite number, got {value!r}")
        size_bytes = item.get("size_bytes")
        if size_bytes is not None and (isinstance(size_bytes, bool) or not isinstance(size_bytes, int)
                                       or size_bytes < 1):
            raise ConfigError(f"{spot}: 'size_bytes' must be a positive integer (bytes), got {size_bytes!r}")
        budget = item["budget"]
        if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
            raise ConfigError(f"{spot}: 'budget' must be a budget like the suite's, got {budget!r}")
        try:
            budget = str(Budget.parse(budget))
        except ConfigError as exc:
            raise ConfigError(f"{spot}: {exc}") from None
        runs = list(entry.budgets) or list(dict.fromkeys([*settings["budgets"], *quick.get("budgets", [])]))
        if budget not in runs:
            raise ConfigError(f"{spot}: budget '{item['budget']}' is not one that scheme '{entry.label}' runs; "
                              f"write it like one of: {', '.join(runs)}")
        scope = {}
        for key, entries in (("dataset", datasets), ("model", models)):
            scope[key] = _text_field(item, key, spot, None)
            known = [e.label for e in entries]
            if scope[key] is not None and scope[key] not in known:
                raise ConfigError(f"{spot}: {key} '{scope[key]}' is no {key} label of this suite"
                                  f"{closest(scope[key], known)}; use one of: {', '.join(known)}")
        references.append(Reference(source, method, entry.label, budget, metric, float(value), note, url,
                                    size_bytes, scope["dataset"], scope["model"]))
    return tuple(references)


def parse_suite(path: Path, quick: bool = False) -> Suite:
    """Read and validate a suite file (its schema; plugin names and parameters are checked by the runner)."""
    return _parse_document(read_toml(path), path, quick)


def parse_suite_text(text: str, path: Path, quick: bool = False) -> Suite:
    """Validate a suite file's text; ``path`` names it in errors (and gives the name when the text has none)."""
    return _parse_document(_load_toml(text, str(path)), path, quick)


def _parse_document(raw: dict[str, Any], path: Path, quick: bool) -> Suite:
    where = str(path)
    check_keys(raw, TOP_LEVEL_KEYS, where, "the top level")
    values = parse_settings(raw, where, quick)
    quick_table = raw.get("quick", {})
    quick_values = {key: check_setting(BY_NAME[key], value, where) for key, value in quick_table.items()}
    datasets, models = _entries(raw, "datasets", where), _entries(raw, "models", where)
    schemes = _entries(raw, "schemes", where)
    tuning = parse_tuning(raw.get("tuning"), where)
    if tuning is None and any(entry.search for entry in schemes):
        raise ConfigError(f"{where}: a scheme entry has a 'search' space but the suite has no [tuning] table "
                          "(add [tuning] trials = N)")
    written = parse_settings(raw, where, False) if quick else values
    return Suite(
        name=values.pop("name") or path.stem,
        path=path,
        description=values.pop("description"),
        reference=values.pop("reference"),
        settings=values,
        datasets=datasets,
        models=models,
        schemes=schemes,
        quick=quick_values,
        references=_references(raw, where, written, quick_values, datasets, models, schemes),
        tuning=tuning,
    )


def _entry_lines(section: str, entry: Entry) -> list[str]:
    lines = [f"[[{section}]]", f"name = {toml_value(entry.name)}"]
    if entry.label != entry.name:
        lines.append(f"label = {toml_value(entry.label)}")
    if entry.params:
        lines.append(f"params = {toml_value(entry.params)}")
    if entry.budgets:
        lines.append(f"budgets = {toml_value(list(entry.budgets))}")
    if entry.search:
        lines.append(f"search = {toml_value(space_table(entry.search))}")
    if entry.bags is not None:
        lines.append(f"bags = {toml_value(list(entry.bags))}")
    return lines


def suite_toml(suite: Suite) -> str:
    """A suite file that parses back to ``suite`` (settings at their defaults are left out)."""
    lines = [f"name = {toml_value(suite.name)}"]
    if suite.description:
        lines.append(f"description = {toml_value(suite.description)}")
    if suite.reference:
        lines.append(f"reference = {toml_value(suite.reference)}")
    lines += setting_lines(suite.settings, lambda setting: setting.role != META)
    for section, entries in (("datasets", suite.datasets), ("models", suite.models), ("schemes", suite.schemes)):
        for entry in entries:
            lines += ["", *_entry_lines(section, entry)]
    for reference in suite.references:
        lines += ["", "[[references]]", *_reference_lines(reference)]
    if suite.tuning is not None:
        lines += ["", "[tuning]", *(f"{k} = {toml_value(v)}" for k, v in tuning_table(suite.tuning).items())]
    if suite.quick:
        lines += ["", "[quick]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in suite.quick.items())]
    return "\n".join(lines) + "\n"


def _reference_lines(reference: Reference) -> list[str]:
    written = {"source": reference.source, "method": reference.method, "budget": reference.budget,
               "metric": reference.metric, "value": reference.value, "note": reference.note or None,
               "url": reference.url or None, "size_bytes": reference.size_bytes, "dataset": reference.dataset,
               "model": reference.model}
    return [f"{key} = {toml_value(value)}" for key, value in written.items() if value is not None]


def configuration_toml(suite: str, configs: Iterable[Mapping[str, Any]]) -> str:
    """The suite file that produces the cells whose stored configurations are ``configs`` (``config_json`` of
    the result rows): axis values collected in order of appearance, entries once each. Budgets of an entry
    that differ from the suite's are written as the entry's ``budgets``."""
    configs = list(configs)
    if not configs:
        raise ValueError("configuration_toml needs at least one stored configuration")
    axis_values: dict[str, list[Any]] = {s.name: [] for s in SETTINGS if s.role == AXIS}
    entries: dict[str, dict[str, Entry]] = {"datasets": {}, "models": {}, "schemes": {}}
    scheme_budgets: dict[str, list[str]] = {}
    scheme_bags: dict[str, list[str]] = {}  # the bag features of each scheme entry (its cells share them)
    for config in configs:
        for setting in SETTINGS:
            if setting.role == AXIS and setting.cell_name in config:
                value = config[setting.cell_name]
                if value not in axis_values[setting.name]:
                    axis_values[setting.name].append(value)
        for section, key in (("datasets", "dataset"), ("models", "model"), ("schemes", "scheme")):
            item = config[key]
            label = item.get("label", item["name"])
            entries[section].setdefault(label, Entry(item["name"], dict(item.get("params", {})), label, ""))
        label = config["scheme"].get("label", config["scheme"]["name"])
        scheme_bags.setdefault(label, list(config.get("bags", [])))
        budgets = scheme_budgets.setdefault(label, [])
        if config["budget"] not in budgets:
            budgets.append(config["budget"])
    first = configs[0]
    values = {s.name: first[s.name] for s in SETTINGS if s.role not in (AXIS, META) and s.name in first}
    notes = []  # settings that differ between stored cells (a suite edited between runs)
    for name in values:
        if name == "bags":  # several values: the scheme entries' own (below)
            continue
        distinct: list[Any] = []
        for config in configs:
            if name in config and config[name] not in distinct:
                distinct.append(config[name])
        if len(distinct) > 1:
            notes.append(f"# {name}: several values among the stored cells: {', '.join(map(toml_value, distinct))}")
    derived = [table_learning_rate(c.get("embedding_optimizer", ""), c.get("learning_rate")) for c in configs]
    if all(c.get("embedding_learning_rate") == rate for c, rate in zip(configs, derived, strict=True)):
        values.pop("embedding_learning_rate", None)  # the derived default of every cell
    values.update({name: items for name, items in axis_values.items() if items})
    for budgets in scheme_budgets.values():
        budgets.sort(key=_budget_order)
    # The suite's budgets are the first scheme's; a scheme swept over others lists its own.
    values["budgets"] = next(iter(scheme_budgets.values()))
    schemes = []
    suite_bags = list(values.get("bags", []))
    for label, entry in entries["schemes"].items():
        own = () if scheme_budgets[label] == values["budgets"] else tuple(scheme_budgets[label])
        bags = None if scheme_bags[label] == suite_bags else tuple(scheme_bags[label])
        schemes.append(Entry(entry.name, entry.params, label, "", own, bags=bags))
    rebuilt = Suite(
        suite, Path(f"{suite}.toml"), "", "", values,
        list(entries["datasets"].values()), list(entries["models"].values()), schemes,
    )
    first_line, rest = suite_toml(rebuilt).split("\n", 1)
    return "\n".join([first_line, *notes, rest])


def _budget_order(budget: str) -> tuple[int, float, str]:
    """Largest fraction first, then byte budgets by size."""
    parsed = Budget.parse(budget)
    if parsed.fraction is not None:
        return (0, -float(parsed.fraction), budget)
    return (1, float(parsed.absolute_bytes or 0), budget)
