"""River's ``predict_proba_one`` for several models at once, bit for bit, cached per model state.

The model is ``StandardScaler | LogisticRegression``: ``p = sigmoid(b + sum_i w_i z_i)`` with
``z_i = (x_i - m_i) / v_i ** 0.5`` (0 while the variance ``v_i`` is 0). River computes it with two
dict copies and per-key lookups per call; here the scaler's and the weights' numbers are read once
per model state into arrays, and a call is a handful of vector operations over all targets. The
sum runs in the input's key order, sequentially (``cumsum``), as River's ``VectorDict.dot`` does, so
the score is the same float, not merely a close one (``tests/unit/test_fastscore.py``).

The cache is keyed by the model objects and how many labels each has learnt, so a model that
learns in place (``propstream eval``) or is hot-swapped (the worker) is re-read on its next score.

>>> from models.online import OnlineModel
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

import numpy as np

from models.online import OnlineModel


def sigmoid(z: float) -> float:
    """River's ``utils.math.sigmoid``, clipped the same way (exactly 0 or 1 beyond +-30)."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1 / (1 + math.exp(-z))


def arrays(model: OnlineModel, names: Sequence[str]) -> tuple[list[float], list[float], list[float], float]:
    """Per input in ``names`` order: scaler mean, scale (``inf`` while variance is 0), weight; intercept."""
    scaler, lr = model.pipeline.steps.values()
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


class FastScorer:
    """Scores of several models on one input dict."""

    def __init__(self) -> None:
        self._key: tuple[tuple[str, ...], tuple[tuple[OnlineModel, int], ...]] = ((), ())
        self._m = self._s = self._w = np.zeros((0, 0))
        self._b: list[float] = []
        # the last answer: the scoring core asks twice for one input vector (snapshot, then rescore)
        self._memo: tuple[object, object, list[float]] = (None, None, [])

    def _load(self, models: Sequence[OnlineModel], names: tuple[str, ...]) -> None:
        # the model object itself is in the key (not its id): a freed model's id may be reused
        key = (names, tuple((m, m.positives + m.negatives) for m in models))
        old_names, old = self._key
        if (
            names == old_names
            and len(key[1]) == len(old)
            and all(m is k and n == kn for (m, n), (k, kn) in zip(key[1], old, strict=True))
        ):
            return
        rows = [arrays(m, names) for m in models]
        shape = (len(models), len(names))
        self._m = np.array([r[0] for r in rows], dtype=float).reshape(shape)
        self._s = np.array([r[1] for r in rows], dtype=float).reshape(shape)
        self._w = np.array([r[2] for r in rows], dtype=float).reshape(shape)
        self._b = [r[3] for r in rows]
        self._key = key

    def scores(self, models: Sequence[OnlineModel], x: Mapping[str, float]) -> list[float]:
        """``[m.score(x) for m in models]``, the same floats."""
        return self.scores_of(models, tuple(x), list(x.values()))

    def scores_of(
        self, models: Sequence[OnlineModel], names: tuple[str, ...], values: Sequence[float]
    ) -> list[float]:
        """:meth:`scores` of the input whose keys are ``names`` and values ``values``, in that order
        (the scoring core passes its cached input vector: no dict walk per call)."""
        if not models:
            return []
        self._load(models, names)
        key, seen, out = self._memo
        if seen is values and key is self._key:  # the same vector object (held here) and models
            return list(out)
        xv = np.array(values, dtype=float)
        terms = self._w * ((xv - self._m) / self._s)
        dots = np.cumsum(terms, axis=1)[:, -1].tolist() if len(values) else [0.0] * len(models)
        out = [sigmoid(d + b) for d, b in zip(dots, self._b, strict=True)]
        self._memo = (self._key, values, out)
        return list(out)
