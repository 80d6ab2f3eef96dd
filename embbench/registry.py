"""Plugin registry: schemes, datasets, models and tasks discovered through entry points.

Like timm's registry: ``list_schemes('hash*')`` filters names with shell-style wildcards and sorts them
naturally, ``create_scheme(name, **params)`` is the one factory. Registration is an entry point in the
groups ``embbench.schemes``, ``embbench.datasets``, ``embbench.models`` and ``embbench.tasks``, so a
third-party package is registered exactly like the built-in plugins. The core never imports a plugin by name.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import math
import re
import traceback
import types
import typing
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
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

#: the base classes ("module:class") a plugin of each kind must subclass (any one of them)
BASE_CLASSES = {
    "schemes": ("embbench.schemes:Scheme",),
    "datasets": ("embbench.data:Dataset",),
    "models": ("embbench.models:RecModel", "embbench.models:CTRModel"),
    "tasks": ("embbench.tasks:Task",),
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered name: where it comes from and whether it loads.

    ``distribution`` and ``version`` name the installed package that registers it; ``error`` is a one-line
    reason when ``status`` is "broken", and ``traceback`` the full text where loading raised.
    """

    kind: str
    name: str
    status: str  # "ok" or "broken"
    distribution: str
    target: str  # "module:attr" of the entry point(s)
    summary: str
    error: str | None
    plugin: Any = None  # the loaded class, when status == "ok"
    version: str = "unknown"
    traceback: str | None = None

    @property
    def origin(self) -> str:
        """``"distribution version"``, e.g. ``"embbench 0.2.0"`` (each of them, for a name registered twice)."""
        distributions, versions = self.distribution.split(" / "), self.version.split(" / ")
        if len(distributions) != len(versions):
            return f"{self.distribution} {self.version}"
        return " / ".join(f"{d} {v}" for d, v in zip(distributions, versions, strict=True))

    def as_dict(self) -> dict[str, Any]:
        # A stable contract (``embbench list --json``): "distribution" is "name version", as it always was.
        return {
            "name": self.name,
            "status": self.status,
            "distribution": self.origin,
            "error": self.error,
            "summary": self.summary,
        }


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _distribution_of(entry: EntryPoint) -> tuple[str, str]:
    """(name, version) of the distribution that registers ``entry``."""
    dist = getattr(entry, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"], dist.version


_cache: dict[str, dict[str, PluginInfo]] = {}


def _base_classes(kind: str) -> tuple[type, ...]:
    classes = []
    for path in BASE_CLASSES[kind]:
        module, attr = path.split(":")
        classes.append(getattr(importlib.import_module(module), attr))
    return tuple(classes)


def _what(value: Any) -> str:
    """How an entry point's object reads in an error: 'a function', 'a class', 'an instance of Foo'..."""
    if inspect.isclass(value):
        return f"class {value.__module__}.{value.__qualname__}"
    if inspect.isfunction(value) or inspect.isbuiltin(value) or inspect.ismethod(value):
        return "a function"
    if inspect.ismodule(value):
        return "a module"
    return f"an instance of {type(value).__qualname__}"


def _load_entry(kind: str, name: str, entries: list[EntryPoint]) -> PluginInfo:
    origins = sorted({_distribution_of(e) for e in entries})
    target = ", ".join(sorted({e.value for e in entries}))
    if len({e.value for e in entries}) > 1:
        labels = [f"{dist} {version}" for dist, version in origins]
        return PluginInfo(
            kind, name, "broken", " / ".join(d for d, _ in origins), target, "",
            f"{kind[:-1]} '{name}' is registered twice: by {' and by '.join(labels)} "
            f"({target}); uninstall one of them",
            version=" / ".join(v for _, v in origins),
        )
    distribution, version = origins[0]
    entry = entries[0]

    def broken(error: str, trace: str | None = None) -> PluginInfo:
        return PluginInfo(kind, name, "broken", distribution, target, "", error, version=version, traceback=trace)

    # A plugin must not break the others, whatever it raises on import (SystemExit included); only the user
    # stopping the program (KeyboardInterrupt) stops it.
    try:
        plugin = entry.load()
        bases = _base_classes(kind)
        if not (inspect.isclass(plugin) and issubclass(plugin, bases)):
            expected = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
            return broken(f"entry point '{name} = {target}' loads {_what(plugin)}, not a subclass of {expected}")
        summary = (getattr(plugin, "summary", None) or (inspect.getdoc(plugin) or "").split("\n")[0]).strip()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        message = " ".join(str(exc).split())
        return broken(f"{type(exc).__name__}: {message}" if message else type(exc).__name__, traceback.format_exc())
    return PluginInfo(kind, name, "ok", distribution, target, summary, None, plugin, version=version)


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
        raise PluginError(f"{kind[:-1]} '{name}' from {info.origin} is broken: {info.error}")
    return info.plugin


def get_info(kind: str, name: str) -> PluginInfo:
    """The registry's record of ``name`` (loaded or broken); a clear error when unknown."""
    plugins = discover(kind)
    if name not in plugins:
        get_plugin(kind, name)  # raises the error naming the closest known name
    return plugins[name]


def provenance(kind: str, name: str) -> dict[str, str]:
    """Where plugin ``name`` comes from: ``{"distribution": ..., "version": ...}`` (broken plugins too)."""
    info = get_info(kind, name)
    return {"distribution": info.distribution, "version": info.version}


_SEQUENCES = (Sequence, MutableSequence, Iterable)
_MAPPINGS = (Mapping,)

#: constructor arguments embbench passes itself, per kind: never a parameter in a suite
RESERVED_PARAMETERS = {"datasets": ("data_dir",)}


def check_params(kind: str, name: str, params: dict[str, Any], where: str = "", from_suite: bool = True) -> None:
    """Reject keyword arguments that the plugin's constructor does not take (naming the closest one), that
    embbench sets itself (when ``from_suite``), or whose value does not have the type the constructor's
    annotation declares (an ``int`` parameter takes integers only, not ``1.5`` or ``True``; a ``float`` only
    finite numbers)."""
    cls = get_plugin(kind, name)
    signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    known = [p for p in signature.parameters if p != "self"]
    location = f"{where}: " if where else ""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: the constructor checks its own values
        hints = {}
    for key, value in params.items():
        if from_suite and key in RESERVED_PARAMETERS.get(kind, ()):
            raise ConfigError(
                f"{location}'{key}' is set by embbench (--data-dir), not a parameter of {kind[:-1]} '{name}'"
            )
        if key not in known and not accepts_any:
            allowed = ", ".join(known) or "none"
            raise ConfigError(
                f"{location}unknown parameter '{key}' for {kind[:-1]} '{name}'{closest(key, known)}; "
                f"allowed: {allowed}"
            )
        if key in hints and not conforms(value, hints[key]):
            raise ConfigError(
                f"{location}parameter '{key}' of {kind[:-1]} '{name}' must be {type_name(hints[key])}, "
                f"got {type(value).__name__} {value!r}"
            )


def conforms(value: Any, hint: Any) -> bool:
    """Whether a suite value fits a constructor annotation (hints it cannot judge are taken as met)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, set, frozenset) or container in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(conforms(item, args[0]) for item in value)
    if container in (dict,) or container in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    return True


def type_name(hint: Any) -> str:
    """An annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    words = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "none"}
    if hint in words:
        return words[hint]
    if origin is not None and args:
        return f"a list of {type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if (
            origin in (list, tuple, set, frozenset) or origin in _SEQUENCES) else str(hint)
    return getattr(hint, "__name__", str(hint))


def create(kind: str, name: str, where: str = "", **params: Any) -> Any:
    """Instantiate plugin ``name`` with validated keyword arguments; a scheme is given its registered name."""
    check_params(kind, name, params, where, from_suite=False)
    cls = get_plugin(kind, name)
    try:
        instance = cls(**params)
    except (TypeError, ValueError) as exc:
        location = f"{where}: " if where else ""
        raise ConfigError(f"{location}{kind[:-1]} '{name}': {exc}") from exc
    if kind == "schemes":
        instance.name = name
    return instance


def _names(kind: str, pattern: str | list[str], exclude: str | list[str] | None) -> list[str]:
    return [i.name for i in list_plugins(kind, pattern, exclude) if i.status == "ok"]


def list_schemes(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    """Names of the schemes that load, matching ``pattern`` and no ``exclude`` pattern, sorted naturally."""
    return _names("schemes", pattern, exclude)


def list_datasets(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    """Names of the datasets that load, matching ``pattern`` and no ``exclude`` pattern, sorted naturally."""
    return _names("datasets", pattern, exclude)


def list_models(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    """Names of the models that load, matching ``pattern`` and no ``exclude`` pattern, sorted naturally."""
    return _names("models", pattern, exclude)


def list_tasks(pattern: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
    """Names of the tasks that load, matching ``pattern`` and no ``exclude`` pattern, sorted naturally."""
    return _names("tasks", pattern, exclude)


def create_scheme(name: str, **params: Any) -> Any:
    """An :class:`embbench.schemes.Scheme` instance named ``name``: hyper-parameters validated, not yet built."""
    return create("schemes", name, **params)


def create_dataset(name: str, **params: Any) -> Any:
    """An :class:`embbench.data.Dataset` instance with validated keyword arguments."""
    return create("datasets", name, **params)


def create_task(name: str, **params: Any) -> Any:
    """An :class:`embbench.tasks.Task` instance with validated keyword arguments."""
    return create("tasks", name, **params)


def create_model(name: str, /, *args: Any, **params: Any) -> Any:
    """A model instance: ``args`` (its embeddings and sizes) go to the constructor as they are, the keyword
    hyper-parameters are validated first."""
    check_params("models", name, params)
    cls = get_plugin("models", name)
    try:
        return cls(*args, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model '{name}': {exc}") from exc


def get_model_class(name: str) -> Any:
    """The model class registered as ``name`` (models are built around their embeddings by the runner)."""
    return get_plugin("models", name)
