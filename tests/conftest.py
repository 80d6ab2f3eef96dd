"""Shared fixtures: the real data folder beside the repository, and an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own split cache, so no test depends on another's leftovers."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("EMBBENCH_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "movielens-1m").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
