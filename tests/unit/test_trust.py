"""The trust gate: Hanley-McNeil against the published example, hand-worked values and a simulation."""

from __future__ import annotations

import bisect
import math
import random

import pytest

from models.evaluate import EvalRun, run
from models.ledger import make_target
from models.online import OnlineModel
from models.quality import report, roc_auc
from models.scoring import TargetModel
from models.trust import (
    NO_GATE,
    TrustGate,
    Verdict,
    auc_lower_bound,
    auc_standard_error,
    combine,
    figures,
    labels,
)
from traffic.simulator import SimConfig, simulate


def test_standard_error_of_the_published_example() -> None:
    # Hanley & McNeil (1982), Radiology 143:29-36: CT images of 51 abnormal and 58 normal patients,
    # area 0.893, standard error reported as 0.032 (three places)
    assert auc_standard_error(0.893, 51, 58) == pytest.approx(0.032, abs=1e-3)


def test_standard_error_and_lower_bound_hand_worked() -> None:
    # A = 0.8, 50 positives, 50 negatives: Q1 = 0.8 / 1.2 = 0.666667, Q2 = 2 * 0.64 / 1.8 = 0.711111
    # var = (0.16 + 49 * (0.666667 - 0.64) + 49 * (0.711111 - 0.64)) / 2500 = 4.951111 / 2500
    se = math.sqrt(4.951111 / 2500)
    assert se == pytest.approx(0.044502, abs=1e-6)
    assert auc_standard_error(0.8, 50, 50) == pytest.approx(se, rel=1e-6)
    assert auc_lower_bound(0.8, 50, 50) == pytest.approx(0.8 - 1.645 * se, rel=1e-6)  # 0.726794
    # A = 0.65 on 50 / 50: Q1 = 0.481481, Q2 = 0.512121; var = 7.508965 / 2500
    assert auc_lower_bound(0.65, 50, 50) == pytest.approx(0.65 - 1.645 * math.sqrt(7.508965 / 2500), rel=1e-6)
    # a perfect ranking has no spread (Q1 = Q2 = 1): the bound is the area itself
    assert auc_lower_bound(1.0, 10, 10) == pytest.approx(1.0)
    assert math.isnan(auc_standard_error(0.7, 0, 10))


def test_standard_error_matches_the_spread_of_simulated_areas() -> None:
    # Hanley-McNeil's Q1 = A/(2-A), Q2 = 2A^2/(1+A) are exact for exponential score distributions:
    # positives ~ Exp(rate 1/3), negatives ~ Exp(1) give A = P(pos > neg) = 1 / (1 + 1/3) = 0.75, so
    # the standard deviation of the area over many samples is the formula's standard error.
    rng = random.Random(7)
    n_pos, n_neg = 30, 60
    areas = []
    for _ in range(3000):
        pos = [rng.expovariate(1 / 3) for _ in range(n_pos)]
        neg = [rng.expovariate(1.0) for _ in range(n_neg)]
        areas.append(roc_auc(pos + neg, [1] * n_pos + [0] * n_neg))
    mean = sum(areas) / len(areas)
    sd = math.sqrt(sum((a - mean) ** 2 for a in areas) / (len(areas) - 1))
    assert mean == pytest.approx(0.75, abs=0.005)
    assert sd == pytest.approx(auc_standard_error(0.75, n_pos, n_neg), rel=0.05)  # MC error about 1.3%


def quality(auc: float, positives: int, negatives: int, ece: float) -> dict[str, float]:
    return {"matured": positives + negatives, "positives": positives, "roc_auc": auc, "ece": ece}


def test_the_gate_judges_the_lower_bound_not_the_area() -> None:
    gate = TrustGate()  # 0.6 and 0.1
    good = gate.judge(quality(0.8, 50, 50, 0.05))
    assert good == Verdict((), "roc_auc lower bound 0.727 >= 0.6, ece 0.050 <= 0.1")
    assert good.trusted
    # the same area of 0.65: too uncertain on 100 labels (bound 0.560), enough on 2,000 (bound 0.630)
    weak = gate.judge(quality(0.65, 50, 50, 0.05))
    assert not weak.trusted and weak.failing == ("roc_auc",)
    assert weak.reason == "roc_auc lower bound 0.560 < 0.6 (roc_auc 0.650 on 50 positives, 50 negatives)"
    assert gate.judge(quality(0.65, 1000, 1000, 0.05)).trusted


def test_the_gate_refuses_poor_calibration_and_missing_figures() -> None:
    gate = TrustGate(min_auc_lower=0.6, max_ece=0.1)
    v = gate.judge(quality(0.8, 50, 50, 0.14))
    assert (v.trusted, v.failing, v.reason) == (False, ("ece",), "ece 0.140 > 0.1")
    both = gate.judge(quality(0.5, 50, 50, 0.3))
    assert both.failing == ("roc_auc", "ece")
    assert both.reason.startswith("roc_auc lower bound 0.405 < 0.6")
    assert both.reason.endswith("; ece 0.300 > 0.1")
    empty = gate.judge({})
    assert empty.failing == ("roc_auc", "ece")
    assert empty.reason == "no roc_auc yet (0 positives, 0 negatives matured); no ece yet (no matured label)"
    one_class = gate.judge({"matured": 40, "positives": 0, "roc_auc": math.nan, "ece": 0.02})
    assert one_class.failing == ("roc_auc",)
    assert one_class.reason == "no roc_auc yet (0 positives, 40 negatives matured)"


def test_a_bound_at_its_end_switches_its_check_off() -> None:
    off = TrustGate(min_auc_lower=0, max_ece=1)
    assert off.judge({}) == Verdict((), "quality gate off")
    auc_only = TrustGate(min_auc_lower=0.6, max_ece=1)
    assert auc_only.judge(quality(0.8, 50, 50, 0.9)).trusted
    assert auc_only.judge(quality(0.8, 50, 50, 0.9)).reason == "roc_auc lower bound 0.727 >= 0.6"
    ece_only = TrustGate(min_auc_lower=0, max_ece=0.1)
    assert ece_only.judge(quality(0.5, 5, 5, 0.05)).trusted
    assert not ece_only.judge(quality(0.99, 500, 500, 0.2)).trusted


def test_labels_and_gate_together() -> None:
    assert labels(120, 300, 200, 200) == Verdict(("labels",), "learnt 120 of 200 positives")
    assert labels(120, 30, 200, 200).reason == "learnt 120 of 200 positives, 30 of 200 negatives"
    assert labels(200, 200, 200, 200).trusted
    gate = TrustGate().judge(quality(0.65, 50, 50, 0.05))
    v = combine(labels(120, 300, 200, 200), gate)
    assert v.failing == ("labels", "roc_auc")
    assert v.reason == "learnt 120 of 200 positives; " + gate.reason
    ok = TrustGate().judge(quality(0.8, 50, 50, 0.05))
    assert combine(labels(200, 200, 200, 200), ok) == ok
    assert Verdict(("ece",), "ece 0.140 > 0.1").as_dict() == {"trusted": False, "reason": "ece 0.140 > 0.1"}


def model_with(positives: int, negatives: int) -> OnlineModel:
    m = OnlineModel()
    m.positives, m.negatives = positives, negatives
    return m


def test_target_model_is_warming_up_until_counts_and_gate_both_pass() -> None:
    poor = TrustGate().judge(quality(0.65, 50, 50, 0.05))
    good = TrustGate().judge(quality(0.8, 50, 50, 0.05))
    assert TargetModel(model_with(10, 10), 1, 0, 0).verdict is NO_GATE  # no gate given: counts only
    assert not TargetModel(model_with(10, 10), 1, 0, 0).warming_up
    assert TargetModel(model_with(10, 10), 1, 0, 0, poor).warming_up  # counts met, quality not
    assert TargetModel(model_with(10, 10), 1, 20, 0, good).warming_up  # quality met, counts not
    trusted = TargetModel(model_with(20, 10), 1, 20, 0, good)
    assert not trusted.warming_up and trusted.trust == good
    assert TargetModel(model_with(10, 10), 1, 20, 0, poor).trust.reason == (
        "learnt 10 of 20 positives; " + poor.reason
    )


def test_figures_are_the_report_s_own() -> None:
    rng = random.Random(3)
    window = [(round(rng.random(), 2), int(rng.random() < 0.3)) for _ in range(400)]
    full = report([s for s, _ in window], [y for _, y in window])
    assert figures(window) == {k: full[k] for k in ("matured", "positives", "roc_auc", "ece")}


# --- propstream eval applies the gate as the workers do ---------------------------------------------

H_MS = 2 * 86_400_000


@pytest.fixture(scope="module")
def sim_events() -> list[dict[str, object]]:
    return list(simulate(SimConfig(users=300, days=24, seed=4, start_ms=1_700_000_000_000)))


def eval_run(events: list[dict[str, object]], gate: TrustGate | None) -> EvalRun:
    return run(
        events,
        make_target("purchase", H_MS // 1000),
        min_positives=20,
        min_negatives=20,
        trust=gate,
        quality_window=300,
        judge_every=1,
    )


def test_eval_marks_warm_exactly_the_snapshots_scored_while_counts_and_gate_passed(
    sim_events: list[dict[str, object]],
) -> None:
    gate = TrustGate()
    result = eval_run(sim_events, gate)
    o = result.outcomes
    # Reference: a snapshot taken at t was scored after every snapshot whose horizon ended before t
    # was learnt (eval matures in horizon order), so the model had learnt exactly that prefix of the
    # outcomes and its quality window was the last 300 of them. The gate itself is checked above.
    ends = [x.ts_ms + H_MS for x in o]
    assert ends == sorted(ends)
    expected = []
    verdicts: dict[int, bool] = {}
    for x in o:
        k = bisect.bisect_left(ends, x.ts_ms)  # outcomes with end < t
        if k not in verdicts:
            ys = [y.label for y in o[:k]]
            counts_ok = sum(ys) >= 20 and len(ys) - sum(ys) >= 20
            window = [(y.score, y.label) for y in o[max(0, k - 300) : k]]
            verdicts[k] = counts_ok and gate.judge(figures(window)).trusted
        expected.append(verdicts[k])
    assert [x.warm for x in o] == expected
    by_counts = eval_run(sim_events, None).outcomes
    assert [x.score for x in by_counts] == [x.score for x in o]  # the gate changes what is marked only
    warm_gate, warm_counts = sum(expected), sum(x.warm for x in by_counts)
    assert 0 < warm_gate < warm_counts  # the gate holds some back here, and lets some through


def test_eval_with_the_gate_off_is_eval_by_counts(sim_events: list[dict[str, object]]) -> None:
    off = eval_run(sim_events, TrustGate(min_auc_lower=0, max_ece=1)).outcomes
    assert [x.warm for x in off] == [x.warm for x in eval_run(sim_events, None).outcomes]
