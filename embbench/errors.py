"""User-facing errors: one clear line (what, where, how to fix), turned into exit code 2 by the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EmbbenchError(Exception):
    """An error caused by the user's input or environment, with a message fit for one line."""


class ConfigError(EmbbenchError):
    """A suite file, a hyper-parameter or a command-line value is invalid."""


class BudgetTooSmall(ConfigError):
    """A size budget is below the smallest module a scheme can build."""

    def __init__(self, scheme: str, budget_bytes: int, minimum_bytes: int, detail: str = "") -> None:
        self.scheme = scheme
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"budget of {budget_bytes:,} bytes is below the minimum of scheme '{scheme}': "
            f"{minimum_bytes:,} bytes{extra}; raise the budget"
        )


class DataNotFound(EmbbenchError):
    """The files of a dataset are missing and could not be downloaded."""


class PluginError(EmbbenchError):
    """A plugin is missing, broken, or provided twice."""


def closest(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
