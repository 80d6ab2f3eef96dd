"""Resident memory of this process (Linux): now, at its peak since a window opened, and a trimmed heap to open a
window from, so that one cell's peak does not start from the previous cell's leftovers."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux), None where /proc is absent."""
    return _status_bytes("VmRSS:")


def release_freed_memory() -> None:
    """Collect garbage and hand the memory the C allocator keeps from freed objects back to the system (glibc's
    ``malloc_trim``), so that one cell's peak RSS does not start from the previous cell's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak_resident() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); False where the
    kernel does not allow it, and then :func:`peak_resident_bytes` is the peak since the process started."""
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_resident_bytes() -> int | None:
    """The process's peak resident set size (VmHWM) since the last :func:`reset_peak_resident`."""
    return _status_bytes("VmHWM:")
