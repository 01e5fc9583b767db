"""River's ``predict_proba_one`` for several models at once, bit for bit, cached per model state.

The model is ``StandardScaler | LogisticRegression``: ``p = sigmoid(b + sum_i w_i z_i)`` with
``z_i = (x_i - m_i) / v_i ** 0.5`` (0 while the variance ``v_i`` is 0). River computes it with two
dict copies and per-key lookups per call; here the scaler's and the weights' numbers are read once
per model state into term lists, and a call is one loop per target. The sum runs in the input's
key order, sequentially, as River's ``VectorDict.dot`` does, so the score is the same float, not
merely a close one (``tests/unit/test_fastscore.py``).

The cache is keyed by the model objects and how many labels each has learnt, so a model that
learns in place (``propstream eval``) or is hot-swapped (the worker) is re-read on its next score.

>>> from models.online import OnlineModel
from models.value import AnyModel, ValueModel

Terms = list[tuple[int, float, float, float]]
>>> m = OnlineModel()
>>> for i in range(50):
...     m.learn({"a": float(i % 7), "b": float(i % 3)}, int(i % 7 > 3))
>>> x = {"a": 5.0, "b": 1.0}
>>> FastScorer().scores((m,), x) == [m.score(x)]
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from models.online import OnlineModel
from models.value import AnyModel, ValueModel

Terms = list[tuple[int, float, float, float]]


def sigmoid(z: float) -> float:
    """River's ``utils.math.sigmoid``, clipped the same way (exactly 0 or 1 beyond +-30)."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1 / (1 + math.exp(-z))


def arrays(
    model: OnlineModel | ValueModel, names: Sequence[str]
) -> tuple[list[float], list[float], list[float], float]:
    """Per input in ``names`` order: scaler mean, scale (``inf`` while variance is 0), weight; intercept
    (of a value model: its amount regression's)."""
    pipeline = model.severity if isinstance(model, ValueModel) else model.pipeline
    scaler, lr = pipeline.steps.values()
    weights = lr.weights
    means: list[float] = []
    scales: list[float] = []
    ws: list[float] = []
    for k in names:
        v = scaler.vars.get(k, 0.0)
        means.append(scaler.means.get(k, 0.0))
        # x / inf is 0 for any finite x: River's "0.0 if the variance is 0", without a branch
        scales.append(v**0.5 if v else math.inf)
        ws.append(weights.get(k, 0.0))
    return means, scales, ws, float(lr.intercept)


def _live(model: OnlineModel | ValueModel, names: Sequence[str]) -> tuple[Terms, float]:
    """The terms of ``model`` that can be non-zero, and its intercept."""
    means, scales, ws, bias = arrays(model, names)
    # a weight of 0 or a variance of 0 (scale inf) makes the term 0: adding it changes no sum
    live = [
        (i, mu, s, w)
        for i, (mu, s, w) in enumerate(zip(means, scales, ws, strict=True))
        if w and s != math.inf
    ]
    return live, bias


class FastScorer:
    """Scores of several models on one input dict.

    Plain Python over per-model term lists: for two models of about 60 inputs, numpy's per-call
    overhead (array, four vector operations, ``cumsum``) cost twice this loop (32 against 17 us a
    vector, ``tests/unit/test_fastscore.py`` holds it to River's floats).
    """

    def __init__(self) -> None:
        self._names: tuple[str, ...] = ()
        self._models: list[AnyModel] = []
        self._seen: list[int] = []  # labels each model had learnt when it was read
        # per model: (input index, mean, scale, weight) of every term that can be non-zero; intercept
        self._terms: list[tuple[Terms, float]] = []
        # per value model: its position, the classifier's terms (None: not a hurdle) and the model
        self._values: list[tuple[int, tuple[Terms, float] | None, ValueModel]] = []
        # the last answer: the scoring core asks twice for one input vector (snapshot, then rescore)
        self._memo: tuple[object, list[float]] = (None, [])

    def _load(self, models: Sequence[AnyModel], names: tuple[str, ...]) -> None:
        # the model object itself is compared (not its id): a freed model's id may be reused
        old = self._models
        if (names is self._names or names == self._names) and len(models) == len(old):
            for m, k, n in zip(models, old, self._seen, strict=True):  # a loop: cheaper than all()
                if m is not k or m.positives + m.negatives != n:
                    break
            else:
                return
        terms = [_live(m, names) for m in models]
        values = [
            (j, _live(m.classifier, names) if m.hurdle else None, m)
            for j, m in enumerate(models)
            if isinstance(m, ValueModel)
        ]
        self._names, self._models, self._terms, self._values = names, list(models), terms, values
        self._seen = [m.positives + m.negatives for m in models]
        self._memo = (None, [])

    def scores(self, models: Sequence[AnyModel], x: Mapping[str, float]) -> list[float]:
        """``[m.score(x) for m in models]``, the same floats."""
        return self.scores_of(models, tuple(x), list(x.values()))

    def scores_of(
        self, models: Sequence[AnyModel], names: tuple[str, ...], values: Sequence[float]
    ) -> list[float]:
        """:meth:`scores` of the input whose keys are ``names`` and values ``values``, in that order
        (the scoring core passes its cached input vector: no dict walk per call)."""
        if not models:
            return []
        self._load(models, names)
        seen, out = self._memo
        if seen is values:  # the same vector object (held here) and models
            return list(out)
        out = []
        for terms, bias in self._terms:
            dot = 0.0  # summed in input order, one term at a time, as River's VectorDict.dot
            for i, mean, scale, w in terms:
                dot += w * ((values[i] - mean) / scale)
            out.append(sigmoid(dot + bias))
        for j, classifier, m in self._values:  # the sigmoid above was not taken: its dot is below
            terms, bias = self._terms[j]
            reg = 0.0
            for i, mean, scale, w in terms:
                reg += w * ((values[i] - mean) / scale)
            p = 1.0
            if classifier is not None:
                dot = 0.0
                for i, mean, scale, w in classifier[0]:
                    dot += w * ((values[i] - mean) / scale)
                p = sigmoid(dot + classifier[1])
            out[j] = m.expected(p, reg + bias)
        self._memo = (values, out)
        return list(out)
