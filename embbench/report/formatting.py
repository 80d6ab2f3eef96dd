"""Values as the report's text: byte sizes, numbers that may be missing, context entries."""

from __future__ import annotations

import math
from typing import Any


def format_bytes(size: float) -> str:
    """``size`` in B, KiB, MiB or GiB (one decimal above bytes); a dash for NaN."""
    if math.isnan(size):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def number_text(value: float, spec: str) -> str:
    """``value`` formatted by ``spec``; a dash for None or NaN."""
    return "–" if value is None or math.isnan(value) else format(value, spec)


def context_value(value: Any) -> str:
    """A context entry as text: a mapping as ``key=value, ...`` without its None values; a dash for None."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items() if item is not None) or "–"
    return "–" if value is None else str(value)
