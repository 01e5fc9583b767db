"""Quality metrics against scikit-learn on random data, and hand-worked ECE."""

from __future__ import annotations

import random

import pytest
from sklearn import metrics as skm

from models.quality import bootstrap_ci, brier, ece, log_loss, pr_auc, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed: int) -> None:
    rng = random.Random(seed)
    n = 500
    labels = [int(rng.random() < 0.3) for _ in range(n)]
    scores = [
        round(min(0.999, max(0.001, 0.3 * y + rng.random() * 0.7)), 2) for y in labels
    ]  # ties on purpose
    assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert pr_auc(scores, labels) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    assert log_loss(scores, labels) == pytest.approx(skm.log_loss(labels, scores), rel=1e-9)
    assert brier(scores, labels) == pytest.approx(skm.brier_score_loss(labels, scores), rel=1e-9)


def test_ece_hand_worked() -> None:
    # bin [0.1,0.2): scores 0.1, 0.1, labels 0, 1 -> |0.2 - 1| / 4 ; bin [0.9,1]: 0.9, 0.9 labels 1, 1 -> |1.8 - 2| / 4
    assert ece([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx(0.8 / 4 + 0.2 / 4)
    assert ece([0.25] * 4, [0, 0, 0, 1]) == pytest.approx(0.0)


def test_bootstrap_interval_contains_the_estimate() -> None:
    rng = random.Random(1)
    labels = [int(rng.random() < 0.4) for _ in range(400)]
    scores = [0.3 * y + 0.7 * rng.random() for y in labels]
    lo, hi = bootstrap_ci(roc_auc, scores, labels, rounds=100)
    assert lo < roc_auc(scores, labels) < hi and hi - lo < 0.15
