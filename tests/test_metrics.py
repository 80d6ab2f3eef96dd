"""Full-ranking metrics: agreement with a plain reference, edge cases, and streaming equals one shot."""

from __future__ import annotations

import math

import pytest
import torch

from embbench.metrics import RankingAccumulator, rank_metrics


def summarize(per_user: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each per-user metric over the users where it is defined (NaN when it is defined for none)."""
    return {name: float(torch.nanmean(values.double())) if values.numel() else math.nan
            for name, values in per_user.items()}


def reference_metrics(
    scores: list[list[float]], positive: list[int], excluded: list[list[bool]], k: int
) -> dict[str, list[float]]:
    """The definitions, one user and one item at a time."""
    result: dict[str, list[float]] = {"auc": [], f"hr@{k}": [], f"ndcg@{k}": []}
    for user, row in enumerate(scores):
        target = row[positive[user]]
        above = tied = below = 0
        for item, score in enumerate(row):
            if item == positive[user] or excluded[user][item]:
                continue
            if score > target:
                above += 1
            elif score == target:
                tied += 1
            else:
                below += 1
        negatives = above + tied + below
        if negatives == 0:
            for values in result.values():
                values.append(math.nan)
            continue
        rank = above + tied
        result["auc"].append((below + 0.5 * tied) / negatives)
        result[f"hr@{k}"].append(1.0 if rank < k else 0.0)
        result[f"ndcg@{k}"].append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
    return result


def random_case(users: int, items: int, seed: int, exclude_rate: float = 0.3, levels: int = 5):
    generator = torch.Generator().manual_seed(seed)
    # Integer-valued scores, so that many negatives tie with the positive.
    scores = torch.randint(0, levels, (users, items), generator=generator).float()
    positive = torch.randint(0, items, (users,), generator=generator)
    excluded = torch.rand(users, items, generator=generator) < exclude_rate
    excluded[torch.arange(users), positive] = False
    return scores, positive, excluded


def assert_close_with_nan(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_matches_plain_reference_with_ties_and_exclusions(seed: int, k: int) -> None:
    scores, positive, excluded = random_case(users=40, items=30, seed=seed)
    expected = reference_metrics(scores.tolist(), positive.tolist(), excluded.tolist(), k)
    actual = rank_metrics(scores, positive, excluded, k=k)
    assert set(actual) == {"auc", f"hr@{k}", f"ndcg@{k}"}
    for name, values in expected.items():
        assert actual[name].dtype == torch.float64
        assert_close_with_nan(actual[name], values)


def test_matches_reference_with_continuous_scores_and_dense_exclusion() -> None:
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(25, 50, generator=generator)
    positive = torch.randint(0, 50, (25,), generator=generator)
    excluded = torch.rand(25, 50, generator=generator) < 0.9
    excluded[torch.arange(25), positive] = False
    expected = reference_metrics(scores.tolist(), positive.tolist(), excluded.tolist(), 10)
    for name, values in expected.items():
        assert_close_with_nan(rank_metrics(scores, positive, excluded)[name], values)


def test_perfect_model_scores_one_everywhere() -> None:
    scores = torch.rand(8, 20)
    positive = torch.arange(8) * 2
    scores[torch.arange(8), positive] = 2.0
    excluded = torch.zeros(8, 20, dtype=torch.bool)
    excluded[:, 1] = True
    summary = summarize(rank_metrics(scores, positive, excluded))
    assert summary == {"auc": 1.0, "hr@10": 1.0, "ndcg@10": 1.0}


def test_constant_model_gets_half_auc_and_no_hits() -> None:
    scores = torch.full((6, 50), 0.3)
    positive = torch.arange(6)
    excluded = torch.zeros(6, 50, dtype=torch.bool)
    summary = summarize(rank_metrics(scores, positive, excluded))
    assert summary == {"auc": 0.5, "hr@10": 0.0, "ndcg@10": 0.0}


def test_hand_computed_example() -> None:
    # User 0: positive 0.5 at column 2; column 4 excluded (its 0.9 does not count); negatives 0.9, 0.1, 0.5
    # -> 1 above, 1 tied, 1 below: AUC (1 + 0.5) / 3 = 0.5, rank 2, NDCG 1/log2(4) = 0.5.
    # User 1: positive 0.2 at column 0; negatives 0.1, 0.3, 0.0 (column 4 excluded): AUC 2/3, rank 1.
    # User 2: everything but the positive excluded: no negatives, so undefined.
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.5, 0.9],
        [0.2, 0.1, 0.3, 0.0, 0.8],
        [0.4, 0.4, 0.4, 0.4, 0.4],
    ])
    positive = torch.tensor([2, 0, 1])
    excluded = torch.tensor([
        [False, False, False, False, True],
        [False, False, False, False, True],
        [True, False, True, True, True],
    ])
    per_user = rank_metrics(scores, positive, excluded, k=2)
    assert_close_with_nan(per_user["auc"], [0.5, 2 / 3, math.nan])
    assert_close_with_nan(per_user["hr@2"], [0.0, 1.0, math.nan])
    assert_close_with_nan(per_user["ndcg@2"], [0.0, 1 / math.log2(3), math.nan])
    per_user = rank_metrics(scores, positive, excluded, k=3)
    assert_close_with_nan(per_user["ndcg@3"], [0.5, 1 / math.log2(3), math.nan])
    summary = summarize(per_user)
    assert summary["auc"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert summary["hr@3"] == pytest.approx(1.0)


def test_excluded_positive_is_an_error() -> None:
    scores, positive, excluded = random_case(users=4, items=10, seed=0)
    excluded[2, positive[2]] = True
    with pytest.raises(ValueError, match="positive"):
        rank_metrics(scores, positive, excluded)


def test_shape_mismatch_is_an_error() -> None:
    scores, positive, excluded = random_case(users=4, items=10, seed=0)
    with pytest.raises(ValueError, match="excluded"):
        rank_metrics(scores, positive, excluded[:, :5])
    with pytest.raises(ValueError, match="positive"):
        rank_metrics(scores, positive[:3], excluded)


def test_nan_scores_count_against_the_model() -> None:
    scores = torch.tensor([[math.nan, 0.0, 0.0], [1.0, math.nan, 0.0]])
    positive = torch.tensor([0, 0])
    excluded = torch.zeros(2, 3, dtype=torch.bool)
    per_user = rank_metrics(scores, positive, excluded, k=1)
    assert_close_with_nan(per_user["auc"], [0.0, 0.5])
    assert_close_with_nan(per_user["hr@1"], [0.0, 0.0])


def test_inputs_are_not_modified() -> None:
    scores, positive, excluded = random_case(users=5, items=12, seed=3)
    before = (scores.clone(), positive.clone(), excluded.clone())
    rank_metrics(scores, positive, excluded)
    for original, after in zip(before, (scores, positive, excluded), strict=True):
        assert torch.equal(original, after)


def test_accumulator_equals_one_shot() -> None:
    scores, positive, excluded = random_case(users=100, items=40, seed=5, exclude_rate=0.5)
    excluded[7, :] = True  # one user without negatives, ignored by both
    excluded[7, positive[7]] = False
    accumulator = RankingAccumulator()
    for start in range(0, 100, 32):
        accumulator.add(scores[start:start + 32], positive[start:start + 32], excluded[start:start + 32])
    one_shot = summarize(rank_metrics(scores, positive, excluded))
    assert accumulator.users == 100
    assert accumulator.result() == pytest.approx(one_shot, rel=1e-12)


def test_empty_accumulator_gives_nan() -> None:
    result = RankingAccumulator(k=5).result()
    assert set(result) == {"auc", "hr@5", "ndcg@5"}
    assert all(math.isnan(value) for value in result.values())


