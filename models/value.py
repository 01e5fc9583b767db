"""The online value model: expected revenue within a horizon, ``P(purchase) x E[revenue | purchase]``.

Revenue within a horizon is zero for most snapshots and heavy-tailed for the rest, so one
regressor on revenue is pulled around by the few large orders and predicts small positive
amounts for everyone. The hurdle model splits the two questions the data answers differently:
- *whether*: the same scaled logistic regression as every propensity target, on "any purchase";
- *how much, given a purchase*: a scaled linear regression on ``log(revenue)`` of the positive
  snapshots only, around the running mean of that log, with Duan's smearing factor (the mean of
  ``exp(residual)`` over about the last 1,000 positives, each residual taken before its example
  is learnt) to turn a mean of logs back into a mean of amounts without assuming the residuals
  are normal. A prediction's log amount is clamped to two standard deviations around the mean
  learnt: a linear model exponentiated extrapolates wildly for the odd input far outside what it
  saw (measured unclamped: a top decile predicted at 18,679 where 134 came).

``form="log1p"`` is the single-regressor alternative (``log1p(revenue)`` on every snapshot,
smeared the same way), kept so ``propstream eval`` can compare the two on the same events
(``docs/models.md`` has the figures that chose the hurdle).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from river import compose, linear_model, optim, preprocessing

from models.ledger import VALUE
from models.online import ModelConfig, OnlineModel

FORMS = ("hurdle", "log1p")
MAX_LOG = math.log(1e9)  # a prediction's log amount is clipped here: no overflow, whatever the weights
MIN_LOG = -30.0
# a prediction's log amount stays within this many standard deviations of the amounts learnt
# (measured on the simulator, 14 d: predicted / actual revenue on the last 30% 1.16 with 2, 1.24 with 3)
CLAMP_SD = 2.0
SMEAR_CLIP = 5.0  # a residual's exp() is taken within +-5 (x148): one outlier cannot blow the factor up
SMEAR_WINDOW = 1000  # the smearing factor averages about the last this many residuals: early ones
# (an untrained regression's) fade instead of inflating it for good


@dataclass(frozen=True)
class ValueConfig:
    form: str = "hurdle"  # hurdle | log1p
    severity_lr: float = 0.001  # SGD step of the log-amount regression (inputs are standardised)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            msg = f"value model form {self.form!r}: choose one of {', '.join(FORMS)}"
            raise ValueError(msg)
        if not self.severity_lr > 0:
            msg = f"value model severity_lr must be positive, not {self.severity_lr}"
            raise ValueError(msg)


HUBER_EPSILON = 1.0  # residuals in log amount beyond +-1 (x2.7) pull with a constant force


def regressor(lr: float) -> compose.Pipeline:
    """``StandardScaler | LinearRegression`` with the Huber loss, the shape :mod:`models.fastscore`
    reads. Squared loss diverged online (measured: predictions of 1e10 within 100k simulated
    snapshots): early on the running scaler makes some standardised inputs huge, and a squared
    loss's step grows with the residual too. Huber's gradient is bounded like the classifier's."""
    return compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LinearRegression(
            optimizer=optim.SGD(lr), loss=optim.losses.Huber(HUBER_EPSILON), intercept_lr=lr
        ),
    )


def _clip(z: float) -> float:
    return MIN_LOG if z < MIN_LOG else MAX_LOG if z > MAX_LOG else z


class ValueModel:
    """One value target's model: a classifier (hurdle), a log-amount regressor and running figures."""

    kind = "value"

    def __init__(self, config: ModelConfig | None = None, value: ValueConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.value_config = value or ValueConfig()
        self.classifier = OnlineModel(self.config)
        self.severity = regressor(self.value_config.severity_lr)
        self.positives = 0  # snapshots with a purchase in the horizon
        self.negatives = 0
        self.revenue_sum = 0.0  # over every example learnt: the mean label sets the tiers
        self.log_sum = 0.0  # the regression's target summed (its running mean is the baseline)
        self.log_n = 0
        self.log_sq = 0.0  # the target's squares summed: its spread bounds a prediction
        self.smear_avg = 1.0  # mean of exp(residual) over about the last SMEAR_WINDOW examples
        self.smear_n = 0

    @property
    def hurdle(self) -> bool:
        return self.value_config.form == "hurdle"

    @property
    def mean_value(self) -> float:
        """Mean revenue per matured snapshot learnt (0 before any): the scale value tiers are set in."""
        n = self.positives + self.negatives
        return self.revenue_sum / n if n else 0.0

    @property
    def base(self) -> float:
        """The running mean of the regression's target: the regression learns the rest."""
        return self.log_sum / self.log_n if self.log_n else 0.0

    def expected(self, p: float, reg: float) -> float:
        """The expected revenue from the classifier's probability ``p`` and the regression's raw
        output ``reg``: one formula, shared with :class:`models.fastscore.FastScorer`."""
        z = self.base + reg
        if self.log_n:  # within CLAMP_SD standard deviations of the amounts learnt
            k = CLAMP_SD * math.sqrt(max(0.0, self.log_sq / self.log_n - self.base * self.base))
            lo, hi = self.base - k, self.base + k
            z = lo if z < lo else hi if z > hi else z
        amount = math.exp(_clip(z)) * self.smear_avg
        if self.hurdle:
            return p * amount
        return max(0.0, amount - 1.0)

    def score(self, x: Mapping[str, float]) -> float:
        p = self.classifier.score(x) if self.hurdle else 1.0
        return self.expected(p, float(self.severity.predict_one(dict(x))))

    def learn(self, x: Mapping[str, float], label: int, value: float = 0.0) -> None:
        """Learn one matured snapshot: ``label`` is whether it saw a purchase, ``value`` its revenue."""
        if label:
            self.positives += 1
        else:
            self.negatives += 1
        self.revenue_sum += value
        if self.hurdle:
            self.classifier.learn(x, label)
            if value <= 0.0:
                return  # the amount model learns from purchases with revenue only
            y = math.log(value)
        else:
            y = math.log1p(max(value, 0.0))
        d = dict(x)
        residual = y - (self.base + float(self.severity.predict_one(d)))
        self.smear_n += 1
        e = math.exp(max(-SMEAR_CLIP, min(SMEAR_CLIP, residual)))
        self.smear_avg += (e - self.smear_avg) / min(self.smear_n, SMEAR_WINDOW)
        self.log_sum += y
        self.log_n += 1
        self.log_sq += y * y
        self.severity.learn_one(d, y - self.base)

    def contributions(self, x: Mapping[str, float]) -> tuple[dict[str, float], float]:
        """Per-input contribution to the log of the expected amount plus (hurdle) the purchase
        logit, and the intercepts: what explains a value change (an approximation: ``log(p)`` is
        not linear in the logit, but both parts rank inputs by how far they push the value)."""
        scaler, lr = self.severity.steps.values()
        z = scaler.transform_one(dict(x))
        contrib = {k: lr.weights.get(k, 0.0) * v for k, v in z.items()}
        bias = float(lr.intercept) + self.base
        if self.hurdle:
            c, b = self.classifier.contributions(x)
            for k, v in c.items():
                contrib[k] = contrib.get(k, 0.0) + v
            bias += b
        return contrib, bias


AnyModel = OnlineModel | ValueModel  # what a target is scored with


def fresh_model(target: str, config: ModelConfig, value: ValueConfig | None = None) -> AnyModel:
    """An untrained model of the kind ``target`` needs (the name ``value`` is the value kind)."""
    return ValueModel(config, value) if target == VALUE else OnlineModel(config)


def learn_matured(model: AnyModel, x: Mapping[str, float], label: int, value: float) -> None:
    """Learn one matured snapshot: its label, and a value model its revenue too."""
    if isinstance(model, ValueModel):
        model.learn(x, label, value)
    else:
        model.learn(x, label)


def matured_y(model: AnyModel, label: int, value: float) -> float:
    """What the rolling quality window keeps beside a served score: the revenue that came for a
    value model, the label for a propensity."""
    return value if isinstance(model, ValueModel) else float(label)


def figures(pred: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    """The value quality report (``models.value_quality.report``) without its per-decile table:
    the numbers a model snapshot carries and the trust gate reads."""
    from models import value_quality

    return {k: v for k, v in value_quality.report(pred, actual).items() if k != "decile_calibration"}
