"""Metrics. Full ranking: each user's held-out item ranked against every candidate item of the catalogue.

No sampled negatives: a user's candidates are all items not excluded for them (their training items and the
other split's held-out item are excluded). Ties count against the model, so a constant scorer gets HR 0.
Classification (rating classification, click-through): AUC over held-out rows and log-loss.
"""

from __future__ import annotations

import math

import torch

from embbench.errors import Diverged


def metric_keys(k: int) -> tuple[str, str, str]:
    """The keys rank_metrics returns for cut-off ``k``: ("auc", "hr@k", "ndcg@k")."""
    return "auc", f"hr@{k}", f"ndcg@{k}"


def rank_metrics(
    scores: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor, k: int = 10
) -> dict[str, torch.Tensor]:
    """Per-user AUC, HR@k and NDCG@k of each user's positive item among its candidates.

    ``scores`` is [U, M] (one score per catalogue item), ``positive`` is [U] (the held-out item's column),
    ``excluded`` is bool [U, M] (items that are not candidates for that user; never the positive).
    Returns float64 tensors of shape [U] under the keys of ``metric_keys(k)``. A user with no negative
    candidates has NaN for every metric. A NaN score counts against the model: a NaN positive scores below
    every negative and a NaN negative above the positive.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [users, items], got shape {tuple(scores.shape)}")
    num_users, num_items = scores.shape
    if positive.shape != (num_users,):
        raise ValueError(f"positive must be [{num_users}], got shape {tuple(positive.shape)}")
    if excluded.shape != scores.shape or excluded.dtype != torch.bool:
        raise ValueError(
            f"excluded must be a bool tensor of shape {tuple(scores.shape)}, "
            f"got {excluded.dtype} {tuple(excluded.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = scores.device
    positive = positive.to(device=device, dtype=torch.int64)
    excluded = excluded.to(device)
    if num_users and (int(positive.min()) < 0 or int(positive.max()) >= num_items):
        raise ValueError(
            f"positive columns must lie in [0, {num_items}), got {int(positive.min())}..{int(positive.max())}"
        )
    rows = torch.arange(num_users, device=device)
    if bool(excluded[rows, positive].any()):
        raise ValueError("a user's positive item is marked excluded; the positive must be a candidate")

    is_negative = ~excluded
    is_negative[rows, positive] = False
    positive_score = scores[rows, positive].unsqueeze(1)
    positive_score = positive_score.masked_fill(positive_score.isnan(), -math.inf)
    # A NaN total is a cheap test for any NaN score; inf - inf also lands here, harmlessly.
    has_nan = bool(scores.sum().isnan())
    negative_score = scores.masked_fill(scores.isnan(), math.inf) if has_nan else scores

    # Summing bools into int32 avoids an int64 copy of the whole [U, M] mask (the dominant cost otherwise).
    num_negatives = is_negative.sum(dim=1, dtype=torch.int32)
    num_above = (is_negative & (negative_score > positive_score)).sum(dim=1, dtype=torch.int32)
    num_tied = (is_negative & (negative_score == positive_score)).sum(dim=1, dtype=torch.int32)
    num_below = num_negatives - num_above - num_tied

    no_negatives = num_negatives == 0
    undefined = torch.full((num_users,), math.nan, dtype=torch.float64, device=device)
    auc = (num_below.double() + 0.5 * num_tied.double()) / num_negatives.clamp(min=1).double()
    rank = num_above + num_tied  # pessimistic: every tied negative is placed above the positive
    hit = rank < k
    hr = hit.double()
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros_like(hr))
    auc_key, hr_key, ndcg_key = metric_keys(k)
    return {
        auc_key: torch.where(no_negatives, undefined, auc),
        hr_key: torch.where(no_negatives, undefined, hr),
        ndcg_key: torch.where(no_negatives, undefined, ndcg),
    }


class RankingAccumulator:
    """Streams user batches through rank_metrics and keeps running sums, so results need no per-user storage.

    ``result()`` is the mean of each ``rank_metrics`` value over the users where it is defined (up to summation
    order).
    """

    def __init__(self, k: int = 10) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.keys = metric_keys(k)
        self.users = 0
        self._totals = dict.fromkeys(self.keys, 0.0)
        self._counts = dict.fromkeys(self.keys, 0)

    def add(
        self, scores: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Add one batch of users; returns that batch's per-user metrics."""
        per_user = rank_metrics(scores, positive, excluded, k=self.k)
        for name, values in per_user.items():
            defined = ~values.isnan()
            self._totals[name] += float(values[defined].sum())
            self._counts[name] += int(defined.sum())
        self.users += len(positive)
        return per_user

    def result(self) -> dict[str, float]:
        """Mean of each metric over all users added where it is defined; NaN if none."""
        return {name: self._totals[name] / self._counts[name] if self._counts[name] else math.nan
                for name in self.keys}


def require_finite_scores(scores: torch.Tensor, where: str) -> None:
    """Raise :class:`~embbench.errors.Diverged` if any of a model's ``scores`` is NaN or infinite.

    Metrics of such scores would be numbers (a NaN ranks last) that measure nothing; tasks call this on every
    batch of scores they evaluate, before any metric."""
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise Diverged(f"{bad:,} of {scores.numel():,} model scores on the {where} split are NaN or infinite")


def require_finite_metrics(metrics: dict[str, float], where: str) -> dict[str, float]:
    """``metrics`` as they are, or :class:`~embbench.errors.Diverged` naming the first NaN or infinite one."""
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise Diverged(f"{where} {name} is {value}")
    return metrics


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for 0/1 ``labels`` (Mann-Whitney U, ties counted half); NaN without both classes."""
    scores = scores.detach().double().flatten().cpu()
    labels = labels.detach().flatten().cpu().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {len(scores)} and {len(labels)}")
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    scores = scores.masked_fill(scores.isnan(), -math.inf)  # a NaN score counts against the model
    # Average ranks of tied scores: sort, then give each run of equal values the mean of its positions.
    sorted_scores, order = torch.sort(scores)
    new_run = torch.ones(len(sorted_scores), dtype=torch.bool)
    new_run[1:] = sorted_scores[1:] != sorted_scores[:-1]
    run_id = torch.cumsum(new_run, 0) - 1
    positions = torch.arange(1, len(sorted_scores) + 1, dtype=torch.float64)
    run_sum = torch.zeros(int(run_id[-1]) + 1, dtype=torch.float64).index_add_(0, run_id, positions)
    run_size = torch.bincount(run_id).double()
    ranks = torch.empty_like(positions)
    ranks[order] = (run_sum / run_size)[run_id]
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy (natural log) of ``logits`` against 0/1 ``labels``."""
    logits = logits.detach().double().flatten().cpu()
    labels = labels.detach().double().flatten().cpu()
    if logits.shape != labels.shape:
        raise ValueError(f"logits and labels must have the same length, got {len(logits)} and {len(labels)}")
    if len(labels) == 0:
        return math.nan
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC and log-loss of held-out rows."""
    return {"auc": binary_auc(logits, labels), "logloss": log_loss(logits, labels)}
