"""The trust gate on the real broker: a published version's quality decides whether changes flow.

A version of poor quality makes the worker say so (``/models``, lookups, metrics) and emit no change
event; a version of good quality flips it; a later poor one flips it back. The quality figures are
hand-worked (tests/unit/test_trust.py), so the expected reasons are known without the gate's code.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kafka import KafkaProducer

from models.evaluate import run
from models.ledger import make_target
from models.online import OnlineModel
from models.persist import dump, snapshot_of
from streams.settings import Settings
from tests.integration.harness import produce, read_topic, wait_settled, wait_until
from tests.integration.test_pipeline import router
from traffic.simulator import SimConfig, simulate

pytestmark = pytest.mark.integration

WEAK = {"matured": 100, "positives": 50, "roc_auc": 0.65, "ece": 0.05}  # lower bound 0.560
GOOD = {"matured": 100, "positives": 50, "roc_auc": 0.8, "ece": 0.05}  # lower bound 0.727
MISCALIBRATED = {"matured": 100, "positives": 50, "roc_auc": 0.8, "ece": 0.14}


def test_a_version_is_trusted_by_its_quality_and_only_then_announces_changes(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    model = OnlineModel()
    run(
        list(simulate(SimConfig(users=200, days=16, seed=31))),
        make_target("purchase", 7 * 86400),
        model=model,
    )
    assert model.positives > 50 and model.negatives > 50  # scores that move, so changes can happen
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all")

    def publish(version: int, quality: dict[str, float]) -> None:
        snap = snapshot_of(model, target="purchase", version=version, created_ms=int(time.time() * 1000))
        snap.quality = quality
        producer.send(settings.topic_models, key=snap.key, value=dump(snap)).get(timeout=30)

    publish(5, WEAK)
    worker = make_worker(
        PROPSTREAM_TARGETS="purchase:7d",
        PROPSTREAM_MIN_POSITIVES="0",  # the counts pass at once: only the gate decides
        PROPSTREAM_MIN_NEGATIVES="0",
        PROPSTREAM_COOLDOWN_S="0",
        PROPSTREAM_PUBLISH_EVERY=str(10**9),
        PROPSTREAM_PUBLISH_INTERVAL_S=str(10**9),
    ).start()

    def live() -> dict[str, Any]:
        status, body = worker.get("/models")
        assert status == 200, body
        return body["models"]["purchase"]

    def at(version: int) -> dict[str, Any]:
        wait_until(lambda: live()["version"] == version, 60, what=f"version {version} to be live")
        return live()

    m = at(5)
    assert m["warming_up"] is True
    assert m["trust"] == {
        "trusted": False,
        "reason": "roc_auc lower bound 0.560 < 0.6 (roc_auc 0.650 on 50 positives, 50 negatives)",
    }
    assert worker.metric("propstream_model_trusted", target="purchase") == 0
    assert worker.metric("propstream_model_trust_failing", target="purchase", check="roc_auc") == 1

    events = list(simulate(SimConfig(users=100, days=6, seed=32)))  # ends now: nothing in the future
    parts = [
        events[: len(events) // 3],
        events[len(events) // 3 : 2 * len(events) // 3],
        events[2 * len(events) // 3 :],
    ]
    sent = 0

    def feed(part: list[dict[str, Any]]) -> float:
        """Produce ``part``; the change events counted once it is consumed (final then: a batch counts
        its changes before its messages count as consumed)."""
        nonlocal sent
        sent += produce(kafka, router(settings), part)
        wait_until(
            lambda: worker.metric("propstream_events_consumed_total") >= sent, 120, what="the events consumed"
        )
        return worker.metric("propstream_change_events_total")

    assert feed(parts[0]) == 0  # untrusted: scored, never announced
    user = str(parts[0][-1]["user_id"])
    status, body = worker.get(f"/users/{user}")
    assert status == 200 and body["scores"]["purchase"]["warming_up"] is True
    assert body["scores"]["purchase"]["model_version"] == 5
    assert body["scores"]["purchase"]["trust"] == m["trust"]  # the lookup says why, as /models does

    publish(6, GOOD)
    m = at(6)
    assert m["warming_up"] is False
    assert m["trust"] == {"trusted": True, "reason": "roc_auc lower bound 0.727 >= 0.6, ece 0.050 <= 0.1"}
    assert worker.metric("propstream_model_trusted", target="purchase") == 1
    trusted_changes = feed(parts[1])
    assert trusted_changes > 0

    publish(7, MISCALIBRATED)
    m = at(7)
    assert m["warming_up"] is True
    assert m["trust"] == {"trusted": False, "reason": "ece 0.140 > 0.1"}
    assert worker.metric("propstream_model_trust_failing", target="purchase", check="ece") == 1
    assert feed(parts[2]) == trusted_changes  # untrusted again: nothing more announced

    wait_settled(kafka, settings.app_id, settings.source_topics)  # every change flushed before the commit
    changes = [json.loads(msg.value) for msg in read_topic(kafka, settings.topic_changes)]
    assert len(changes) == trusted_changes
    assert {c["model_version"] for c in changes} == {6}  # none from the untrusted versions 5 and 7
    producer.close()
