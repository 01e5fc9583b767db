"""Hostile input on the real broker, and the web endpoint under hostile requests.

- random bytes, oversized and nested payloads, NaN/Infinity, broken and odd unicode, wrong types,
  interleaved with 50,000 valid events of 50,000 distinct users: the worker stays ready, every bad
  message reaches the dead-letter topic with its original bytes and a reason, every valid event is
  counted, and the worker's resident memory stays bounded;
- users with odd unicode ids are stored and looked up by their exact id;
- the web endpoint listens on loopback only, validates user ids (JSON 400), answers JSON errors,
  and requires the bearer token when one is configured.
"""

from __future__ import annotations

import json
import random
import time
import urllib.parse
from collections import Counter
from typing import Any

import pytest
from kafka import KafkaProducer

from features.contract import REASONS
from streams.settings import Settings
from tests.integration.harness import WorkerProc, read_topic, wait_until

pytestmark = pytest.mark.integration

DISTINCT_USERS = 50_000  # every one a new row: the table, not the heap, must hold them
RSS_BOUND_MIB = 600
ODD_IDS = ["ü-user", "用户-7", "👩‍👩‍👧‍👦", "e\u0301-combining", "\u202eevil", "a b+c%2F", "x" * 256]


def bad_messages(now: int) -> list[tuple[bytes | None, bytes, str | None]]:
    """(key, value, expected reason or None when several reasons are acceptable)."""
    ok = {"event_id": "bad", "user_id": "u-bad", "type": "page_view", "ts": now - 60_000}
    rng = random.Random(3)
    out: list[tuple[bytes | None, bytes, str | None]] = []
    for i in range(300):  # random bytes: never an accepted event
        out.append(
            (
                b"u-bad",
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) + bytes([i % 256]),
                None,
            )
        )
    out += [
        (b"u-bad", b'{"pad":"' + b"x" * 70_000 + b'"}', "oversize"),
        (b"u-bad", b"[" * 900_000, "oversize"),
        (b"u-bad", b"[" * 500 + b"]" * 500, "not_object"),
        (b"u-bad", b'{"a":' * 500 + b"1" + b"}" * 500, "missing_field"),
        (b"u-bad", json.dumps({**ok, "ts": 0}).replace('"ts": 0', '"ts": NaN').encode(), "not_json"),
        (
            b"u-bad",
            json.dumps({**ok, "price": 0}).replace('"price": 0', '"price": Infinity').encode(),
            "not_json",
        ),
        (
            b"u-bad",
            json.dumps({**ok, "price": 0}).replace('"price": 0', '"price": 1e999').encode(),
            "not_json",
        ),
        (
            b"u-bad",
            json.dumps({**ok, "user_id": "PLACEHOLDER"}).replace("PLACEHOLDER", "\\ud800").encode(),
            "not_json",
        ),
        (b"u-bad", b"\xc3\x28 not utf8", "not_utf8"),
        (b"u-bad", b'"just a string"', "not_object"),
        (b"u-bad", json.dumps({**ok, "price": "12"}).encode(), "wrong_type"),
        (b"u-bad", json.dumps({**ok, "quantity": 1.5}).encode(), "wrong_type"),
        (b"u-bad", json.dumps({**ok, "event_id": [1]}).encode(), "wrong_type"),
        (b"u-bad", json.dumps({**ok, "consent": "yes"}).encode(), "wrong_type"),
        (b"u-bad", json.dumps({**ok, "ts": True}).encode(), "wrong_type"),
        (b"u-bad", json.dumps({**ok, "type": "\u0000"}).encode(), "unknown_type"),
        (b"u-bad", json.dumps({**ok, "price": -1}).encode(), "out_of_range"),
        (b"u-bad", json.dumps({**ok, "quantity": 10**30}).encode(), "out_of_range"),
        (b"x" * 257, json.dumps({**ok, "user_id": "x" * 257}).encode(), "out_of_range"),
        (b"u-bad", json.dumps({**ok, "ts": "2024-13-45T99:00:00Z"}).encode(), "bad_time"),
        (b"u-bad", json.dumps({**ok, "ts": 10**25}).encode(), "future"),
        (b"u-bad", json.dumps({k: v for k, v in ok.items() if k != "user_id"}).encode(), "missing_field"),
        (b"someone", json.dumps(ok).encode(), "wrong_key"),
    ]
    return out


def test_poison_is_dead_lettered_and_memory_stays_bounded(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    worker = make_worker().start()
    now = int(time.time() * 1000)
    baseline_kib = worker.rss_kib()
    bad = bad_messages(now)
    p = KafkaProducer(
        bootstrap_servers=kafka, linger_ms=20, batch_size=256 * 1024, max_request_size=1_000_000
    )
    valid = 0
    odd_events = []
    for i in range(DISTINCT_USERS):
        ev = {
            "event_id": f"v{i}",
            "user_id": f"user-{i:07d}",
            "type": "page_view",
            "ts": now - 3_600_000 + i % 1000,
        }
        p.send(settings.topic_clickstream, key=ev["user_id"].encode(), value=json.dumps(ev).encode())
        valid += 1
        if i % (DISTINCT_USERS // len(bad)) == 0 and i // (DISTINCT_USERS // len(bad)) < len(bad):
            key, value, _ = bad[i // (DISTINCT_USERS // len(bad))]
            p.send(settings.topic_clickstream, key=key, value=value)
    for j, uid in enumerate(ODD_IDS):
        for k in range(3):
            ev = {"event_id": f"odd{j}-{k}", "user_id": uid, "type": "product_view", "ts": now - 60_000 + k}
            odd_events.append(ev)
            p.send(settings.topic_clickstream, key=uid.encode(), value=json.dumps(ev).encode())
            valid += 1
    p.flush()
    p.close()

    peak_kib = 0
    not_ready = 0

    def all_consumed() -> bool:
        nonlocal peak_kib, not_ready
        peak_kib = max(peak_kib, worker.rss_kib())
        not_ready += 0 if worker.ready() else 1
        done = worker.metric("propstream_events_accepted_total") + worker.metric(
            "propstream_events_rejected_total"
        )
        return done >= valid + len(bad)

    t0 = time.monotonic()
    wait_until(all_consumed, 240, every_s=0.5, what="every message accepted or rejected")
    elapsed = time.monotonic() - t0
    assert worker.metric("propstream_events_accepted_total") == valid
    assert not_ready == 0, "the worker stopped being ready while fed poison"

    dead = read_topic(kafka, settings.topic_deadletter)
    assert len(dead) == len(bad)
    assert Counter(m.value for m in dead) == Counter(v for _, v, _ in bad)  # original bytes, each once
    for m in dead:
        headers = dict(m.headers)
        assert headers["propstream.reason"].decode() in REASONS
        assert headers["propstream.source.topic"].decode() == settings.topic_clickstream
    got = {m.value: dict(m.headers)["propstream.reason"].decode() for m in dead}
    for _, value, reason in bad:
        if reason is not None:
            assert got[value] == reason, (value[:80], got[value], reason)

    for uid in ODD_IDS:  # stored under the exact id, found again by it (percent-encoded in the URL)
        f = worker.features(urllib.parse.quote(uid, safe=""))
        assert f is not None and f["user_id"] == uid and f["events"] == 3, (uid, f)
    assert worker.features(f"user-{DISTINCT_USERS - 1:07d}")["events"] == 1  # type: ignore[index]

    final_kib = worker.rss_kib()
    print(
        f"{valid:,} valid + {len(bad)} bad in {elapsed:.0f}s; worker RSS baseline {baseline_kib / 1024:.0f} MiB, "
        f"peak {peak_kib / 1024:.0f} MiB, final {final_kib / 1024:.0f} MiB"
    )
    assert peak_kib < RSS_BOUND_MIB * 1024


def test_deeply_nested_message_does_not_stop_the_worker(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    worker = make_worker().start()
    now = int(time.time() * 1000)
    p = KafkaProducer(bootstrap_servers=kafka)
    p.send(settings.topic_clickstream, key=b"u1", value=b"[" * 1000 + b"]" * 1000)
    ev = {"event_id": "after", "user_id": "u1", "type": "page_view", "ts": now - 1000}
    p.send(settings.topic_clickstream, key=b"u1", value=json.dumps(ev).encode())
    p.flush()
    p.close()
    wait_until(lambda: worker.features("u1") is not None, 30, what="the valid event after the deep one")
    dead = read_topic(kafka, settings.topic_deadletter)
    assert [dict(m.headers)["propstream.reason"] for m in dead] == [b"not_json"]
    assert worker.ready()


def test_web_endpoint_loopback_validation_and_json_errors(make_worker: Any) -> None:
    worker: WorkerProc = make_worker(PROPSTREAM_API_TOKEN="t0ken").start()
    assert worker.listening_addresses() == {"127.0.0.1"}  # the default binds to loopback only
    auth = {"Authorization": "Bearer t0ken"}
    for path in ("/users/u1/features", "/users/u1"):
        status, body = worker.get(path)
        assert status == 401 and body["error"] == "unauthorized", (path, status, body)
        status, body = worker.get(path, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"] == "unauthorized"
        status, body = worker.get(path, headers=auth)
        assert status == 404 and body["error"] == "unknown_user"
    bad_ids = ["x" * 257, "%00", "a%0Ab", "%7F", "%C2%85"]  # too long; NUL, LF, DEL, NEL: control characters
    for raw in bad_ids:
        for path in (f"/users/{raw}/features", f"/users/{raw}"):
            status, body = worker.get(path, headers=auth)
            assert status == 400 and body["error"] == "bad_user_id", (path, status, body)
    # undecodable percent-escapes stay literal in the id: a valid (unknown) user, answered in JSON
    status, body = worker.get("/users/%ED%A0%80/features", headers=auth)
    assert status == 404 and body["error"] == "unknown_user"
    status, body = worker.get("/users/u1/features?as_of=yesterday", headers=auth)
    assert status in (400, 404) and "error" in body
    for path in ("/healthz", "/readyz", "/models"):
        status, body = worker.get(path)
        assert status == 200 and isinstance(body, dict), path
