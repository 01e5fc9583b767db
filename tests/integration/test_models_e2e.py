"""Scores, labels, model versions and change events on the real broker, checked independently.

- change events read by an outside consumer validate against the published schema and obey the
  documented change rules (tiers, hysteresis, delta), and their count equals the worker's metric;
- a worker that loses its disk keeps the model version and the pending ledger (changelogs), and
  learning continues from where it was;
- with the same model, the pipeline's scores equal the in-process computation for the same events.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
import pytest
from kafka import KafkaProducer

from features.contract import Rules, parse
from features.state import FeatureParams
from features.user import compute, fold
from models.evaluate import run
from models.ledger import make_target
from models.online import OnlineModel, inputs
from models.persist import dump, model_of, snapshot_of
from streams.settings import Settings
from tests.conftest import ROOT
from tests.integration.harness import (
    FAST_FAILOVER,
    pending_snapshots,
    produce,
    read_topic,
    wait_settled,
    wait_until,
)
from tests.integration.test_pipeline import router
from traffic.simulator import SimConfig, simulate

pytestmark = pytest.mark.integration

SCHEMA = json.loads((ROOT / "streams" / "schemas" / "change.schema.json").read_text())
LOW, HIGH, HYST, DELTA = 0.2, 0.5, 0.03, 0.15  # the documented defaults the worker runs with here

# Warm-up at 10 labels of each class: the simulated month ends "now", so the count of labels that
# mature varies from run to run (purchase positives seen between 26 and 46 for the disk test's
# traffic); 10 leaves a margin the test does not depend on.
LEARNING = {
    "PROPSTREAM_TARGETS": "purchase:2d,churn:3d",
    "PROPSTREAM_MIN_POSITIVES": "10",
    "PROPSTREAM_MIN_NEGATIVES": "10",
    # The trust gate is off: these tests are about change events, versions and disks. A few dozen
    # labels, scored mostly by the untrained prior while the worker catches up, pass no quality
    # bound; the gate has its own tests (tests/unit/test_trust.py, tests/integration/test_trust_e2e.py).
    "PROPSTREAM_TRUST_MIN_AUC_LOWER": "0",
    "PROPSTREAM_TRUST_MAX_ECE": "1",
    "PROPSTREAM_PUBLISH_EVERY": "100",
    "PROPSTREAM_SAMPLE_EVERY_S": "1800",
    "PROPSTREAM_COOLDOWN_S": "0",
}


def sim(users: int, days: float, seed: int) -> list[dict[str, Any]]:
    return list(simulate(SimConfig(users=users, days=days, seed=seed)))  # ends now: nothing in the future


def models_of(worker: Any) -> dict[str, Any]:
    status, body = worker.get("/models")
    assert status == 200, body
    return body["models"]


def trusted(worker: Any) -> bool:
    m = models_of(worker)
    return all(v["version"] >= 1 and not v["warming_up"] for v in m.values())


def tier_allowed(tier: str, score: float) -> bool:
    """Where a tier may hold a score: its band, widened by the hysteresis on each side."""
    lo, hi = {"low": (0.0, LOW), "medium": (LOW, HIGH), "high": (HIGH, 1.0)}[tier]
    return lo - HYST <= score <= hi + HYST


def test_change_events_validate_and_follow_the_rules(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    started_ms = time.time() * 1000
    worker = make_worker(**LEARNING).start()
    events = sim(users=300, days=12, seed=11)
    cut = int(len(events) * 0.7)
    produce(kafka, router(settings), events[:cut])
    wait_until(lambda: trusted(worker), 180, what="both targets' models to be published and warm")
    produce(kafka, router(settings), events[cut:])
    wait_until(
        lambda: worker.metric("propstream_events_consumed_total") >= len(events),
        120,
        what="all events consumed",
    )
    # the metric is final: a batch counts its change events before its messages count as consumed
    n_metric = int(worker.metric("propstream_change_events_total"))
    assert n_metric > 0, "no change event after the models became trusted"
    wait_settled(kafka, settings.app_id, settings.source_topics)  # and flushed before the commit
    msgs = read_topic(kafka, settings.topic_changes)
    assert len(msgs) == n_metric  # what the worker counted is what an outside consumer reads

    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    versions = {t: v["version"] for t, v in models_of(worker).items()}
    for msg in msgs:
        ch = json.loads(msg.value)
        validator.validate(ch)
        assert msg.key == ch["user_id"].encode()
        assert 1 <= ch["model_version"] <= versions[ch["target"]]  # never from a warming-up model
        assert tier_allowed(ch["tier"], ch["score"]), ch
        assert ch["tier"] != ch["previous_tier"] or abs(ch["score"] - ch["previous_score"]) >= DELTA - 1e-6, (
            ch
        )
        assert (ch["direction"] == "up") == (ch["score"] > ch["previous_score"]), ch
        assert ch["horizon_s"] == {"purchase": 2 * 86400, "churn": 3 * 86400}[ch["target"]]
        if ch["target"] == "churn":
            assert ch["reason"] == f"churn_risk_{ch['direction']}"
        assert len(ch["top_factors"]) == 5
        # where its latency went: the batch began, the change was encoded, sent, then appended
        h = dict(msg.headers)
        batch_ms, sent_ms = int(h["propstream.batch_ms"]), int(h["propstream.sent_ms"])
        assert started_ms <= batch_ms <= ch["emit_ts_ms"] <= sent_ms <= msg.timestamp + 1, (h, ch)

    user = json.loads(msgs[-1].value)["user_id"]
    status, body = worker.get(f"/users/{user}")
    assert status == 200
    assert set(body["scores"]) == {"purchase", "churn"}
    for target, s in body["scores"].items():
        assert 0.0 <= s["score"] <= 1.0 and s["model_version"] >= 1 and not s["warming_up"], target
    assert worker.get("/users/nobody-here")[0] == 404

    out = worker.cli("tail", "-n", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == min(3, n_metric) and all("→" in line for line in lines), out.stdout


def test_model_version_and_ledger_survive_losing_the_disk(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    # a short session timeout: the second worker joins once the killed one's membership expires
    first = make_worker("w1", **LEARNING, **FAST_FAILOVER).start()
    events = sim(users=200, days=10, seed=12)
    produce(kafka, router(settings), events)
    wait_until(lambda: trusted(first), 180, what="models published")
    wait_until(
        lambda: first.metric("propstream_events_consumed_total") >= len(events),
        120,
        what="all events consumed",
    )
    # every changelog write and publication is in Kafka before the SIGKILL: what is compared after it
    # is what the changelogs hold, not what a kill in the flush window may lose (docs/guarantees.md)
    wait_settled(kafka, settings.app_id, [*settings.source_topics, settings.topic_training])
    before = models_of(first)
    users = sorted({str(e["user_id"]) for e in events})[:40]
    pending = pending_snapshots(first, users)
    assert sum(pending.values()) > 0, "nothing pending: the test would prove nothing"
    first.kill()  # SIGKILL: no clean shutdown

    # empty state folder: changelogs only. It publishes what it learns at its first trainer batch
    # (interval 1 s): with the default 30 s, the labels of the later events alone, fewer than
    # PUBLISH_EVERY in some runs, wait for another batch (the idle clock's move, a minute on)
    second = make_worker("w2", **LEARNING, **FAST_FAILOVER, PROPSTREAM_PUBLISH_INTERVAL_S="1").start(
        timeout_s=180
    )
    wait_until(
        lambda: all(models_of(second)[t]["version"] >= before[t]["version"] for t in before),
        60,
        what="the published versions to be swapped in again",
    )
    assert pending_snapshots(second, users) == pending
    # learning goes on from the trainer's restored state: more labels, a newer version, counts not reset
    later = sim(users=200, days=1, seed=13)
    produce(kafka, router(settings), later)

    def moved_on() -> bool:
        now = models_of(second)["purchase"]
        was = before["purchase"]
        return now["version"] > was["version"] and now["positives"] + now["negatives"] > (
            was["positives"] + was["negatives"]
        )

    wait_until(moved_on, 120, what="a newer purchase model learnt on top of the old one")


def test_pipeline_scores_equal_in_process_scores_for_the_same_model(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    train = sim(users=300, days=20, seed=21)
    model = OnlineModel()
    run(train, make_target("purchase", 7 * 86400), model=model)
    assert model.positives > 50 and model.negatives > 50
    snap = snapshot_of(model, target="purchase", version=5, created_ms=int(time.time() * 1000))
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all")
    producer.send(settings.topic_models, key=snap.key, value=dump(snap)).get(timeout=30)
    producer.close()

    worker = make_worker(
        PROPSTREAM_TARGETS="purchase:7d",
        PROPSTREAM_MIN_POSITIVES="0",
        PROPSTREAM_MIN_NEGATIVES="0",
        PROPSTREAM_PUBLISH_EVERY=str(10**9),
        PROPSTREAM_PUBLISH_INTERVAL_S=str(10**9),
    ).start()
    wait_until(lambda: models_of(worker)["purchase"]["version"] == 5, 60, what="the fixed model to be loaded")
    events = sim(users=80, days=8, seed=22)
    produce(kafka, router(settings), events)

    fixed = model_of(snap)
    rules, params = Rules(max_future_ms=10**15), FeatureParams()
    by_user: dict[str, list[Any]] = {}
    for e in events:
        by_user.setdefault(str(e["user_id"]), []).extend(parse(json.dumps(e).encode(), rules, 0))
    expected = {}
    for u, evs in by_user.items():
        st = fold(evs, params)
        expected[u] = (st.events, fixed.score(inputs(compute(st, st.last_ms, params))), st.last_ms)

    def served(u: str) -> dict[str, Any] | None:
        # as of each user's last event: by default a lookup answers as of the partition's clock
        status, body = worker.get(f"/users/{u}?as_of={expected[u][2]}")
        return body if status == 200 and body["events"] == expected[u][0] else None

    wait_until(lambda: all(served(u) for u in expected), 120, what="every user's events to be folded")
    scores = {u: served(u)["scores"]["purchase"] for u in expected}  # type: ignore[index]
    assert {s["model_version"] for s in scores.values()} == {5}
    distinct = {round(s["score"], 3) for s in scores.values()}
    assert len(distinct) > 10, "scores barely vary: the comparison would be weak"
    for u, s in scores.items():
        assert s["score"] == pytest.approx(expected[u][1], abs=2e-6), u
