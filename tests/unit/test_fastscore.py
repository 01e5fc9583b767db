"""The fast scorer gives River's ``predict_proba_one`` (to 1e-12 relative: one matrix product sums in
another order than River's dict walk), and follows learning and hot swaps."""

from __future__ import annotations

import random

import pytest

from models.fastscore import FastScorer
from models.online import ModelConfig, OnlineModel
from models.scoring import input_names

NAMES = input_names()


def river(scores: list[float]) -> object:
    """River's scores, as the fast ones must match them: within 1e-12 relative (or 1e-300 of 0)."""
    return pytest.approx(scores, rel=1e-12, abs=1e-300)


def random_x(rng: random.Random, scale: float = 3.0) -> dict[str, float]:
    # a few inputs stay constant (variance 0: River scales them to 0) and some are often 0
    return {
        k: (1.0 if i % 11 == 0 else rng.random() * scale * (rng.random() < 0.7)) for i, k in enumerate(NAMES)
    }


def trained(config: ModelConfig, n: int, seed: int, skip: int = 0) -> OnlineModel:
    """A model that never saw the last ``skip`` inputs (no weight, no scaler statistics)."""
    rng = random.Random(seed)
    m = OnlineModel(config)
    seen = NAMES[: len(NAMES) - skip]
    for _ in range(n):
        x = random_x(rng)
        m.learn({k: x[k] for k in seen}, int(x[NAMES[1]] + x[NAMES[5]] + rng.gauss(0, 1) > 3.0))
    return m


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("skip", [0, 7])
def test_scores_equal_river_predict_proba_one(optimizer: str, skip: int) -> None:
    models = [
        trained(ModelConfig(optimizer=optimizer, learning_rate=lr), n, seed, skip)
        for lr, n, seed in ((0.05, 300, 1), (0.5, 50, 2), (0.001, 5, 3))
    ]
    fast = FastScorer()
    rng = random.Random(9)
    for _ in range(300):
        x = random_x(rng, scale=rng.choice([1.0, 5.0, 50.0]))  # 50: logits past River's +-30 clip
        assert fast.scores(models, x) == river([m.score(dict(x)) for m in models])


def test_untrained_model_scores_its_prior() -> None:
    x = random_x(random.Random(1))
    m = OnlineModel()
    assert (
        FastScorer().scores([m], x) == [m.score(x)] and FastScorer().scores([], x) == []
    )  # exactly the prior


def test_follows_in_place_learning_and_hot_swaps() -> None:
    rng = random.Random(4)
    m = trained(ModelConfig(learning_rate=0.1), 50, 5)
    fast = FastScorer()
    x = random_x(rng)
    before = fast.scores([m], x)[0]
    for _ in range(50):  # learning in place, as propstream eval does
        m.learn(random_x(rng), 1)
    after = fast.scores([m], x)[0]
    assert after != before and [after] == river([m.score(x)])
    other = trained(ModelConfig(optimizer="adam", learning_rate=0.2), 80, 6)
    assert fast.scores([other], x) == river([other.score(x)])  # swapped in
    assert fast.scores([m, other], x) == river([m.score(x), other.score(x)])
    shuffled = dict(reversed(list(x.items())))  # another key order: River sums in that order too
    assert fast.scores([m, other], shuffled) == river([m.score(shuffled), other.score(shuffled)])
