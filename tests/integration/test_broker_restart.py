"""The broker crashes and comes back mid-stream: the worker recovers by itself and nothing is lost.

A dedicated broker (the session one is shared by every test) is SIGKILLed while an outside producer
publishes and the worker consumes, and restarted on the same data a few seconds later. Without
any action on the worker, every user's features end equal to the reference recount, and nothing
valid is dead-lettered except redeliveries (``duplicate``); with exactly-once checkpoints (the
second run) not even those: a transaction that the outage interrupts commits later or never.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.broker import LocalBroker, free_port
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.harness import FAST_FAILOVER, Traffic, WorkerProc, read_topic, wait_until
from tests.integration.test_pipeline import router
from tests.reference import DAY, HOUR, assert_features_equal, random_events, reference_features

pytestmark = pytest.mark.integration

OUTAGE_S = 5.0  # how long the worker is without a broker (retries, failed commits and heartbeats)


@pytest.fixture()
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    broker = LocalBroker(Settings(), port=free_port(), data_dir=tmp_path / "kafka")
    broker.start(timeout_s=120)
    yield broker
    broker.stop()


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_worker_recovers_from_a_broker_crash_without_losing_events(
    own_broker: LocalBroker, tmp_path: Path, guarantee: str
) -> None:
    bootstrap = own_broker.bootstrap()
    uid = uuid.uuid4().hex[:8]
    env = {
        "PROPSTREAM_BOOTSTRAP": bootstrap,
        "PROPSTREAM_APP_ID": f"ps-{uid}",
        "PROPSTREAM_LOG_LEVEL": "warning",
        "PROPSTREAM_PROCESSING_GUARANTEE": guarantee,
        **FAST_FAILOVER,
    }
    settings = Settings(
        **{k.removeprefix("PROPSTREAM_").lower(): v for k, v in env.items() if k.startswith("PROPSTREAM_")}
    )
    ensure_topics(settings)
    worker = WorkerProc(env, tmp_path / "w1", tmp_path / "w1.log").start()
    try:
        now = int(time.time() * 1000)
        events = random_events(9, users=40, per_user=50, start_ms=now - 20 * DAY, span_ms=20 * DAY - HOUR)
        traffic = Traffic(bootstrap, router(settings), events, rate=len(events) / 20)
        traffic.start()
        wait_until(lambda: traffic.sent > len(events) // 4, 30, what="traffic to flow")
        wait_until(
            lambda: worker.metric("propstream_events_accepted_total") > 0, 30, what="worker to consume"
        )

        port = int(bootstrap.rsplit(":", 1)[1])
        assert worker.connections_to(port) > 0, "the worker is not connected to the broker"
        own_broker.kill()
        down_at = time.monotonic()
        # the outage as the worker sees it: none of its connections to the broker is left; from then
        # on it stays alive through OUTAGE_S of retrying (checked all along, not once at the end)
        wait_until(
            lambda: worker.connections_to(port) == 0, 30, every_s=0.1, what="the worker to lose the broker"
        )
        seen_at = time.monotonic()
        while time.monotonic() - seen_at < OUTAGE_S:
            assert worker.alive(), "the worker exited when the broker went away"
            assert worker.connections_to(port) == 0, "a connection to a killed broker"
            time.sleep(0.2)
        own_broker.start(timeout_s=120)
        assert own_broker.bootstrap() == bootstrap
        t0 = time.monotonic()
        wait_until(worker.ready, 180, what="the worker to be ready again without any action")
        recovered_s = time.monotonic() - t0
        traffic.finish()

        users: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            users.setdefault(e["user_id"], []).append(e)

        def all_counted() -> bool:
            for u, evs in users.items():
                f = worker.features(u)
                if f is None or f["events"] != len(evs):
                    return False
            return True

        wait_until(all_counted, 180, every_s=1.0, what="every event produced to be counted")
        as_of = max(e["ts"] for e in events) + HOUR
        for u, evs in users.items():
            got = worker.features(u, as_of)
            assert got is not None
            assert_features_equal(got["features"], reference_features(evs, as_of), f"user {u}")
        reasons = Counter(
            dict(m.headers)["propstream.reason"].decode()
            for m in read_topic(bootstrap, settings.topic_deadletter)
        )
        assert set(reasons) <= {"duplicate"}, reasons
        if guarantee == "exactly_once":  # offsets commit with the rows: nothing is read twice
            assert not reasons, reasons
        print(
            f"broker down {t0 - down_at:.1f}s (incl. its restart); worker ready {recovered_s:.1f}s later; "
            f"dead letters: {dict(reasons)}"
        )
    finally:
        worker.kill()
