"""Collision statistics of index tuples, against a brute-force count; and through `embbench size`."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from embbench.cli import main
from embbench.measure.collisions import collision_stats


class TupleTable(nn.Module):
    """index_tuples looks the ID up in a fixed table of tuples (IDs are 0..n-1)."""

    def __init__(self, tuples: np.ndarray) -> None:
        super().__init__()
        self.tuples = torch.as_tensor(tuples, dtype=torch.int64)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tuples[ids]


def brute_force(tuples: np.ndarray) -> tuple[int, int]:
    counts = Counter(map(tuple, tuples.tolist()))
    colliding = sum(count for count in counts.values() if count > 1)
    return len(counts), colliding


@pytest.mark.parametrize("width, values", [(1, 50), (2, 12), (3, 4), (5, 2)])
def test_matches_brute_force(width, values):
    tuples = np.random.default_rng(width).integers(0, values, size=(3000, width))
    stats = collision_stats(TupleTable(tuples), np.arange(3000))
    assert (stats.distinct_tuples, stats.colliding_ids) == brute_force(tuples)
    assert stats.collision_fraction == pytest.approx(stats.colliding_ids / 3000)
    assert stats.tuple_width == width


def test_unique_tuples_have_no_collisions_and_duplicate_ids_count_once():
    tuples = np.stack([np.arange(1000) // 10, np.arange(1000) % 10], axis=1)
    stats = collision_stats(TupleTable(tuples), np.concatenate([np.arange(1000), np.arange(500)]))
    assert (stats.num_ids, stats.distinct_tuples, stats.colliding_ids) == (1000, 1000, 0)


def test_size_json_reports_collisions_of_the_hashing_trick_and_none_for_full():
    runner = CliRunner()

    def collisions(scheme: str, budget: str) -> dict:
        result = runner.invoke(main, ["size", scheme, "--vocab", "20000", "--dim", "8", "--budget", budget, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["collisions"]

    full = collisions("full", "1")
    assert full["colliding_ids"] == 0 and full["distinct_tuples"] == 20000
    hashed = collisions("hashing-trick", "1/16")
    assert hashed["colliding_ids"] > 0 and hashed["distinct_tuples"] < 20000


@pytest.mark.parametrize("scheme,budget", [("hashing-trick", "1/8"), ("multi-hashing", "1/64")])
def test_collisions_estimated_from_a_sample_match_the_exact_count(scheme, budget):
    from embbench import registry
    from embbench.measure.collisions import collision_stats, estimated_collisions
    from embbench.schemes import Budget, FeatureSpec, build_embedding

    vocabulary = 400_000
    feature = FeatureSpec.from_vocabulary("f", vocabulary, 8)
    budget_bytes = Budget.parse(budget).resolve(vocabulary, 8)
    module, _ = build_embedding(registry.create_scheme(scheme), scheme, feature, budget_bytes, seed=3)
    exact = collision_stats(module, np.arange(vocabulary)).collision_fraction
    estimate = estimated_collisions(module, vocabulary, sample=100_000, seed=1)
    assert estimate["estimated"] and estimate["sample_ids"] <= 100_000
    assert 0 < exact < 1
    # within 20%: sampling noise (a few hundred colliding IDs in the sample) and tuples not quite uniform
    assert estimate["collision_fraction"] == pytest.approx(exact, rel=0.2)
    assert estimate["sample_collision_fraction"] < exact  # a sample alone would understate collisions
