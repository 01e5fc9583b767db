"""models.drift: PSI against hand-worked values, and the rolling window against a brute-force recount."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.drift import EPSILON, DriftMonitor, psi, uniform_edges


def test_psi_hand_computed() -> None:
    # shares .5/.5 against .25/.75: (.25-.5) ln(.25/.5) + (.75-.5) ln(.75/.5) = .25 ln 2 + .25 ln 1.5 = .25 ln 3
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(3), rel=1e-12)
    # Three bins, .2/.3/.5 against .3/.3/.4: .1 ln 1.5 + 0 + (-.1) ln .8
    assert psi([2, 3, 5], [30, 30, 40]) == pytest.approx(0.1 * math.log(1.5) - 0.1 * math.log(0.8), rel=1e-12)
    assert psi([0.2, 0.3, 0.5], [3, 3, 4]) == pytest.approx(0.06286087, abs=1e-8)  # shares work too


def test_psi_empty_bin_uses_the_floor() -> None:
    # All reference mass in bin 0; current split evenly. Bin 1's reference share is floored at 1e-4:
    # (.5 - 1) ln(.5 / 1) + (.5 - 1e-4) ln(.5 / 1e-4)
    want = -0.5 * math.log(0.5) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert EPSILON == 1e-4
    assert psi([100, 0], [50, 50]) == pytest.approx(want, rel=1e-12)
    assert psi([100, 0], [50, 50]) == pytest.approx(4.6043185, abs=1e-6)


def test_psi_identical_is_zero_and_symmetric() -> None:
    assert psi([1, 2, 3, 0], [10, 20, 30, 0]) == 0.0
    assert psi([5, 1, 9], [2, 7, 3]) == pytest.approx(psi([2, 7, 3], [5, 1, 9]), rel=1e-12)


def test_psi_rejects_mismatched_or_empty_histograms() -> None:
    with pytest.raises(ValueError, match="bins"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="observation"):
        psi([0, 0], [1, 2])


def test_uniform_edges_and_binning() -> None:
    edges = uniform_edges(0.0, 1.0, 10)
    assert edges == pytest.approx([0.1 * i for i in range(1, 10)])
    m = DriftMonitor(edges)
    assert m.bins == 10
    # Values on an edge go to the bin above; outside the range to the end bins.
    assert [m.bin_of(v) for v in (-1.0, 0.0, 0.05, 0.5, 0.999, 1.0, 7.0)] == [0, 0, 0, 5, 9, 9, 9]
    with pytest.raises(ValueError):
        uniform_edges(1.0, 1.0, 4)
    with pytest.raises(ValueError):
        DriftMonitor([0.5, 0.5])


def test_reference_then_rolling_window() -> None:
    m = DriftMonitor([0.5], reference_size=4, window_size=4)
    for v in (0.1, 0.2, 0.7, 0.8):
        m.observe(v)
    assert m.reference == [2, 2] and m.reference_ready
    assert m.psi() is None
    for v in (0.9, 0.9, 0.9, 0.9):
        m.observe(v)
    assert m.current == [0, 4]
    # .5/.5 against 1e-4/1: (1e-4 - .5) ln(1e-4/.5) + (1 - .5) ln(1/.5)
    assert m.psi() == pytest.approx((1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2), rel=1e-12)
    for v in (0.1, 0.9):  # evicts two of the 0.9s
        m.observe(v)
    assert m.current == [1, 3] and m.window_count == 4
    assert m.psi() == pytest.approx(0.25 * math.log(3), rel=1e-12)
    for v in (0.3, 0.1, 0.6, 0.7):  # the window now matches the reference exactly
        m.observe(v)
    assert m.psi() == pytest.approx(0.0, abs=1e-15)
    assert m.reference == [2, 2]  # the reference never moved


def test_frozen_reference_and_nan() -> None:
    m = DriftMonitor([0.5], window_size=2, reference=[3, 1])
    assert m.reference_ready
    m.observe(float("nan"))
    assert m.window_count == 0
    m.observe(0.7)
    m.observe(0.2)
    # .75/.25 against .5/.5
    assert m.psi() == pytest.approx(-0.25 * math.log(0.5 / 0.75) + 0.25 * math.log(0.5 / 0.25), rel=1e-12)
    with pytest.raises(ValueError):
        DriftMonitor([0.5], reference=[1, 2, 3])


def brute_psi(ref_values: list[float], cur_values: list[float], edges: list[float]) -> float:
    """Independent recount: bin by linear scan, shares, floor, sum."""

    def hist(values: list[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in values:
            counts[sum(1 for e in edges if v >= e)] += 1
        return [max(c / len(values), 1e-4) for c in counts]

    e, a = hist(ref_values), hist(cur_values)
    return sum((ai - ei) * math.log(ai / ei) for ei, ai in zip(e, a))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=300),
    reference_size=st.integers(1, 50),
    window_size=st.integers(1, 60),
    bins=st.integers(2, 12),
)
def test_window_equals_brute_force_recount(
    values: list[float], reference_size: int, window_size: int, bins: int
) -> None:
    edges = uniform_edges(0.0, 1.0, bins)
    m = DriftMonitor(edges, reference_size=reference_size, window_size=window_size)
    for v in values:
        m.observe(v)
    ref, rest = values[:reference_size], values[reference_size:]
    current = rest[-window_size:]
    assert m.window_count == len(current) <= window_size
    if not rest:
        assert m.psi() is None
    else:
        assert m.psi() == pytest.approx(brute_psi(ref, current, edges), rel=1e-9, abs=1e-12)


def test_module_doctests() -> None:
    # models/ is not in pytest's testpaths, so run the module's examples here.
    import doctest

    import models.drift

    result = doctest.testmod(models.drift)
    assert result.attempted >= 5 and result.failed == 0
