"""Real malformed bytes in the real changelogs and topics: counted, and never a dead task.

A worker learns for a while and stops. Then, as a bad deploy, a disk fault or a stray producer
would, bytes that are not what they should be are written to the real broker: into the features
changelog (a garbage row, a row with a garbage score state, a row with a garbage ledger), the
watermarks and trainer changelogs, the models topic (garbage, and a snapshot whose model cannot be
rebuilt), the training log (garbage, and a rollback whose snapshot is garbage) and the erasure
topic. A fresh worker recovers all of it from Kafka. It must become ready, count each kind in
``propstream_decode_errors_total``, take every new event, and keep every agent working: a valid
rollback sent afterwards is learnt by the trainer and swapped in by the models feed.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from kafka import KafkaProducer

from models.persist import ModelSnapshot, dump
from models.training import Rollback
from streams.rows import FEATURES, LEDGER, SCORES, decode_row, encode_row
from streams.settings import Settings
from tests.integration.harness import produce, read_topic, wait_settled, wait_until
from tests.integration.test_models_e2e import LEARNING, models_of, sim
from tests.integration.test_pipeline import router

pytestmark = pytest.mark.integration

WHAT = (
    "features",
    "scores",
    "ledger",
    "watermark",
    "trainer_state",
    "training_message",
    "model_snapshot",
    "erasure_request",
)


def newest_by_key(bootstrap: str, topic: str) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for m in read_topic(bootstrap, topic):
        out[m.key] = m
    return out


def events_of(worker: Any, user: str) -> int:
    status, body = worker.get(f"/users/{user}/features")
    assert status == 200, (user, body)
    return int(body["events"])


def test_bad_bytes_everywhere_are_counted_and_every_agent_keeps_working(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    first = make_worker("w1", **LEARNING).start()
    events = sim(users=60, days=6, seed=31)
    produce(kafka, router(settings), events)
    wait_until(
        lambda: first.metric("propstream_events_consumed_total") >= len(events),
        120,
        what="all events consumed",
    )
    wait_until(lambda: models_of(first)["purchase"]["version"] >= 1, 120, what="a published purchase model")
    wait_settled(kafka, settings.app_id, [*settings.source_topics, settings.topic_training])
    assert sum(first.metric("propstream_decode_errors_total", what=w) for w in WHAT) == 0  # the control
    published = models_of(first)["purchase"]["version"]
    rows = newest_by_key(kafka, f"{settings.app_id}-features-changelog")
    with_ledger = sorted(k for k, m in rows.items() if m.value and decode_row(m.value)[LEDGER])
    assert with_ledger, "no pending ledger to corrupt"
    c = with_ledger[0]
    others = sorted(k for k, m in rows.items() if m.value and k != c)
    assert len(others) >= 6, "too few users to corrupt one part each"
    a, b = others[0], others[1]
    fine = others[2:6]
    before = {k.decode(): events_of(first, k.decode()) for k in [a, b, c, *fine]}
    first.stop()

    # --- the bad bytes, each to the partition that holds its key --------------------------------
    p = KafkaProducer(bootstrap_servers=kafka, acks="all")

    def put(topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> None:
        p.send(topic, key=key, value=value, partition=partition).get(timeout=30)

    changelog = f"{settings.app_id}-features-changelog"
    row_b, row_c = decode_row(rows[b].value), decode_row(rows[c].value)
    put(changelog, a, b"\xc1 not a row", rows[a].partition)
    put(changelog, b, encode_row([row_b[FEATURES], b"\xc1\xc1", row_b[LEDGER]]), rows[b].partition)
    put(changelog, c, encode_row([row_c[FEATURES], row_c[SCORES], b"\xde\xad\xbe\xef"]), rows[c].partition)
    marks = newest_by_key(kafka, f"{settings.app_id}-watermarks-changelog")
    mark_key = next(k for k in marks if k.decode().startswith(settings.topic_clickstream + "|"))
    put(f"{settings.app_id}-watermarks-changelog", mark_key, b"yesterday", marks[mark_key].partition)
    trainer = newest_by_key(kafka, f"{settings.app_id}-trainer-changelog")
    assert b"purchase" in trainer, "the trainer has stored no state to corrupt"
    put(f"{settings.app_id}-trainer-changelog", b"purchase", b"\x92\xc1", trainer[b"purchase"].partition)
    now = int(time.time() * 1000)
    broken = ModelSnapshot(target="purchase", version=10_000, created_ms=now, state={"counts": 5})
    put(settings.topic_models, b"purchase@garbage", b"\xff\x00 not a snapshot")
    put(settings.topic_models, broken.key, dump(broken))
    put(settings.topic_training, b"purchase", b"\x00 not a training message")
    bad_rollback = msgspec.msgpack.encode(Rollback("purchase", 1, b"\xc1 garbage snapshot"))
    put(settings.topic_training, b"purchase", bad_rollback)
    put(settings.topic_erasure, None, b"\xff\xfe")
    p.close()

    # --- a fresh worker recovers all of it from Kafka -----------------------------------------
    second = make_worker("w2", **{**LEARNING, "PROPSTREAM_SAMPLE_EVERY_S": "0"}).start(timeout_s=180)
    users = sorted(before)
    new = [
        {
            "event_id": f"late-{u}-{i}",
            "user_id": u,
            "type": "page_view",
            "ts": int(time.time() * 1000) - 60_000 + i,
        }
        for u in users
        for i in range(2)
    ]
    produce(kafka, router(settings), new)

    def counted() -> dict[str, float]:
        return {w: second.metric("propstream_decode_errors_total", what=w) for w in WHAT}

    try:
        wait_until(lambda: all(v >= 1 for v in counted().values()), 120, what="every kind counted")
    except AssertionError as exc:  # the counts at the end, not at the start of the wait
        raise AssertionError(f"{exc}; counted then: {counted()}") from None
    wait_until(
        lambda: all(events_of(second, u) >= (2 if u == a.decode() else before[u] + 2) for u in users),
        90,
        what="every new event folded in",
    )
    got = {u: events_of(second, u) for u in users}
    # the garbage row started afresh; readable features are kept whatever else in the row was bad
    assert got == {u: 2 if u == a.decode() else before[u] + 2 for u in users}
    assert second.metric("propstream_events_rejected_total") == 0
    assert counted()["training_message"] >= 2 and counted()["model_snapshot"] >= 2
    assert models_of(second)["purchase"]["version"] < 10_000  # the broken snapshot was never swapped in

    # every agent still works: a valid rollback is learnt by the trainer and swapped in by the feed
    out = second.cli("model", "rollback", str(published), "--target", "purchase")
    assert out.returncode == 0, out.stderr
    wait_until(
        lambda: models_of(second)["purchase"]["note"] == f"rollback to {published}",
        90,
        what="the rollback published and swapped in",
    )
    assert second.alive()
