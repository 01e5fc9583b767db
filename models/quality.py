"""Model quality on matured labels: ROC-AUC, PR-AUC, log loss, Brier score, ECE, bootstrap intervals.

Plain Python over (score, label) pairs so the worker, ``propstream eval`` and the tests share one
definition; each is checked in the tests against scikit-learn or a hand-worked example.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

EPS = 1e-15


def _tie_groups(pairs: list[tuple[float, int]]) -> Iterator[tuple[int, int, int]]:
    """(start, end, positives) of each run of equal scores in sorted ``pairs``."""
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        yield i, j, sum(lab for _, lab in pairs[i:j])
        i = j


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability that a random positive outranks a random negative (ties count half).

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    pairs = sorted(zip(scores, labels, strict=True))
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = 0.0
    for i, j, pos in _tie_groups(pairs):
        rank_sum += (i + j + 1) / 2 * pos  # 1-based average rank of the tie group
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pr_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Average precision (area under the precision-recall curve, step-wise, as scikit-learn)."""
    n_pos = sum(labels)
    if n_pos == 0:
        return float("nan")
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    tp = fp = 0
    ap = 0.0
    for i, j, new_tp in _tie_groups(pairs):
        tp += new_tp
        fp += (j - i) - new_tp
        ap += (new_tp / n_pos) * (tp / (tp + fp))
    return ap


def log_loss(scores: Sequence[float], labels: Sequence[int]) -> float:
    total = 0.0
    for p, y in zip(scores, labels, strict=True):
        p = min(max(p, EPS), 1 - EPS)
        total -= math.log(p) if y else math.log(1 - p)
    return total / len(labels) if labels else float("nan")


def brier(scores: Sequence[float], labels: Sequence[int]) -> float:
    return (
        sum((p - y) ** 2 for p, y in zip(scores, labels, strict=True)) / len(labels)
        if labels
        else float("nan")
    )


def ece(scores: Sequence[float], labels: Sequence[int], bins: int = 10) -> float:
    """Expected calibration error: |mean score - positive rate| per equal-width bin, weighted by size."""
    if not labels:
        return float("nan")
    count = [0] * bins
    s_sum = [0.0] * bins
    y_sum = [0] * bins
    for p, y in zip(scores, labels, strict=True):
        b = min(int(p * bins), bins - 1)
        count[b] += 1
        s_sum[b] += p
        y_sum[b] += y
    n = len(labels)
    return sum(abs(s_sum[b] - y_sum[b]) / n for b in range(bins) if count[b])


def report(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    return {
        "matured": len(labels),
        "positives": sum(labels),
        "base_rate": sum(labels) / len(labels) if labels else float("nan"),
        "roc_auc": roc_auc(scores, labels),
        "pr_auc": pr_auc(scores, labels),
        "log_loss": log_loss(scores, labels),
        "brier": brier(scores, labels),
        "ece": ece(scores, labels),
    }


def bootstrap_ci(
    metric: Callable[[Sequence[float], Sequence[int]], float],
    scores: Sequence[float],
    labels: Sequence[int],
    *,
    rounds: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of ``metric`` over ``rounds`` resamples with replacement."""
    rng = random.Random(seed)
    n = len(labels)
    values = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        v = metric([scores[i] for i in idx], [labels[i] for i in idx])
        if not math.isnan(v):
            values.append(v)
    values.sort()
    if not values:
        return (float("nan"), float("nan"))
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]
