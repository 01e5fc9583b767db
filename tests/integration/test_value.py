"""The value target on the real broker: value-tier changes and purchase changes with expected_value,
validated against the published schema, the lookup's value entry, and the score export's columns.

The expected figures are worked out here from a hand-set value model's formula, not by the code
under test: ``P = sigmoid(2 * log1p(c) - 2)`` and ``amount = exp(3 + 0.5 * log1p(c))`` where ``c``
counts the user's adds to cart in the last hour (every input standardises to itself).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from typing import Any

import pytest
from kafka import KafkaProducer

from models.persist import dump, model_state, restore, snapshot_of
from models.scoring import input_names
from streams.settings import Settings
from tests.integration.harness import WorkerProc, read_topic, wait_settled, wait_until
from tests.integration.test_timers import (
    CHANGE,
    DAY,
    FIXED,
    HOUR,
    MIN,
    VERSIONS,
    clock_users,
    ev,
    hand_set,
    publish_fixed,
    send,
    ticks,
)

pytestmark = pytest.mark.integration

LOW, HIGH = 8.0, 25.0  # PROPSTREAM_VALUE_TIERS below, in the deployment currency
HYST = 0.1 * LOW  # leaving or entering a value tier takes this margin (value_hysteresis x low)
VALUE = {
    **FIXED,
    "PROPSTREAM_TARGETS": "purchase:7d,churn:14d,value:30d",
    "PROPSTREAM_VALUE_TIERS": f"{LOW:g},{HIGH:g}",
    "PROPSTREAM_TRUST_MIN_GINI": "0",  # a hand-set model has no quality figures (see FIXED)
    "PROPSTREAM_TRUST_MAX_VALUE_BIAS": "0",
    "PROPSTREAM_RESCORE_AFTER": "2h",  # past the last cart's hour for sure: no carts in the window
}


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def expected_value(carts_1h: int) -> float:
    c = math.log1p(carts_1h)
    return sigmoid(2 * c - 2) * math.exp(3 + 0.5 * c)


def tier(v: float, previous: int) -> int:
    raw = (v >= LOW) + (v >= HIGH)
    if raw > previous:
        return previous + sum(v >= t + HYST for t in (LOW, HIGH)[previous:raw])
    return previous - sum(v < t - HYST for t in (LOW, HIGH)[raw:previous])


def publish_value(kafka: str, topic: str, version: int = 3) -> None:
    names = input_names()
    classifier = model_state(hand_set({"n_add_to_cart_1h": 2.0}, -2.0))
    severity = {k: v for k, v in classifier.items() if k not in ("positives", "negatives")}
    severity = {**severity, "weights": {"n_add_to_cart_1h": 0.5}, "intercept": 0.0}
    state = {
        "classifier": classifier,
        "severity": severity,
        "positives": 500,
        "negatives": 500,
        "revenue_sum": 0.0,
        "log_sum": 3.0 * 100,  # a baseline log amount of 3 (the mean of 100 log revenues)
        "log_n": 100,
        "log_sq": 100 * (3.0**2 + 1.0),  # their spread: a standard deviation of 1, so no clamp here
        "smear_avg": 1.0,
        "smear_n": 100,
    }
    model = restore({"kind": "value", "optimizer": "sgd"}, state)
    assert set(names) >= {"n_add_to_cart_1h"}
    snap = snapshot_of(model, target="value", version=version, created_ms=int(time.time() * 1000))
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all")
    producer.send(topic, key=snap.key, value=dump(snap)).get(timeout=30)
    producer.close()


def loaded(worker: WorkerProc) -> bool:
    status, body = worker.get("/models")
    want = {**VERSIONS, "value": 3}
    return status == 200 and {t: m["version"] for t, m in body["models"].items()} == want


def test_value_tier_changes_and_expected_value_on_the_broker_match_the_schema(
    settings: Settings, make_worker: Any, kafka: str, tmp_path: Any
) -> None:
    publish_fixed(kafka, settings.topic_models)
    publish_value(kafka, settings.topic_models)
    w = make_worker("v", **VALUE).start()
    wait_until(lambda: loaded(w), 60, what="the hand-set models")
    now = int(time.time() * 1000)
    base = now - now % MIN - 2 * DAY
    # a page view, then adds to cart 20 minutes apart: 1, 2, 3 in the last hour; then silence
    u = "buyer"
    events = [ev(u, 0, "page_view", base)]
    events += [ev(u, i, "add_to_cart", base + i * 20 * MIN, product_id="p1", price=5.0) for i in (1, 2, 3)]
    clocks = clock_users(settings)
    # one topic for all of them: the worker does not interleave topics by time, so a page view on
    # the clickstream could be read after the carts and the first score would not be the baseline
    items = [(settings.topic_cart, e) for e in events]
    items += ticks(clocks, base - 30 * MIN, base + 4 * HOUR, 10 * MIN)
    send(kafka, items)
    wait_settled(kafka, settings.app_id, settings.source_topics, 120)

    changes = [json.loads(m.value) for m in read_topic(kafka, settings.topic_changes)]
    mine = [c for c in changes if c["user_id"] == u]
    for c in mine:
        CHANGE.validate(c)
    # the value target's announcements, worked out from the formula: only tier changes
    values = [expected_value(n) for n in (0, 1, 2, 3)] + [expected_value(0)]  # the last: the 2 h silence
    times = [e["ts"] for e in events] + [events[-1]["ts"] + 2 * HOUR]
    want = []
    t = (values[0] >= LOW) + (values[0] >= HIGH)  # the first score is the baseline: no change
    for v, ts in zip(values[1:], times[1:], strict=True):
        new = tier(v, t)
        if new != t:
            want.append((ts, "value_tier_up" if new > t else "value_tier_down", new, round(v, 2)))
        t = new
    got = [
        (c["event_ts_ms"], c["reason"], ("low", "medium", "high").index(c["tier"]), c["expected_value"])
        for c in mine
        if c["target"] == "value"
    ]
    assert [g[:3] for g in got] == [w_[:3] for w_ in want]
    assert [g[1] for g in got] == ["value_tier_up", "value_tier_up", "value_tier_down"]
    for g, w_ in zip(got, want, strict=True):
        assert g[3] == pytest.approx(w_[3], abs=0.011)
    for c in mine:
        if c["target"] == "value":
            assert c["currency"] == "USD" and c["score"] == pytest.approx(c["expected_value"], abs=0.006)
    # purchase changes carry the value at that moment: the signal for value-based bidding
    purchase = [c for c in mine if c["target"] == "purchase"]
    assert purchase, "the hand-set purchase model crosses tiers with the carts"
    by_time = dict(zip(times, values, strict=True))
    for c in purchase:
        assert c["currency"] == "USD"
        assert c["expected_value"] == pytest.approx(by_time[c["event_ts_ms"]], abs=0.011)

    # the lookup: the value entry, as of the partition's clock (well past the silence: 0 carts)
    status, body = w.get(f"/users/{u}")
    assert status == 200, body
    entry = body["scores"]["value"]
    assert entry["currency"] == "USD" and entry["tier"] == "low"
    assert entry["score"] == pytest.approx(expected_value(0), rel=1e-6)

    # the export: the value column is named after the target, its tier beside it
    out = tmp_path / "scores.csv"
    done = w.cli("score", "--format", "csv", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["user_id"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert list(next(iter(rows.values()))) == ["user_id", "purchase", "churn", "value", "value_tier"]
    assert float(rows[u]["value"]) == pytest.approx(expected_value(0), rel=1e-6)
    assert rows[u]["value_tier"] == "low"
