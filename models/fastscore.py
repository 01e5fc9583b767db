"""Scores of several models at once, from numpy dot products, cached per model state.

Every model is ``StandardScaler | linear model``: a propensity is ``sigmoid(b + sum_i w_i z_i)``
with ``z_i = (x_i - m_i) / v_i ** 0.5`` (0 while the variance ``v_i`` is 0), and a value model
combines two such sums (``models/value.py``). River computes each with two dict copies and
per-key lookups per call; here each sum is rewritten once per model state as ``a . x + c`` and a
call is one numpy dot per model (see :class:`FastScorer`).

The cache is keyed by the model objects and how many labels each has learnt, so a model that
learns in place (``propstream eval``) or is hot-swapped (the worker) is re-read on its next score.

>>> from models.online import OnlineModel
>>> m = OnlineModel()
>>> for i in range(50):
...     m.learn({"a": float(i % 7), "b": float(i % 3)}, int(i % 7 > 3))
>>> x = {"a": 5.0, "b": 1.0}
>>> abs(FastScorer().scores((m,), x)[0] - m.score(x)) < 1e-15
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from models.online import OnlineModel
from models.value import AnyModel, ValueModel


def sigmoid(z: float) -> float:
    """River's ``utils.math.sigmoid``, clipped the same way (exactly 0 or 1 beyond +-30)."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1 / (1 + math.exp(-z))


def _affine(model: OnlineModel | ValueModel, names: Sequence[str]) -> tuple[list[float], float]:
    """``w_i * (x_i - m_i) / s_i + b`` summed over ``names``, as ``sum(a_i * x_i) + c``: the row
    ``a`` and ``c`` (of a value model: its amount regression's).

    A term with no weight or no variance is 0 whatever the input (River scales an input of
    variance 0 to 0): its ``a_i`` is 0.
    """
    pipeline = model.severity if isinstance(model, ValueModel) else model.pipeline
    scaler, lr = pipeline.steps.values()
    row: list[float] = []
    shift = [float(lr.intercept)]
    for k in names:
        w, v = lr.weights.get(k, 0.0), scaler.vars.get(k, 0.0)
        a = w / v**0.5 if w and v else 0.0
        row.append(a)
        if a:
            shift.append(-a * scaler.means.get(k, 0.0))
    return row, math.fsum(shift)


class FastScorer:
    """Scores of several models on one input vector, one numpy dot product each.

    Every model here is ``StandardScaler | linear model``, so its raw output is affine in the
    input: ``sum_i w_i (x_i - m_i) / s_i + b = sum_i a_i x_i + c``. The rows ``a`` and constants
    ``c`` of every model (a value model gives two: its amount regression and its purchase
    classifier) are read once per model state into numpy rows, and a call is one ``a . x + c``
    per row: measured 7 us for four models of 90 inputs, against 29 us for the per-term Python
    loop this replaced (``docs/benchmarks.md``). The floats agree with River's to about 1e-15 relative, not
    bit for bit (the sum runs in another order); every score a worker or ``propstream eval``
    serves, announces or stores comes from here, so they agree with each other exactly.
    """

    def __init__(self) -> None:
        self._names: tuple[str, ...] = ()
        self._models: list[AnyModel] = []
        self._seen: list[int] = []  # labels each model had learnt when it was read
        self._every: list[tuple[np.ndarray, float]] = []  # per raw output: its row a and constant c
        # per model: the row of its raw output, the row of its hurdle classifier (-1: none), and
        # the value model that turns the two into an amount (None: a propensity, a sigmoid)
        self._rows: list[tuple[int, int, ValueModel | None]] = []
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
        every = [_affine(m, names) for m in models]
        self._rows = []
        for j, m in enumerate(models):
            classifier = -1
            if isinstance(m, ValueModel) and m.hurdle:
                classifier = len(every)
                every.append(_affine(m.classifier, names))
            self._rows.append((j, classifier, m if isinstance(m, ValueModel) else None))
        self._every = [(np.array(r, dtype=np.float64), c) for r, c in every]
        self._names, self._models = names, list(models)
        self._seen = [m.positives + m.negatives for m in models]
        self._memo = (None, [])

    def scores(self, models: Sequence[AnyModel], x: Mapping[str, float]) -> list[float]:
        """``[m.score(x) for m in models]`` (to about 1e-15 relative)."""
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
        x = np.array(values, dtype=np.float64)
        # one dot per row, not one matrix product: a product's summation order (the BLAS kernel)
        # depends on how many rows there are, and a score must not depend on the other targets
        z = [float(a.dot(x)) + c for a, c in self._every]
        out = []
        for j, classifier, value in self._rows:
            if value is None:
                out.append(sigmoid(z[j]))
            else:
                out.append(value.expected(sigmoid(z[classifier]) if classifier >= 0 else 1.0, z[j]))
        self._memo = (values, out)
        return list(out)
