"""The report's statistics beyond means: paired t-tests of each scheme against the best one per budget, and the
leaderboard of normalised areas under the quality-against-log-size curves; numbers checked by hand and by brute
force."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from embbench.report import write_report
from embbench.report.leaderboard import leaderboard, normalised_area, swept_budgets
from embbench.report.statistics import mean_ci, paired_comparisons, paired_t_test, t_two_sided_p


def cell(label: str, budget: str, size: int, seed: int, auc: float, **extra: object) -> dict:
    row = {"suite": "s", "dataset": "d", "model": "gmf", "device": "cpu", "scheme": label.split("-")[0],
           "scheme_label": label, "budget": budget, "size_bytes": size, "budget_bytes": size, "full_bytes": 10**6,
           "seed": seed, "status": "ok", "test_auc": auc, "test_hr10": math.nan}
    row.update(extra)
    return row


def t_density(x: float, df: int) -> float:
    scale = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return scale * (1 + x * x / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("t", [0.5, 2.0, 4.3])
def test_two_sided_p_matches_numerical_integration_of_the_t_density(t: float, df: int) -> None:
    grid = np.linspace(0.0, t, 20_001)
    central = 2.0 * np.trapezoid([t_density(x, df) for x in grid], grid)
    assert t_two_sided_p(t, df) == pytest.approx(1.0 - central, abs=1e-7)


def test_paired_t_test_by_hand() -> None:
    # differences 0.01, 0.03, 0.02: mean 0.02, s = 0.01, t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3, df = 2;
    # for df = 2, P(|T| >= t) = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14).
    test = paired_t_test([0.01, 0.03, 0.02])
    assert test is not None
    assert test.pairs == 3
    assert test.mean == pytest.approx(0.02)
    assert test.t == pytest.approx(2 * math.sqrt(3))
    assert test.p_value == pytest.approx(1 - math.sqrt(12 / 14))
    assert (test.low, test.high) == pytest.approx(mean_ci([0.01, 0.03, 0.02])[1:])
    assert not test.significant()  # p = 0.074


def test_paired_t_test_significance_and_edge_cases() -> None:
    assert paired_t_test([-0.05, -0.051, -0.049, -0.05]).significant()
    assert paired_t_test([0.01]) is None  # one pair: no test
    assert paired_t_test([0.01, math.nan]) is None
    constant = paired_t_test([-0.02, -0.02, -0.02])
    assert constant.t == -math.inf and constant.p_value == 0.0 and constant.significant()
    zero = paired_t_test([0.0, 0.0])
    assert zero.p_value == 1.0 and not zero.significant()


@pytest.fixture
def three_schemes() -> pd.DataFrame:
    """At budget 1/4: best has seeds 0-2, near is a little worse on average, weak failed seed 2;
    rows are shuffled so that seeds are matched by the seed column, not by position."""
    rows = [
        cell("best", "1/4", 250, 0, 0.80), cell("best", "1/4", 250, 1, 0.82), cell("best", "1/4", 250, 2, 0.81),
        cell("near", "1/4", 250, 2, 0.812), cell("near", "1/4", 250, 0, 0.785), cell("near", "1/4", 250, 1, 0.825),
        cell("weak", "1/4", 250, 1, 0.70), cell("weak", "1/4", 250, 0, 0.71),
        cell("weak", "1/4", 250, 2, math.nan, status="failed"),
        cell("lone", "1", 1000, 0, 0.9),
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=3)


def test_paired_comparisons_pair_by_seed(three_schemes: pd.DataFrame) -> None:
    comparisons = paired_comparisons(three_schemes)
    auc = comparisons[comparisons["metric"] == "test_auc"].set_index("scheme_label")
    assert set(auc.index) == {"near", "weak"}  # the lone budget-1 scheme has nobody to be compared with
    assert set(auc["best"]) == {"best"}
    near = auc.loc["near"]
    differences = [0.785 - 0.80, 0.825 - 0.82, 0.812 - 0.81]  # seeds 0, 1, 2
    expected = paired_t_test(differences)
    assert near["pairs"] == 3
    assert near["difference_mean"] == pytest.approx(np.mean(differences))
    assert near["t"] == pytest.approx(expected.t)
    assert near["p_value"] == pytest.approx(expected.p_value)
    assert not near["significant"]
    weak = auc.loc["weak"]
    assert weak["pairs"] == 2  # its failed seed is not paired
    assert weak["difference_mean"] == pytest.approx(np.mean([0.71 - 0.80, 0.70 - 0.82]))
    # differences -0.09, -0.12: mean -0.105, s = 0.015 sqrt 2, t = -7, df = 1: p = 1 - (2 / pi) atan 7 = 0.090,
    # so even a 0.1 gap is not significant with two seeds.
    assert weak["t"] == pytest.approx(-7.0)
    assert weak["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(7.0))
    assert not weak["significant"]


def test_one_paired_seed_gives_no_test() -> None:
    frame = pd.DataFrame([cell("a", "1/2", 500, 0, 0.8), cell("b", "1/2", 500, 0, 0.7),
                          cell("b", "1/2", 500, 1, 0.72)])
    row = paired_comparisons(frame).iloc[0]
    assert (row["best"], row["scheme_label"], row["pairs"]) == ("a", "b", 1)
    assert row["significant"] is None and math.isnan(row["p_value"])


def test_normalised_area_by_hand() -> None:
    # log10 sizes 3, 4, 6; trapezoids 1 * 0.65 + 2 * 0.75 = 2.15 over a span of 3.
    assert normalised_area([1_000, 10_000, 1_000_000], [0.6, 0.7, 0.8]) == pytest.approx(2.15 / 3)
    assert normalised_area([1_000_000, 1_000, 10_000], [0.8, 0.6, 0.7]) == pytest.approx(2.15 / 3)  # any order
    assert normalised_area([5_000], [0.7]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        normalised_area([0, 10], [0.5, 0.6])


def test_normalised_area_is_the_mean_height_of_the_curve_by_brute_force() -> None:
    rng = np.random.default_rng(0)
    sizes = np.sort(rng.uniform(1e3, 1e7, size=6))
    values = rng.uniform(0.5, 0.9, size=6)
    grid = np.linspace(np.log10(sizes[0]), np.log10(sizes[-1]), 400_001)
    heights = np.interp(grid, np.log10(sizes), values)
    assert normalised_area(sizes, values) == pytest.approx(heights.mean(), abs=1e-5)


@pytest.fixture
def sweep() -> pd.DataFrame:
    """a and b at three budgets and two seeds; c misses one budget; full only at its own budget."""
    budgets = [("1/8", 1_000), ("1/4", 10_000), ("1/2", 1_000_000)]
    rows = []
    for step, (budget, size) in enumerate(budgets):
        for seed in (0, 1):
            rows.append(cell("a", budget, size, seed, 0.6 + 0.1 * step + 0.01 * seed))
            rows.append(cell("b", budget, size, seed, 0.65 + 0.05 * step))
            if budget != "1/2":
                rows.append(cell("c", budget, size, seed, 0.9))
    rows.append(cell("full", "1", 2_000_000, 0, 0.95))
    return pd.DataFrame(rows)


def test_swept_budgets_leave_out_single_scheme_budgets(sweep: pd.DataFrame) -> None:
    from embbench.report.statistics import seed_values

    assert swept_budgets(seed_values(sweep, "test_auc")) == ["1/8", "1/4", "1/2"]


def test_leaderboard_by_hand(sweep: pd.DataFrame) -> None:
    board = leaderboard(sweep)
    ranked = board.ranked[board.ranked["metric"] == "test_auc"].set_index("scheme_label")
    # a: seed 0 -> (1 * 0.65 + 2 * 0.75) / 3, seed 1 -> that + 0.01; b: (1 * 0.675 + 2 * 0.725) / 3 both seeds.
    a_areas = [2.15 / 3, 2.15 / 3 + 0.01]
    assert ranked.loc["a", ["area_mean", "area_low", "area_high"]].tolist() == pytest.approx(mean_ci(a_areas))
    assert ranked.loc["b", "area_mean"] == pytest.approx((0.675 + 2 * 0.725) / 3)
    assert ranked.loc["b", "area_low"] == ranked.loc["b", "area_high"] == pytest.approx(ranked.loc["b", "area_mean"])
    assert ranked.loc["a", "rank"] == 1 and ranked.loc["b", "rank"] == 2
    assert (ranked["seeds"] == 2).all() and (ranked["budgets"] == 3).all()
    left_out = board.left_out.set_index("scheme_label")["reason"]
    assert set(left_out.index) == {"c", "full"}
    assert "2 of the 3 swept budgets" in left_out["c"] and "1/2" in left_out["c"]
    assert "0 of the 3" in left_out["full"]


def test_leaderboard_uses_only_seeds_that_ran_every_budget(sweep: pd.DataFrame) -> None:
    gappy = sweep[~((sweep["scheme_label"] == "a") & (sweep["seed"] == 1) & (sweep["budget"] == "1/4"))]
    ranked = leaderboard(gappy).ranked.set_index("scheme_label")
    assert ranked.loc["a", "seeds"] == 1
    assert ranked.loc["a", "area_mean"] == pytest.approx(2.15 / 3)


def test_report_shows_comparisons_and_leaderboard(sweep: pd.DataFrame, tmp_path) -> None:
    text = write_report(sweep, tmp_path).read_text(encoding="utf-8")
    assert "Paired comparison with the best scheme per budget" in text
    assert "paired t-test" in text
    assert "Leaderboard" in text and "not ranked because" in text
    board_line = next(line for line in text.splitlines() if line.startswith("| test AUC | 1 |"))
    assert "| a |" in board_line and f"{(2.15 / 3 + 0.005):.4f} ±" in board_line
