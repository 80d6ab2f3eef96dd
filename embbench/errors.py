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


class Diverged(RuntimeError):
    """Training stopped giving numbers: the loss, the model's scores or a metric became NaN or infinite.

    A cell that raises it is stored as failed, never as a result. ``epoch`` is where it happened (0: before
    training), ``last_finite_loss`` the last finite training loss, ``history`` the epochs that finished.
    """

    def __init__(self, what: str, epoch: int = 0, last_finite_loss: float | None = None,
                 history: list[dict[str, float]] | None = None) -> None:
        self.what, self.epoch, self.last_finite_loss = what, epoch, last_finite_loss
        self.history = list(history or [])
        where = f" at epoch {epoch}" if epoch else ""
        last = f"; last finite training loss {last_finite_loss:.6g}" if last_finite_loss is not None else ""
        super().__init__(f"diverged: {what}{where}{last}")


def closest(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
