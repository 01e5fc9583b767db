"""End to end on the real broker: outside producer in, features over HTTP equal an independent recount."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from streams.settings import Settings
from tests.integration.harness import FAST_FAILOVER, consume_all, produce, wait_until
from tests.reference import DAY, HOUR, assert_features_equal, random_events, reference_features, unique

pytestmark = pytest.mark.integration

CART = {"add_to_cart", "remove_from_cart", "checkout_start"}


def router(settings: Settings) -> Any:
    def topic_of(ev: dict[str, Any]) -> str:
        t = ev.get("type")
        if t == "purchase":
            return settings.topic_purchase
        return settings.topic_cart if t in CART else settings.topic_clickstream

    return topic_of


def by_user(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(e["user_id"], []).append(e)
    return out


def wait_for_counts(worker: Any, users: dict[str, list[dict[str, Any]]], timeout_s: float = 90) -> None:
    def done() -> bool:
        for u, evs in users.items():
            f = worker.features(u)
            if f is None or f["events"] != len(unique(evs)):
                return False
        return True

    wait_until(done, timeout_s, what="every user's event count to match what was produced")


def check_against_reference(worker: Any, users: dict[str, list[dict[str, Any]]], as_of: int) -> None:
    for u, evs in users.items():
        got = worker.features(u, as_of=as_of)
        assert got is not None, u
        assert got["as_of_ms"] == as_of
        assert_features_equal(got["features"], reference_features(evs, as_of), f"user {u}")


def recent_events(seed: int, users: int, per_user: int) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    return random_events(
        seed, users=users, per_user=per_user, start_ms=now - 20 * DAY, span_ms=20 * DAY - HOUR
    )


def test_features_over_http_equal_reference(settings: Settings, make_worker: Any, kafka: str) -> None:
    events = recent_events(1, users=40, per_user=75)  # 3,000 events
    worker = make_worker().start()
    assert produce(kafka, router(settings), events) == 3000
    users = by_user(events)
    wait_for_counts(worker, users)
    as_of = max(e["ts"] for e in events) + HOUR
    check_against_reference(worker, users, as_of)
    status, body = worker.get("/users/nobody-here/features")
    assert status == 404 and body["error"] == "unknown_user"
    assert worker.metric("propstream_events_accepted_total") == 3000
    assert worker.metric("propstream_events_rejected_total") == 0


def test_restart_keeps_features_and_continues(settings: Settings, make_worker: Any, kafka: str) -> None:
    events = recent_events(2, users=20, per_user=60)
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    as_of = max(e["ts"] for e in events) + HOUR
    # a short session timeout: the fresh worker joins once the killed one's membership expires
    worker = make_worker("w1", **FAST_FAILOVER).start()
    produce(kafka, router(settings), first)
    users_first = by_user(first)
    wait_for_counts(worker, users_first)
    before = {u: worker.features(u, as_of)["features"] for u in users_first}
    worker.stop()

    # same state folder: local RocksDB reopened
    worker.start()
    assert {u: worker.features(u, as_of)["features"] for u in users_first} == before
    worker.kill()

    # empty state folder: everything restored from the changelog topic
    fresh = make_worker("w2", **FAST_FAILOVER).start()
    wait_for_counts(fresh, users_first)
    assert {u: fresh.features(u, as_of)["features"] for u in users_first} == before
    produce(kafka, router(settings), second)
    wait_for_counts(fresh, by_user(events))
    check_against_reference(fresh, by_user(events), as_of)


def test_bad_input_goes_to_deadletter_and_valid_counted_once(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    now = int(time.time() * 1000)
    valid = [
        {"event_id": f"ok{i}", "user_id": f"u{i % 5}", "type": "page_view", "ts": now - 3_600_000 + i * 1000}
        for i in range(50)
    ]
    bad: list[tuple[bytes | None, bytes, str]] = [
        (b"u1", b"\xff\xfe not utf8", "not_utf8"),
        (b"u1", b"{not json", "not_json"),
        (b"u1", b"[]", "not_object"),
        (b"u1", json.dumps({"user_id": "u1", "type": "page_view", "ts": now}).encode(), "missing_field"),
        (b"u0", json.dumps({**valid[0], "event_id": "b1", "price": "cheap"}).encode(), "wrong_type"),
        (b"u0", json.dumps({**valid[0], "event_id": "b2", "type": "teleport"}).encode(), "unknown_type"),
        (b"u0", json.dumps({**valid[0], "event_id": "b3", "price": -5}).encode(), "out_of_range"),
        (b"u0", json.dumps({**valid[0], "event_id": "b4", "ts": now + 86_400_000}).encode(), "future"),
        (b"u0", json.dumps({**valid[0], "event_id": "b5", "ts": 900_000_000_000}).encode(), "too_old"),
        (b"u0", json.dumps({**valid[0], "event_id": "b6", "ts": "tomorrow"}).encode(), "bad_time"),
        (b"u1", b'{"pad": "' + b"x" * 70_000 + b'"}', "oversize"),
        (b"someone-else", json.dumps({**valid[1], "event_id": "b7"}).encode(), "wrong_key"),
        (None, json.dumps({**valid[1], "event_id": "b8"}).encode(), "wrong_key"),
    ]
    worker = make_worker().start()
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=kafka, max_request_size=1_000_000)
    for i, ev in enumerate(valid):
        p.send(settings.topic_clickstream, key=ev["user_id"].encode(), value=json.dumps(ev).encode())
        if i % 10 == 0:  # interleave the bad ones with the good ones
            key, value, _ = bad[i // 10]
            p.send(settings.topic_clickstream, key=key, value=value)
    for key, value, _ in bad[5:]:
        p.send(settings.topic_clickstream, key=key, value=value)
    for ev in valid[:7]:  # exact re-sends: duplicates
        p.send(settings.topic_clickstream, key=ev["user_id"].encode(), value=json.dumps(ev).encode())
    p.flush()

    expected = Counter(reason for _, _, reason in bad) + Counter({"duplicate": 7})
    dead = consume_all(kafka, settings.topic_deadletter, sum(expected.values()))
    got = Counter(dict(m.headers)["propstream.reason"].decode() for m in dead)
    assert got == expected
    for m in dead:  # the original bytes, with where they came from
        h = dict(m.headers)
        assert h["propstream.source.topic"].decode() == settings.topic_clickstream
        assert int(h["propstream.source.offset"]) >= 0
    originals = {value for _, value, _ in bad}
    assert {m.value for m in dead if dict(m.headers)["propstream.reason"] != b"duplicate"} == originals

    users = by_user(valid)
    wait_for_counts(worker, users)
    for u, evs in users.items():
        assert worker.features(u)["features"]["n_page_view_24h"] == len(evs)
    assert worker.metric("propstream_events_accepted_total") == len(valid)
    for reason, n in expected.items():
        assert worker.metric("propstream_events_rejected_total", reason=reason) == n


def test_two_workers_route_lookups_to_the_owner(settings: Settings, make_worker: Any, kafka: str) -> None:
    a = make_worker("a").start()
    b = make_worker("b", PROPSTREAM_BATCH_IN_THREAD="true").start()  # its batches in a thread
    wait_until(lambda: a.ready() and b.ready(), 60, what="both workers ready after the rebalance")
    events = recent_events(4, users=24, per_user=20)
    produce(kafka, router(settings), events)
    users = by_user(events)
    wait_for_counts(a, users)
    as_of = max(e["ts"] for e in events) + HOUR
    owners = Counter()
    for u, evs in users.items():
        want = reference_features(evs, as_of)
        for w in (a, b):  # either worker answers; the non-owner forwards to the owner
            got = w.features(u, as_of)
            assert got is not None, (u, w.url)
            assert_features_equal(got["features"], want, f"user {u} via {w.url}")
        owners[_owner(a, u)] += 1
    assert len(owners) == 2, f"all users on one worker: {owners} (partitions not shared?)"


def _owner(worker: Any, user: str) -> str:
    """The worker that answered (the owner of ``user``'s partition), as it names itself."""
    return str(worker.features(user)["served_by"])


def test_simulate_cli_publishes_and_features_cli_reads(
    settings: Settings, make_worker: Any, tmp_path: Any
) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    worker = make_worker().start()
    truth = tmp_path / "truth.csv"
    cmd = [
        sys.executable,
        "-m",
        "streams.cli",
        "simulate",
        "--users",
        "40",
        "--events",
        "2000",
        "--truth",
        str(truth),
    ]
    proc = subprocess.run(
        cmd, env=worker.env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2,000/2,000 events (100%)" in proc.stderr  # progress output
    assert len(truth.read_text().splitlines()) == 2001  # header + one row per event

    def all_in() -> bool:
        used = worker.metric("propstream_events_accepted_total")
        return used + worker.metric("propstream_events_without_consent_total") == 2000

    wait_until(all_in, 60, what="2,000 simulated events accepted or set aside for consent")
    assert worker.metric("propstream_events_rejected_total") == 0
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "features", "u000001"],
        env=worker.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("user u000001") and "n_events_24h" in out.stdout
