"""The online propensity model: feature dict -> model inputs, River scaling + logistic regression.

Inputs are the served features, log-compressed (counts, money and durations are heavy-tailed) with
an explicit "never" indicator for recencies that have no event yet, so the model sees the same
numbers replay and live do. Score before learning (test-then-train) is the caller's discipline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from river import compose, linear_model, optim, preprocessing

from features.catalogue import NAMES

SIGNED = frozenset({"engagement_trend"})


def inputs(features: Mapping[str, float | int | bool | None]) -> dict[str, float]:
    """Model inputs from served features (same names; ``never_*`` flags for absent recencies)."""
    x: dict[str, float] = {}
    for name in NAMES:
        v = features[name]
        if v is None:
            x[name] = 0.0
            x[f"never_{name}"] = 1.0
            continue
        if name.startswith("s_since"):
            x[f"never_{name}"] = 0.0
        if isinstance(v, bool):
            x[name] = 1.0 if v else 0.0
        elif name in SIGNED:
            x[name] = float(v)
        else:
            x[name] = math.log1p(max(0.0, float(v)))
    return x


@dataclass(frozen=True)
class ModelConfig:
    optimizer: str = "sgd"  # sgd | adagrad | adam
    learning_rate: float = 0.001
    l2: float = 0.0
    positive_weight: float = 1.0  # >1 favours recall; 1 keeps probabilities calibrated

    def make_optimizer(self) -> optim.base.Optimizer:
        lr = self.learning_rate
        if self.optimizer == "adagrad":
            return optim.AdaGrad(lr)
        if self.optimizer == "adam":
            return optim.Adam(lr)
        return optim.SGD(lr)


class OnlineModel:
    """One target's River pipeline plus its learning counters."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.pipeline = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(optimizer=self.config.make_optimizer(), l2=self.config.l2),
        )
        self.positives = 0
        self.negatives = 0

    def score(self, x: Mapping[str, float]) -> float:
        return float(self.pipeline.predict_proba_one(dict(x)).get(True, 0.5))

    def learn(self, x: Mapping[str, float], label: int) -> None:
        w = self.config.positive_weight if label else 1.0
        self.pipeline.learn_one(dict(x), bool(label), w=w)
        if label:
            self.positives += 1
        else:
            self.negatives += 1

    def contributions(self, x: Mapping[str, float]) -> tuple[dict[str, float], float]:
        """Per-input contribution to the logit, and the intercept: they sum to the model's logit."""
        scaler, lr = self.pipeline.steps.values()
        z = scaler.transform_one(dict(x))
        contrib = {k: lr.weights.get(k, 0.0) * v for k, v in z.items()}
        return contrib, float(lr.intercept)

    def logit(self, x: Mapping[str, float]) -> float:
        p = min(max(self.score(x), 1e-15), 1 - 1e-15)
        return math.log(p / (1 - p))
