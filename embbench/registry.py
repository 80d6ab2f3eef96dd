"""Plugin registry: schemes, datasets, models and tasks discovered through entry points.

Like timm's registry: ``list_schemes('hash*')`` filters names with shell-style wildcards and sorts them
naturally, ``create_scheme(name, **params)`` is the one factory. Registration is an entry point in the
groups ``embbench.schemes``, ``embbench.datasets``, ``embbench.models`` and ``embbench.tasks``, so a
third-party package is registered exactly like the built-in plugins. The core never imports a plugin by name.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from embbench.errors import ConfigError, PluginError, closest

KINDS = {
    "schemes": "embbench.schemes",
    "datasets": "embbench.datasets",
    "models": "embbench.models",
    "tasks": "embbench.tasks",
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered name: where it comes from and whether it loads."""

    kind: str
    name: str
    status: str  # "ok" or "broken"
    distribution: str
    target: str  # "module:attr" of the entry point(s)
    summary: str
    error: str | None
    plugin: Any = None  # the loaded class, when status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "distribution": self.distribution,
            "error": self.error,
            "summary": self.summary,
        }


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _distribution_label(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return "unknown"
    return f"{dist.metadata['Name']} {dist.version}"


_cache: dict[str, dict[str, PluginInfo]] = {}


def _load_entry(kind: str, name: str, entries: list[EntryPoint]) -> PluginInfo:
    distributions = sorted({_distribution_label(e) for e in entries})
    target = ", ".join(sorted({e.value for e in entries}))
    if len({e.value for e in entries}) > 1:
        return PluginInfo(
            kind, name, "broken", " / ".join(distributions), target, "",
            f"{kind[:-1]} '{name}' is registered twice: by {' and by '.join(distributions)} "
            f"({target}); uninstall one of them",
        )
    entry = entries[0]
    try:
        plugin = entry.load()
    except Exception as exc:  # a broken plugin must not break the others
        return PluginInfo(
            kind, name, "broken", distributions[0], target, "", f"{type(exc).__name__}: {exc}"
        )
    summary = (getattr(plugin, "summary", None) or (inspect.getdoc(plugin) or "").split("\n")[0]).strip()
    return PluginInfo(kind, name, "ok", distributions[0], target, summary, None, plugin)


def discover(kind: str, refresh: bool = False) -> dict[str, PluginInfo]:
    """All plugins of one kind ('schemes', 'datasets', 'models', 'tasks'), loaded, keyed by name."""
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind '{kind}'{closest(kind, KINDS)}; use one of {', '.join(KINDS)}")
    if refresh or kind not in _cache:
        grouped: dict[str, list[EntryPoint]] = {}
        for entry in entry_points(group=KINDS[kind]):
            grouped.setdefault(entry.name, []).append(entry)
        infos = {name: _load_entry(kind, name, entries) for name, entries in grouped.items()}
        _cache[kind] = dict(sorted(infos.items(), key=lambda item: _natural_key(item[0])))
    return _cache[kind]


def list_plugins(
    kind: str, pattern: str | list[str] = "*", exclude: str | list[str] | None = None
) -> list[PluginInfo]:
    """Plugins whose names match ``pattern`` (shell wildcards) and no ``exclude`` pattern, sorted naturally."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    excludes = [] if exclude is None else [exclude] if isinstance(exclude, str) else list(exclude)
    return [
        info
        for name, info in discover(kind).items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        and not any(fnmatch.fnmatchcase(name, p) for p in excludes)
    ]


def get_plugin(kind: str, name: str) -> Any:
    """The loaded class registered as ``name``; a clear error when unknown or broken."""
    plugins = discover(kind)
    if name not in plugins:
        known = [n for n, info in plugins.items() if info.status == "ok"]
        raise PluginError(
            f"unknown {kind[:-1]} '{name}'{closest(name, known)}; known: {', '.join(known) or 'none'} "
            f"(see `embbench list {kind}`)"
        )
    info = plugins[name]
    if info.status != "ok":
        raise PluginError(f"{kind[:-1]} '{name}' from {info.distribution} is broken: {info.error}")
    return info.plugin


def check_params(kind: str, name: str, params: dict[str, Any], where: str = "") -> None:
    """Reject keyword arguments that the plugin's constructor does not take, naming the closest one."""
    cls = get_plugin(kind, name)
    signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    known = [p for p in signature.parameters if p != "self"]
    for key in params:
        if key not in known and not accepts_any:
            location = f"{where}: " if where else ""
            allowed = ", ".join(known) or "none"
            raise ConfigError(
                f"{location}unknown parameter '{key}' for {kind[:-1]} '{name}'{closest(key, known)}; "
                f"allowed: {allowed}"
            )


def create(kind: str, name: str, where: str = "", **params: Any) -> Any:
    """Instantiate plugin ``name`` with validated keyword arguments."""
    check_params(kind, name, params, where)
    cls = get_plugin(kind, name)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        location = f"{where}: " if where else ""
        raise ConfigError(f"{location}{kind[:-1]} '{name}': {exc}") from exc


def list_schemes(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    return [i.name for i in list_plugins("schemes", pattern, exclude) if i.status == "ok"]


def list_datasets(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    return [i.name for i in list_plugins("datasets", pattern, exclude) if i.status == "ok"]


def list_models(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    return [i.name for i in list_plugins("models", pattern, exclude) if i.status == "ok"]


def create_scheme(name: str, **params: Any) -> Any:
    """An :class:`embbench.schemes.Scheme` instance: hyper-parameters validated, not yet built."""
    return create("schemes", name, **params)


def create_dataset(name: str, **params: Any) -> Any:
    return create("datasets", name, **params)


def get_model_class(name: str) -> Any:
    return get_plugin("models", name)
