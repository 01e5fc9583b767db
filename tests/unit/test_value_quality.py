"""Value-model quality figures against hand-worked examples, scikit-learn and brute-force definitions.

The brute forces share no code with the module: the Gini as a pairwise mid-rank sum, and the Gini and
top-decile capture averaged over every order of the tied rows (small inputs, all permutations).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from models.value_quality import decile_calibration, gini, mae, report, rmse, top_decile_capture


def pairwise_gini(pred: list[float], actual: list[float]) -> float:
    """Unnormalised Gini as sum_j a_j * midrank_j / (n T) - (n + 1) / (2n), ranks by pairwise counting."""
    n, total = len(pred), sum(actual)
    s = 0.0
    for j in range(n):
        below = sum(1 for k in range(n) if pred[k] < pred[j])
        tied = sum(1 for k in range(n) if k != j and pred[k] == pred[j])
        s += actual[j] * (1 + below + tied / 2)
    return s / (n * total) - (n + 1) / (2 * n)


def orders(pred: list[float]) -> list[tuple[int, ...]]:
    """Every row order that sorts ``pred`` descending (one per way of ordering the ties)."""
    return [
        o
        for o in itertools.permutations(range(len(pred)))
        if all(pred[a] >= pred[b] for a, b in itertools.pairwise(o))
    ]


def lorenz_gini(order: tuple[int, ...], actual: list[float]) -> float:
    """Mean gap between the cumulative share down ``order`` and the diagonal (rectangle rule)."""
    n, total, cum, gap = len(order), sum(actual), 0.0, 0.0
    for i, row in enumerate(order, start=1):
        cum += actual[row]
        gap += cum / total - i / n
    return gap / n


def capture_in_order(order: tuple[int, ...], actual: list[float]) -> float:
    cut = len(order) / 10
    whole = int(cut)
    earned = sum(actual[r] for r in order[:whole])
    if cut > whole:
        earned += (cut - whole) * actual[order[whole]]
    return earned / sum(actual)


# --- hand-worked -------------------------------------------------------------------------------


def test_mae_and_rmse_by_hand() -> None:
    assert mae([3.0, 0.0, 2.0], [1.0, 1.0, 2.0]) == pytest.approx(1.0)  # (2 + 1 + 0) / 3
    assert rmse([3.0, 0.0, 2.0], [1.0, 1.0, 2.0]) == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(mae([], [])) and math.isnan(rmse([], []))


def test_gini_by_hand() -> None:
    # By prediction: actual 4, 6, 0, 0 of 10 -> Lorenz 0.4, 1, 1, 1 (mean 0.85); perfect 6, 4 -> mean 0.9.
    # Less the diagonal's mean 5/8: 0.225 and 0.275.
    assert gini([5.0, 1.0, 0.0, 3.0], [4.0, 0.0, 0.0, 6.0]) == pytest.approx(0.225 / 0.275)
    # Ties: rows 1 and 2 tied at the top share their mean (5 each): Lorenz 0.5, 1, 1 (mean 5/6), perfect
    # 1, 1, 1 (mean 1); the diagonal's mean is 2/3: (1/6) / (1/3).
    assert gini([2.0, 2.0, 1.0], [10.0, 0.0, 0.0]) == pytest.approx(0.5)


def test_top_decile_capture_by_hand() -> None:
    actual = [float(i) for i in range(1, 21)]  # total 210
    pred = [float(i) for i in range(1, 21)]
    assert top_decile_capture(pred, actual) == pytest.approx((20 + 19) / 210)  # 2 of 20 rows
    # 15 rows: the cut is 1.5 rows, the top row and half of the next
    assert top_decile_capture(pred[:15], actual[:15]) == pytest.approx((15 + 7) / 120)
    # a tie group of 4 across the cut at 2 rows (n = 20): 2 of the 4 tied rows, half the group's revenue
    tied = [9.0] * 4 + [1.0] * 16
    values = [100.0, 0.0, 0.0, 0.0] + [1.0] * 16
    assert top_decile_capture(tied, values) == pytest.approx(50.0 / 116)


def test_decile_calibration_by_hand() -> None:
    pred = [float(i) for i in range(20)]
    actual = [2.0 * i for i in range(20)]
    table = decile_calibration(pred, actual)
    assert [d["decile"] for d in table] == list(range(1, 11)) and all(d["n"] == 2 for d in table)
    assert table[0] == {"decile": 1, "n": 2, "mean_predicted": 0.5, "mean_actual": 1.0}
    assert table[9] == {"decile": 10, "n": 2, "mean_predicted": 18.5, "mean_actual": 37.0}
    # a tie group stays in one decile: ranks 0..5 tied (average rank 2.5 -> decile 2), the rest alone
    table = decile_calibration([0.0] * 6 + [1.0, 2.0, 3.0, 4.0], [1.0] * 10)
    assert [(d["decile"], d["n"]) for d in table] == [(3, 6), (7, 1), (8, 1), (9, 1), (10, 1)]


def test_report_by_hand_and_empty() -> None:
    r = report([2.0, 0.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0])
    assert r["matured"] == 4 and r["positives"] == 2
    assert r["mean_actual"] == 1.0 and r["mean_predicted"] == 1.0 and r["calibration_ratio"] == 1.0
    assert r["mae"] == pytest.approx(0.5) and r["rmse"] == pytest.approx(math.sqrt(0.5))  # errors 1, 0, 1, 0
    assert r["gini"] == pytest.approx(gini([2.0, 0.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]))
    assert r["top_decile_capture"] == pytest.approx(0.4 * 3 / 4)  # 0.4 rows of the top row (3 of 4)
    assert sum(d["n"] for d in r["decile_calibration"]) == 4
    assert report([], []) == {"matured": 0}


def test_degenerate_inputs() -> None:
    assert math.isnan(gini([1.0, 2.0], [0.0, 0.0])) and math.isnan(top_decile_capture([1.0], [0.0]))
    assert math.isnan(gini([1.0, 2.0], [3.0, 3.0]))  # all equal: the perfect model has nothing to order
    assert math.isnan(report([1.0], [0.0])["calibration_ratio"])
    with pytest.raises(ValueError, match="one length"):
        mae([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        gini([math.nan, 1.0], [1.0, 2.0])


# --- against independent definitions ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_errors_match_scikit_learn(seed: int) -> None:
    rng = random.Random(seed)
    actual = [rng.expovariate(0.05) if rng.random() < 0.3 else 0.0 for _ in range(300)]
    pred = [rng.uniform(0, 40) for _ in actual]
    assert mae(pred, actual) == pytest.approx(skm.mean_absolute_error(actual, pred), rel=1e-12)
    assert rmse(pred, actual) == pytest.approx(skm.root_mean_squared_error(actual, pred), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_gini_matches_the_pairwise_rank_formula(seed: int) -> None:
    rng = random.Random(seed)
    actual = [round(rng.expovariate(0.1), 2) if rng.random() < 0.4 else 0.0 for _ in range(200)]
    pred = [float(round(a * rng.uniform(0.2, 2) + rng.uniform(0, 5))) for a in actual]  # many ties
    expected = pairwise_gini(pred, actual) / pairwise_gini(actual, actual)
    assert gini(pred, actual) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_ties_average_over_every_order_of_the_tied_rows(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([5, 6, 7])
    pred = [float(rng.randrange(3)) for _ in range(n)]
    actual = [float(rng.randrange(5)) for _ in range(n)]
    actual[0] += 1.0  # a non-zero total
    every = orders(pred)
    perfect = lorenz_gini(tuple(sorted(range(n), key=lambda r: -actual[r])), actual)
    if perfect:
        expected = sum(lorenz_gini(o, actual) for o in every) / len(every) / perfect
        assert gini(pred, actual) == pytest.approx(expected, abs=1e-12)
    cap = sum(capture_in_order(o, actual) for o in every) / len(every)
    assert top_decile_capture(pred, actual) == pytest.approx(cap, abs=1e-12)


def test_perfect_reversed_constant_and_random() -> None:
    rng = random.Random(3)
    actual = [rng.expovariate(0.02) for _ in range(1000)]
    assert gini(actual, actual) == pytest.approx(1.0)
    assert gini([2 * a + 7 for a in actual], actual) == pytest.approx(1.0)  # only the order counts
    assert gini([-a for a in actual], actual) == pytest.approx(-1.0)  # the reversed curve mirrors it
    assert gini([1.0] * 1000, actual) == pytest.approx(0.0, abs=1e-12)
    assert top_decile_capture([1.0] * 1000, actual) == pytest.approx(0.1)
    noise = [rng.random() for _ in actual]
    assert abs(gini(noise, actual)) < 0.1


def test_every_figure_is_independent_of_input_order() -> None:
    rng = random.Random(11)
    actual = [rng.choice([0.0, 0.0, 5.0, 20.0, 80.0]) for _ in range(97)]
    pred = [float(rng.randrange(6)) for _ in actual]  # heavy ties
    base = report(pred, actual)
    for _ in range(5):
        perm = list(range(len(pred)))
        rng.shuffle(perm)
        shuffled = report([pred[i] for i in perm], [actual[i] for i in perm])
        for key, value in base.items():
            if key == "decile_calibration":
                assert [d.keys() for d in shuffled[key]] == [d.keys() for d in value]
                for a, b in zip(shuffled[key], value, strict=True):
                    assert a == pytest.approx(b, rel=1e-12)
            else:
                assert shuffled[key] == pytest.approx(value, rel=1e-12), key


# --- properties ---------------------------------------------------------------------------------

rows = st.lists(
    st.tuples(st.integers(0, 8).map(float), st.floats(0, 1000, allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=60,
)


@given(rows)
def test_gini_is_bounded_and_capture_is_at_most_the_perfect_models(data: list[tuple[float, float]]) -> None:
    pred, actual = [p for p, _ in data], [a for _, a in data]
    g, cap = gini(pred, actual), top_decile_capture(pred, actual)
    if sum(actual) == 0:
        assert math.isnan(g) and math.isnan(cap)
        return
    assert math.isnan(g) or -1 - 1e-9 <= g <= 1 + 1e-9
    assert -1e-12 <= cap <= top_decile_capture(actual, actual) + 1e-9


@given(rows)
def test_figures_depend_only_on_the_order_of_predictions(data: list[tuple[float, float]]) -> None:
    pred, actual = [p for p, _ in data], [a for _, a in data]
    moved = [3 * p + 1 for p in pred]  # strictly increasing: same order, same ties
    for f in (gini, top_decile_capture):
        a, b = f(pred, actual), f(moved, actual)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)
    assert [(d["decile"], d["n"]) for d in decile_calibration(pred, actual)] == [
        (d["decile"], d["n"]) for d in decile_calibration(moved, actual)
    ]
