"""Quality of a value model on matured horizons: errors, normalised Gini, top-decile capture, calibration.

A value model predicts revenue (e.g. ``value:90d``), so a row is (predicted, actual revenue). Errors say
how far off the amounts are; the Gini and the top-decile capture say whether the model puts the right
users first, which is what a value audience is built on; the deciles say where it is calibrated.

Ties in ``pred`` are averaged: the rows of a tie group share the group's mean actual, as if averaged
over every order of the tied rows. So a figure never depends on input order, and a constant model
scores a Gini of exactly 0 and captures exactly 10% in the top decile.

>>> pred, actual = [5.0, 1.0, 0.0, 3.0], [4.0, 0.0, 0.0, 6.0]  # the top two in the wrong order
>>> round(gini(pred, actual), 6)  # Lorenz means 0.85 and perfect 0.9, less 5/8: 0.225 / 0.275
0.818182
>>> gini(actual, actual), gini([1.0] * 4, actual)  # the perfect model; a constant one
(1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DECILES = 10
Values = Sequence[float] | np.ndarray


def _arrays(pred: Values, actual: Values) -> tuple[np.ndarray, np.ndarray]:
    p, a = np.asarray(pred, dtype=float), np.asarray(actual, dtype=float)
    if p.shape != a.shape or p.ndim != 1:
        msg = f"pred and actual must be flat and of one length, not {p.shape} and {a.shape}"
        raise ValueError(msg)
    if not (np.isfinite(p).all() and np.isfinite(a).all()):
        msg = "pred and actual must be finite (a NaN has no rank)"
        raise ValueError(msg)
    return p, a


def mae(pred: Values, actual: Values) -> float:
    """Mean absolute error (NaN for no rows).

    >>> mae([1.0, 2.0], [0.0, 4.0])
    1.5
    """
    p, a = _arrays(pred, actual)
    return float(np.abs(p - a).mean()) if len(p) else math.nan


def rmse(pred: Values, actual: Values) -> float:
    """Root mean squared error (NaN for no rows).

    >>> rmse([1.0, 2.0], [0.0, 4.0])  # sqrt((1 + 4) / 2)
    1.5811388300841898
    """
    p, a = _arrays(pred, actual)
    return float(math.sqrt(((p - a) ** 2).mean())) if len(p) else math.nan


def _lorenz(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Cumulative share of the actual total down the rows by ``p`` descending, ties averaged.

    ``out[i]`` is the share earned by the first ``i`` rows (``out[0] = 0``, ``out[n] = 1``).
    """
    order = np.argsort(-p, kind="stable")
    ps, a_sorted = p[order], a[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    sizes = np.diff(np.r_[starts, len(ps)])
    means = np.add.reduceat(a_sorted, starts) / sizes
    return np.r_[0.0, np.cumsum(np.repeat(means, sizes))] / a.sum()


def gini(pred: Values, actual: Values) -> float:
    """Normalised Gini: the model's Gini over the perfect model's (1 perfect, ~0 random, < 0 reversed).

    A model's Gini is the mean gap between its Lorenz curve (share of actual revenue earned by the top
    ``i`` rows by prediction) and the diagonal ``i/n``, i.e. the area between them. NaN when actual
    sums to 0 or the perfect model has a Gini of 0 (all actual equal: there is no order to find).
    """
    p, a = _arrays(pred, actual)
    if not len(a) or a.sum() == 0:
        return math.nan
    diagonal = np.arange(1, len(a) + 1) / len(a)
    perfect = float((_lorenz(a, a)[1:] - diagonal).mean())
    if perfect == 0:
        return math.nan
    return float((_lorenz(p, a)[1:] - diagonal).mean()) / perfect


def top_decile_capture(pred: Values, actual: Values) -> float:
    """Share of the actual total earned by the top 10% of rows by prediction (NaN when it sums to 0).

    The cut is at ``n/10`` rows, read off the Lorenz curve by linear interpolation: a fractional row,
    and a tie group across the cut, contribute that fraction of their (averaged) revenue.

    >>> top_decile_capture([9.0] + [0.0] * 9, [5.0] + [1.0] * 9)  # the top row: 5 of 14
    0.35714285714285715
    """
    p, a = _arrays(pred, actual)
    if not len(a) or a.sum() == 0:
        return math.nan
    curve = _lorenz(p, a)
    return float(np.interp(len(a) / DECILES, np.arange(len(curve)), curve))


def decile_calibration(pred: Values, actual: Values) -> list[dict[str, Any]]:
    """Mean predicted and mean actual in 10 bins by rank of prediction (decile 10: highest predicted).

    A row's bin comes from its average rank, so a tie group stays in one bin; bins left empty (fewer
    than 10 rows, or a tie group spanning a boundary) are left out.

    >>> [(d["decile"], d["n"], d["mean_actual"]) for d in decile_calibration([1.0, 2.0], [0.0, 3.0])]
    [(1, 1, 0.0), (6, 1, 3.0)]
    """
    p, a = _arrays(pred, actual)
    n = len(p)
    if not n:
        return []
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    sizes = np.diff(np.r_[starts, n])
    position = np.empty(n)
    position[order] = np.repeat(starts + (sizes - 1) / 2, sizes)  # average 0-based rank
    decile = np.minimum((position * DECILES / n).astype(int), DECILES - 1)
    out = []
    for d in range(DECILES):
        members = decile == d
        if members.any():
            out.append(
                {
                    "decile": d + 1,
                    "n": int(members.sum()),
                    "mean_predicted": float(p[members].mean()),
                    "mean_actual": float(a[members].mean()),
                }
            )
    return out


def report(pred: Values, actual: Values) -> dict[str, Any]:
    """Every figure above for one set of matured rows; ``{"matured": 0}`` for none."""
    p, a = _arrays(pred, actual)
    if not len(p):
        return {"matured": 0}
    total = float(a.sum())
    return {
        "matured": len(p),
        "positives": int((a > 0).sum()),
        "mean_actual": float(a.mean()),
        "mean_predicted": float(p.mean()),
        "mae": mae(p, a),
        "rmse": rmse(p, a),
        "gini": gini(p, a),
        "top_decile_capture": top_decile_capture(p, a),
        "decile_calibration": decile_calibration(p, a),
        "calibration_ratio": float(p.sum()) / total if total else math.nan,
    }
