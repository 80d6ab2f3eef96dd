"""Helpers for tests that make their own small data files (never copies of ../shared/data)."""

from __future__ import annotations

import gzip
from pathlib import Path


def write(path: Path, text: str, packed: bool = False) -> Path:
    """Write ``text`` at ``path`` (gzip-compressed as ``path.gz`` when ``packed``); returns the path written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if packed:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path
