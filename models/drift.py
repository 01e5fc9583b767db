"""Drift as the population stability index (PSI) of a value against a reference window (pure).

PSI compares two histograms over the same fixed bins::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

where ``e_i`` and ``a_i`` are the shares of the reference ("expected") and current ("actual")
observations in bin ``i``. It is 0 for identical distributions and symmetric in its arguments;
the usual reading is below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 significant shift.
An empty bin would make the logarithm infinite, so shares are floored at ``EPSILON`` (the common
practice; the floor only matters for bins that are empty on one side).

:class:`DriftMonitor` keeps the reference histogram (the first ``reference_size`` values after
start, or a frozen one passed in) and a rolling window of the latest ``window_size`` values, in
bounded memory and O(1) work per observation, so the worker can call :meth:`DriftMonitor.observe`
on every score and read :meth:`DriftMonitor.psi` when it publishes metrics.

>>> m = DriftMonitor(uniform_edges(0.0, 1.0, 2), reference_size=4, window_size=4)
>>> for score in (0.1, 0.2, 0.7, 0.8):  # reference: half low, half high
...     m.observe(score)
>>> m.psi() is None  # nothing in the current window yet
True
>>> for score in (0.9, 0.1, 0.9, 0.9):  # current: a quarter low, three quarters high
...     m.observe(score)
>>> round(m.psi(), 6), round(0.25 * math.log(3), 6)
(0.274653, 0.274653)
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from itertools import pairwise

EPSILON = 1e-4


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """PSI of two histograms (counts or shares) over the same bins; each is normalised to shares.

    >>> round(psi([50, 50], [25, 75]), 6)  # = 0.25 * ln 3
    0.274653
    >>> psi([3, 1, 0], [3, 1, 0])
    0.0
    """
    if len(expected) != len(actual):
        msg = f"histograms have {len(expected)} and {len(actual)} bins"
        raise ValueError(msg)
    total_e, total_a = float(sum(expected)), float(sum(actual))
    if total_e <= 0 or total_a <= 0:
        msg = "both histograms need at least one observation"
        raise ValueError(msg)
    out = 0.0
    for n_e, n_a in zip(expected, actual, strict=True):
        e = max(n_e / total_e, epsilon)
        a = max(n_a / total_a, epsilon)
        out += (a - e) * math.log(a / e)
    return out


def uniform_edges(lo: float, hi: float, bins: int) -> list[float]:
    """The ``bins - 1`` inner edges splitting [lo, hi] into equal bins (values outside fall in the end bins).

    >>> uniform_edges(0.0, 1.0, 4)
    [0.25, 0.5, 0.75]
    """
    if bins < 2 or not hi > lo:
        msg = f"need at least 2 bins over a non-empty range, got {bins} over [{lo}, {hi}]"
        raise ValueError(msg)
    step = (hi - lo) / bins
    return [lo + step * i for i in range(1, bins)]


class DriftMonitor:
    """Reference histogram plus a rolling window of the latest values, over fixed bins.

    ``edges`` are the inner bin edges, ascending: ``len(edges) + 1`` bins, the first open to the
    left, the last open to the right; a value equal to an edge goes to the bin above it. NaN is
    ignored (a missing feature is not a shift of its distribution).
    """

    def __init__(
        self,
        edges: Sequence[float],
        reference_size: int = 10_000,
        window_size: int = 10_000,
        reference: Sequence[int] | None = None,
    ) -> None:
        if any(b <= a for a, b in pairwise(edges)):
            msg = "bin edges must be strictly ascending"
            raise ValueError(msg)
        if window_size < 1 or reference_size < 1:
            msg = "reference_size and window_size must be at least 1"
            raise ValueError(msg)
        self.edges = list(edges)
        self.bins = len(self.edges) + 1
        self.reference_size = reference_size
        self.reference = [0] * self.bins
        self.reference_count = 0
        if reference is not None:
            if len(reference) != self.bins or sum(reference) <= 0:
                msg = f"a frozen reference needs {self.bins} counts with a positive total"
                raise ValueError(msg)
            self.reference = list(reference)
            self.reference_count = sum(reference)
            self.reference_size = self.reference_count  # frozen: nothing more is added
        self.current = [0] * self.bins
        self._window: deque[int] = deque(maxlen=window_size)

    @property
    def reference_ready(self) -> bool:
        return self.reference_count >= self.reference_size

    @property
    def window_count(self) -> int:
        return len(self._window)

    def bin_of(self, value: float) -> int:
        return bisect_right(self.edges, value)

    def observe(self, value: float) -> None:
        """Add one value: to the reference until it is full, then to the rolling window."""
        if math.isnan(value):
            return
        i = bisect_right(self.edges, value)
        if not self.reference_ready:
            self.reference[i] += 1
            self.reference_count += 1
            return
        window = self._window
        if len(window) == window.maxlen:
            self.current[window[0]] -= 1  # the deque drops it on append
        window.append(i)
        self.current[i] += 1

    def psi(self) -> float | None:
        """PSI of the current window against the reference, or None until both hold data."""
        if not self.reference_ready or not self._window:
            return None
        return psi(self.reference, self.current)
