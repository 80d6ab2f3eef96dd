"""Pareto fronts (smaller size, higher score wins), interval overlap with the front, and t intervals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from embbench.report.pareto import front_with_uncertainty, pareto_front
from embbench.report.statistics import mean_ci, t_quantile


def brute_force_front(sizes: list[float], scores: list[float]) -> list[bool]:
    def dominates(j: int, i: int) -> bool:
        no_worse = sizes[j] <= sizes[i] and scores[j] >= scores[i]
        return no_worse and (sizes[j] < sizes[i] or scores[j] > scores[i])

    return [not any(dominates(j, i) for j in range(len(sizes))) for i in range(len(sizes))]


def test_known_front() -> None:
    sizes = [1, 2, 2, 3, 3, 4, 5]
    scores = [0.5, 0.5, 0.7, 0.7, 0.9, 0.8, 0.95]
    assert pareto_front(sizes, scores).tolist() == [True, False, True, False, True, False, True]


def test_single_point_is_on_the_front() -> None:
    assert pareto_front([10.0], [0.3]).tolist() == [True]


def test_empty_input_gives_empty_mask() -> None:
    assert pareto_front([], []).tolist() == []


def test_strictly_improving_points_are_all_on_the_front() -> None:
    assert pareto_front([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]).all()


def test_one_point_dominating_all_others() -> None:
    mask = pareto_front([5, 3, 4, 2, 6], [0.1, 0.2, 0.3, 0.9, 0.5])
    assert mask.tolist() == [False, False, False, True, False]


def test_identical_points_are_both_on_the_front() -> None:
    mask = pareto_front([1, 1, 2, 2], [0.4, 0.4, 0.6, 0.6])
    assert mask.tolist() == [True, True, True, True]


def test_equal_score_at_larger_size_is_dominated() -> None:
    assert pareto_front([1, 2], [0.5, 0.5]).tolist() == [True, False]


def test_lower_score_at_equal_size_is_dominated() -> None:
    assert pareto_front([3, 3], [0.5, 0.6]).tolist() == [False, True]


def test_order_of_points_does_not_matter() -> None:
    sizes, scores = [4, 1, 3, 2], [0.9, 0.2, 0.95, 0.1]
    assert pareto_front(sizes, scores).tolist() == [False, True, True, False]


def test_nan_points_are_never_on_the_front_and_dominate_nothing() -> None:
    mask = pareto_front([1, 2, float("nan"), 3], [float("nan"), 0.5, 0.9, 0.4])
    assert mask.tolist() == [False, True, False, False]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_points_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, 60).astype(float).tolist()
    scores = rng.integers(0, 6, 60).astype(float).tolist()
    assert pareto_front(sizes, scores).tolist() == brute_force_front(sizes, scores)


def test_large_input_front_is_a_monotone_staircase() -> None:
    rng = np.random.default_rng(0)
    sizes, scores = rng.random(200_000), rng.random(200_000)
    on_front = pareto_front(sizes, scores)
    order = np.argsort(sizes[on_front])
    front_scores = scores[on_front][order]
    # Along the front, larger size must buy strictly better score, and the best point overall is on it.
    assert (np.diff(front_scores) > 0).all()
    assert on_front[np.argmax(scores)] and on_front[np.argmin(sizes)]


def test_overlap_flags_compare_interval_with_the_front_best_at_that_size() -> None:
    size = pd.Series([1.0, 2.0, 3.0, 4.0, 2.5], index=[10, 11, 12, 13, 14])
    mean = [0.50, 0.70, 0.65, 0.80, 0.60]
    low = [0.45, 0.65, 0.60, 0.75, 0.50]
    high = [0.55, 0.75, 0.72, 0.85, 0.69]
    flags = front_with_uncertainty(size, mean, low, high)
    assert flags.index.tolist() == [10, 11, 12, 13, 14]
    assert flags["on_front"].tolist() == [True, True, False, True, False]
    assert flags["front_best"].tolist() == [0.50, 0.70, 0.70, 0.80, 0.70]
    # size 3: high 0.72 reaches 0.70; size 2.5: high 0.69 falls short of 0.70.
    assert flags["overlaps_front"].tolist() == [False, False, True, False, False]


def test_front_points_never_overlap() -> None:
    flags = front_with_uncertainty([1, 2], [0.5, 0.6], [0.0, 0.0], [1.0, 1.0])
    assert not flags["overlaps_front"].any()


def test_interval_touching_the_front_best_counts_as_overlap() -> None:
    flags = front_with_uncertainty([1, 2], [0.6, 0.5], [0.55, 0.45], [0.65, 0.6])
    assert flags["overlaps_front"].tolist() == [False, True]


def test_mean_ci_of_one_two_three() -> None:
    mean, low, high = mean_ci([1, 2, 3])
    half_width = 4.302653 * 1.0 / math.sqrt(3)
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half_width, rel=1e-6)
    assert high == pytest.approx(2.0 + half_width, rel=1e-6)


def test_mean_ci_single_value_has_zero_width() -> None:
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7)


def test_mean_ci_ignores_nan_and_empty_is_nan() -> None:
    assert mean_ci([1.0, float("nan"), 3.0])[0] == 2.0
    assert all(math.isnan(v) for v in mean_ci([]))


def test_mean_ci_rejects_bad_confidence() -> None:
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1, 2], confidence=1.5)


@pytest.mark.parametrize(
    ("confidence", "df", "expected"),
    [
        (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 3, 3.1824), (0.95, 4, 2.7764), (0.95, 5, 2.5706),
        (0.95, 10, 2.2281), (0.95, 30, 2.0423), (0.95, 100, 1.9840), (0.99, 1, 63.6567), (0.99, 9, 3.2498),
        (0.90, 7, 1.8946), (0.80, 20, 1.3253), (0.95, 5000, 1.9604),
    ],
)
def test_t_quantile_matches_published_tables(confidence: float, df: int, expected: float) -> None:
    assert t_quantile(confidence, df) == pytest.approx(expected, abs=6e-5)


def test_t_quantile_closed_forms_for_one_and_two_degrees() -> None:
    assert t_quantile(0.9, 1) == pytest.approx(math.tan(math.pi * 0.9 / 2), rel=1e-10)
    p = 0.5 + 0.9 / 2
    assert t_quantile(0.9, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
