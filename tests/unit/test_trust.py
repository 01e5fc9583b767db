"""The trust gate: Hanley-McNeil against the published example, hand-worked values and a simulation."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from models.evaluate import EvalRun, run
from models.ledger import make_target
from models.online import ModelConfig, OnlineModel
from models.persist import dump, snapshot_of
from models.quality import report, roc_auc
from models.scoring import TargetModel, input_names
from models.training import Example, Trainer, decode_trainer_state, inputs_hash
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
from streams.faults import Faults
from streams.metrics import Metrics
from streams.model_feed import LiveModels
from streams.model_metrics import ModelMetrics
from streams.settings import Settings
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


@dataclass(frozen=True)
class CountingGate(TrustGate):
    """The default gate, counting its verdicts: with ``judge_every=1`` eval judges once at the start
    and once per matured label, so the count tells how many labels were learnt at any moment."""

    calls: list[int] = field(default_factory=list)

    def judge(self, quality: Mapping[str, float], *, value: bool = False) -> Verdict:
        self.calls.append(1)
        return super().judge(quality, value=value)


def eval_run(gate: TrustGate | None, seen: dict[float, int] | None = None) -> EvalRun:
    def oracle(user: str, ts_ms: int) -> float:
        """Called as each snapshot is sampled: tag it, and note how many labels were learnt then."""
        assert seen is not None and isinstance(gate, CountingGate)
        tag = float(len(seen))
        seen[tag] = len(gate.calls) - 1
        return tag

    return run(
        simulate(SimConfig(users=120, days=16, seed=4, start_ms=1_700_000_000_000)),
        make_target("purchase", H_MS // 1000),
        min_positives=20,
        min_negatives=20,
        trust=gate,
        quality_window=300,
        judge_every=1,
        oracle=oracle if seen is not None else None,
    )


@pytest.fixture(scope="module")
def by_counts() -> EvalRun:
    return eval_run(None)


def test_eval_marks_warm_exactly_the_snapshots_scored_while_counts_and_gate_passed(
    by_counts: EvalRun,
) -> None:
    gate = CountingGate()
    seen: dict[float, int] = {}
    o = eval_run(gate, seen).outcomes
    # Reference: a snapshot scored when k labels had been learnt was scored by a model that had
    # learnt the first k outcomes (eval learns each as it matures), with the last 300 of them as its
    # quality window. The gate itself is checked by hand above.
    verdicts: dict[int, bool] = {}
    expected = []
    for x in o:
        assert x.oracle is not None
        k = seen[x.oracle]
        if k not in verdicts:
            ys = [y.label for y in o[:k]]
            counts_ok = sum(ys) >= 20 and len(ys) - sum(ys) >= 20
            window = [(y.score, y.label) for y in o[max(0, k - 300) : k]]
            verdicts[k] = counts_ok and TrustGate().judge(figures(window)).trusted
        expected.append(verdicts[k])
    assert [x.warm for x in o] == expected
    assert [x.score for x in by_counts.outcomes] == [x.score for x in o]  # the gate changes only the marks
    warm_gate, warm_counts = sum(expected), sum(x.warm for x in by_counts.outcomes)
    assert 0 < warm_gate < warm_counts  # the gate holds some back here, and lets some through


def test_eval_with_the_gate_off_is_eval_by_counts(by_counts: EvalRun) -> None:
    off = eval_run(TrustGate(min_auc_lower=0, max_ece=1)).outcomes
    assert [x.warm for x in off] == [x.warm for x in by_counts.outcomes]


# --- the trainer publishes when the verdict flips; workers judge each version alike ----------------


def served(i: int, label: int, score: float) -> Example:
    x = [float((i * 7 + j) % 5) for j in range(len(input_names()))]
    return Example("purchase", 1_000 * i, x, label, score, 1, inputs_hash())


def test_the_trainer_publishes_as_soon_as_the_verdict_flips_either_way_and_workers_agree(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = TrustGate(min_auc_lower=0, max_ece=0.105)  # ECE only, so the flips can be worked by hand
    tr = Trainer(
        "purchase",
        config=ModelConfig(),
        min_positives=5,
        min_negatives=0,
        publish_every=10**9,
        publish_interval_ms=10**12,
        window=100,
        trust=gate,
    )
    settings = Settings(
        targets="purchase:7d", min_positives=5, min_negatives=0, trust_min_auc_lower=0, trust_max_ece=0.105
    )
    live = LiveModels(settings, lambda *_: None, Faults(Metrics()))
    offset = 0

    def feed(n: int, right: bool) -> list[int]:
        """``n`` examples with labels 0, 1, 0, ... scored 0 or 1, rightly or wrongly; where it was due."""
        nonlocal offset
        due_at = []
        for k in range(1, n + 1):
            label = offset % 2
            assert tr.handle(offset, served(offset, label, float(label if right else 1 - label))) == "learnt"
            offset += 1
            if tr.due(0):
                due_at.append(k)
                assert live.apply(dump(tr.publish(0)))
                assert live.models["purchase"].warming_up is not tr.warm
        return due_at

    # scores of 0 and 1 that are right have ECE 0: trusted once 5 positives are learnt (the 10th label)
    with caplog.at_level(logging.INFO, logger="streams.model_feed"):
        assert feed(100, right=True) == [10]
        assert not live.models["purchase"].warming_up
        # each wrong score adds 1/100 to the ECE of the full window: 0.11 > 0.105 at the 11th
        assert feed(30, right=False) == [11]
        assert live.models["purchase"].trust.reason == "ece 0.110 > 0.105"
        # right scores again: the window holds only 10 wrong ones once 90 more came after them
        assert feed(100, right=True) == [90]
    flips = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert flips == [
        ("INFO", "purchase model version 1 trusted: ece 0.000 <= 0.105"),
        ("WARNING", "purchase model version 2 not trusted, warming up again: ece 0.110 > 0.105"),
        ("INFO", "purchase model version 3 trusted: ece 0.100 <= 0.105"),
    ]
    # a trainer restored from its state knows what it published: no second publish for the same verdict
    again = Trainer(
        "purchase",
        config=ModelConfig(),
        min_positives=5,
        min_negatives=0,
        publish_every=10**9,
        publish_interval_ms=10**12,
        window=100,
        trust=gate,
        state=decode_trainer_state(msgspec.msgpack.encode(tr.state())),
    )
    again.handle(offset, served(offset, offset % 2, float(offset % 2)))
    assert again.warm and not again.due(0)


def snapshot(version: int, q: dict[str, float], positives: int = 0) -> bytes:
    m = OnlineModel()
    m.positives = positives
    return dump(snapshot_of(m, target="purchase", version=version, created_ms=0, quality=q))


def test_workers_judge_each_version_by_its_published_quality_and_export_the_verdict() -> None:
    registry = CollectorRegistry()
    metrics = ModelMetrics(registry)
    settings = Settings(targets="purchase:7d", min_positives=200, min_negatives=0)
    live = LiveModels(
        settings, lambda name, m, snap: metrics.record_model(name, m, snap.quality), Faults(Metrics())
    )

    def gauge(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"target": "purchase", **labels})

    first = live.models["purchase"]
    assert first.warming_up
    assert first.trust.reason == (
        "learnt 0 of 200 positives; no roc_auc yet (0 positives, 0 negatives matured); "
        "no ece yet (no matured label)"
    )
    live.apply(snapshot(1, quality(0.8, 50, 50, 0.05), positives=150))  # good quality, too few labels
    assert live.models["purchase"].trust.failing == ("labels",)
    assert (gauge("propstream_model_trusted"), gauge("propstream_model_warming_up")) == (0, 1)
    assert gauge("propstream_model_trust_failing", check="labels") == 1
    assert gauge("propstream_model_trust_failing", check="roc_auc") == 0
    live.apply(snapshot(2, quality(0.65, 50, 50, 0.05), positives=250))  # enough labels, weak ranking
    m = live.models["purchase"]
    assert m.warming_up and m.trust.as_dict() == {
        "trusted": False,
        "reason": "roc_auc lower bound 0.560 < 0.6 (roc_auc 0.650 on 50 positives, 50 negatives)",
    }
    assert gauge("propstream_model_trusted") == 0
    assert gauge("propstream_model_trust_failing", check="labels") == 0
    assert gauge("propstream_model_trust_failing", check="roc_auc") == 1
    live.apply(snapshot(3, quality(0.65, 1000, 1000, 0.05), positives=300))  # the same area, surer
    assert not live.models["purchase"].warming_up
    assert (gauge("propstream_model_trusted"), gauge("propstream_model_warming_up")) == (1, 0)
    assert gauge("propstream_model_trust_failing", check="roc_auc") == 0


def test_the_gate_switched_off_trusts_by_counts_alone() -> None:
    settings = Settings(
        targets="purchase:7d", min_positives=0, min_negatives=0, trust_min_auc_lower=0, trust_max_ece=1
    )
    live = LiveModels(settings, lambda *_: None, Faults(Metrics()))
    assert not live.models["purchase"].warming_up
    assert live.models["purchase"].trust.reason == "quality gate off"
    with pytest.raises(ValueError, match="trust_max_ece"):
        Settings(trust_max_ece=0)
