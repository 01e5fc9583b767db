"""The online propensity model: feature dict -> model inputs, River scaling + logistic regression.

Inputs are derived from the served features only, so the model sees the same numbers replay and
live do (see :func:`inputs` for which and why). Score before learning (test-then-train) is the
caller's discipline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from river import compose, linear_model, optim, preprocessing

from features.catalogue import NAMES
from features.counts import COUNTED_TYPES

Features = Mapping[str, float | int | bool | None]
DAY_S = 86_400.0
# counts over 30 days, as per-day rates over min(30 days, tenure): (feature, pseudo-count)
RATES_30D: dict[str, float] = {
    **{f"n_{t}_30d": 0.5 for t in COUNTED_TYPES},
    "n_events_30d": 1.0,
    "n_page_view_30d": 1.0,
    "n_product_view_30d": 1.0,
    "purchases_30d": 0.5,
}
# recencies as exp(-t / tau): (feature, tau in seconds); other recencies are log-compressed
DECAYS: dict[str, float] = {"s_since_last_add_to_cart": DAY_S, "s_since_last_purchase": 7 * DAY_S}
SIGNED = frozenset({"engagement_trend"})


def per_day(count: float, days: float, pseudo: float) -> float:
    """Log of a smoothed daily rate: ``log((count + pseudo) / (days + 0.5))``.

    >>> round(per_day(6, 2.5, 0.5), 6) == round(math.log(6.5 / 3.0), 6)
    True
    """
    return math.log((count + pseudo) / (days + 0.5))


def decay(seconds: float | None, tau_s: float) -> float:
    """``exp(-seconds / tau_s)``: 1 just now, 0 long ago or never (``None``).

    >>> decay(None, 3600.0), decay(0.0, 3600.0)
    (0.0, 1.0)
    """
    return 0.0 if seconds is None else math.exp(-seconds / tau_s)


_DECAY, _SINCE, _RATE30, _RATE7, _SIGNED, _PLAIN = range(6)


def _kind(name: str) -> tuple[int, float]:
    """How :func:`inputs` transforms feature ``name``, and the transform's parameter."""
    if name in DECAYS:
        return _DECAY, DECAYS[name]
    if name.startswith("s_since"):
        return _SINCE, 0.0
    if name in RATES_30D:
        return _RATE30, RATES_30D[name]
    if name == "sessions_7d":
        return _RATE7, 0.5
    if name in SIGNED:
        return _SIGNED, 0.0
    return _PLAIN, 0.0


def _plan() -> tuple[tuple[str, ...], dict[int, list[tuple[str, int, float]]]]:
    """The input names in order (a recency's ``never_`` flag just before it), and per transform the
    (feature, position of its input, parameter) it fills: classified once, not per call (hot path)."""
    names: list[str] = []
    by_kind: dict[int, list[tuple[str, int, float]]] = {k: [] for k in range(6)}
    for name in NAMES:
        kind, param = _kind(name)
        if kind in (_SINCE, _DECAY):
            names.append(f"never_{name}")  # the flag sits at the input's position - 1
        by_kind[kind].append((name, len(names), param))
        names.append(name)
    return tuple(names), by_kind


INPUT_NAMES, _BY_KIND = _plan()
_PLAIN_AT = tuple((n, i) for n, i, _ in _BY_KIND[_PLAIN])
_RATE30_AT = tuple(_BY_KIND[_RATE30])
_RATE7_AT = tuple(_BY_KIND[_RATE7])
_SINCE_AT = tuple((n, i) for n, i, _ in _BY_KIND[_SINCE])
_DECAY_AT = tuple(_BY_KIND[_DECAY])
_SIGNED_AT = tuple((n, i) for n, i, _ in _BY_KIND[_SIGNED])


def input_vector(features: Features) -> list[float]:
    """:func:`inputs` as a list in :data:`INPUT_NAMES` order: the hot path scores and samples this.

    One pass per transform over precomputed positions (no per-feature dispatch, no dict built).
    """
    f = features
    tenure = float(f["tenure_days"] or 0.0)
    days30 = min(30.0, tenure) + 0.5  # per_day's denominators, inlined below
    days7 = min(7.0, tenure) + 0.5
    log, log1p, exp = math.log, math.log1p, math.exp
    x = [0.0] * len(INPUT_NAMES)
    for name, i in _PLAIN_AT:
        v = f[name]
        if v is True:
            x[i] = 1.0
        elif v is not False and v:
            fv = float(v)
            if fv > 0.0:  # log1p(max(0, v)), NaN included
                x[i] = log1p(fv)
    for name, i, param in _RATE30_AT:
        x[i] = log((float(f[name] or 0) + param) / days30)
    for name, i, param in _RATE7_AT:
        x[i] = log((float(f[name] or 0) + param) / days7)
    for name, i in _SINCE_AT:
        v = f[name]
        if v is None:
            x[i - 1] = 1.0
        else:
            fv = float(v)
            if fv > 0.0:
                x[i] = log1p(fv)
    for name, i, param in _DECAY_AT:
        v = f[name]
        if v is None:
            x[i - 1] = 1.0
        else:
            x[i] = exp(-float(v) / param)
    for name, i in _SIGNED_AT:
        x[i] = float(f[name] or 0.0)
    return x


def inputs(features: Features) -> dict[str, float]:
    """Model inputs from served features: one per feature, same name, plus a ``never_`` flag per recency.

    Each input keeps its feature's name so an explanation names a served feature; the same keys come
    in the same order on every call (:data:`INPUT_NAMES`). Count windows fill while a user is new: a
    30-day count of a user seen for 3 days is not comparable with a regular's, and the labels the
    model learns from are a horizon older than the snapshots it scores, so inputs that grow with
    tenure leave it extrapolating. So 30-day counts and ``sessions_7d`` are smoothed per-day rates
    over ``min(window, tenure)`` (their differences are the funnel ratios, adds per page view and
    so on, which a linear model forms itself); the cart and purchase recencies decay exponentially
    (1 day, 7 days); other counts, money and durations are log-compressed. Measured on simulated
    purchase, mean of 3 seeds, against the log of every feature: ECE 0.035 -> 0.021, ratio to
    the oracle's ROC-AUC 0.862 -> 0.867 (both with the 0.3 prior, see :class:`ModelConfig`).
    """
    return dict(zip(INPUT_NAMES, input_vector(features), strict=True))


@dataclass(frozen=True)
class ModelConfig:
    optimizer: str = "sgd"  # sgd | adagrad | adam
    learning_rate: float = 0.001
    l2: float = 0.0
    positive_weight: float = 1.0  # >1 favours recall; 1 keeps probabilities calibrated
    prior: float = 0.3
    """The untrained model's score (its starting intercept is ``logit(prior)``). No label matures
    before one horizon has passed, and every score until then is this; 0.3 lies between the base
    rates of the targets measured (simulated purchase 0.32, Taobao 24 h purchase 0.28, simulated
    churn 0.017), where 0.5 is too high for all of them (measured ECE: purchase 0.075 -> 0.035)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.prior < 1.0:
            msg = f"prior must lie strictly between 0 and 1, not {self.prior}"
            raise ValueError(msg)

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
            linear_model.LogisticRegression(
                optimizer=self.config.make_optimizer(),
                l2=self.config.l2,
                intercept_init=math.log(self.config.prior / (1.0 - self.config.prior)),
            ),
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
