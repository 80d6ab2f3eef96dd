"""Where files can be written: the one check the results store and the report share before writing."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (made, with its parents, where missing), or None if they can:
    its nearest existing ancestor is a file, or a folder this process cannot write."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
