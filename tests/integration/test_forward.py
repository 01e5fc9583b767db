"""`propstream forward` as a real process, against a real broker and a real HTTP server run by the test.

The server is scripted to refuse connections (not listening yet), drop one, stall past the timeout,
answer 500, and then recover; every assertion compares what it received with what the test
produced (offsets from the producer, values and left events written out here), never with the
forwarder's own code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams.broker import free_port
from streams.settings import Settings
from tests.integration.harness import WorkerProc, consume_all, wait_settled, wait_until

pytestmark = pytest.mark.integration

SECRET = b"integration-secret"
FAST = {  # short waits, so a test of many failures stays well under 30 s
    "PROPSTREAM_FORWARD_SECRET": SECRET.decode(),
    "PROPSTREAM_FORWARD_TIMEOUT_S": "1",
    "PROPSTREAM_FORWARD_BACKOFF_S": "0.05",
    "PROPSTREAM_FORWARD_BACKOFF_MAX_S": "0.2",
}


class Hook:
    """A webhook on ``port`` that answers its first requests as ``script`` says, then 200.

    drop: read the body, close the connection without an answer; slow: answer 200 after 1.5 s
    (past the forwarder's 1 s timeout); 500: answer 500; fail: answer 500 to everything.
    """

    def __init__(self, port: int, script: list[str]) -> None:
        self.port = port
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    mode = hook.script.pop(0) if hook.script else "ok"
                    if mode == "fail":
                        hook.script.insert(0, "fail")
                    hook.requests.append(
                        {"mode": mode, "headers": dict(self.headers), "body": body, "at": time.time()}
                    )
                if mode == "drop":
                    self.close_connection = True
                    return
                if mode == "slow":
                    time.sleep(1.5)
                status = 500 if mode in ("500", "fail") else 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the forwarder gave up on a slow answer
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict[str, Any]]:
        """Events of the requests answered 200 at once (the forwarder saw them delivered), in order."""
        with self.lock:
            done = [r for r in self.requests if r["mode"] == "ok"]
        return [e for r in done for e in json.loads(r["body"])["events"]]

    def received(self) -> list[dict[str, Any]]:
        """Events of every request whose body arrived, answered or not."""
        with self.lock:
            return [e for r in self.requests for e in json.loads(r["body"])["events"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def forwarders(
    env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProc]]:
    procs: list[WorkerProc] = []

    def make(url: str, **extra: str) -> WorkerProc:
        name = f"forward-{len(procs) + 1}"
        w = WorkerProc(
            {**env, **FAST, "PROPSTREAM_FORWARD_URL": url, **extra},
            tmp_path / name,
            tmp_path / f"{name}.log",
            argv=("-m", "streams.cli", "forward"),
        )
        w.env["PROPSTREAM_FORWARD_METRICS_PORT"] = str(w.port)  # WorkerProc.metric() reads w.port
        procs.append(w)
        w.launch()
        wait_until(lambda: metrics_up(w), 60, what=f"forward's /metrics on {w.url} (log {w.log})")
        return w

    yield make
    for w in procs:
        w.kill()
    report = getattr(request.node, "propstream_call_report", None)
    if report is not None and report.failed:
        for w in procs:
            tail = w.log.read_text(errors="replace")[-15000:] if w.log.exists() else "(no log)"
            sys.stderr.write(f"\n----- {w.log.name} (last 15000 chars) -----\n{tail}\n")


def metrics_up(w: WorkerProc) -> bool:
    if w.proc is not None and w.proc.poll() is not None:
        raise AssertionError(f"forward exited with {w.proc.returncode}:\n{w.log.read_text()[-3000:]}")
    try:
        w.metric("propstream_forward_sent_total")
        return True
    except OSError:
        return False


class Produced:
    """What the test wrote, by (topic, partition, offset): the record and the event a receiver should get."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.records: dict[tuple[str, int, int], dict[str, Any]] = {}

    def send(
        self,
        topic: str,
        key: str,
        value: Any,
        headers: list[tuple[str, bytes]] | None = None,
        expect: Any = None,
    ) -> tuple[str, int, int]:
        raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
        meta = self.producer.send(topic, key=key.encode(), value=raw, headers=headers or []).get(timeout=30)
        where = (meta.topic, meta.partition, meta.offset)
        self.records[where] = {"key": key, "value": raw, "headers": headers or [], "expect": expect}
        return where

    def expected(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        return {k: r for k, r in self.records.items() if r["expect"] is not None}

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def left_headers(audience: str, user: str, ts_ms: int, reason: str) -> list[tuple[str, bytes]]:
    return [
        ("propstream.event", b"left"),
        ("propstream.audience", audience.encode()),
        ("propstream.user", user.encode()),
        ("propstream.event_ts_ms", str(ts_ms).encode()),
        ("propstream.reason", reason.encode()),
    ]


def produce_mix(bootstrap: str, s: Settings) -> Produced:
    """Changes, triggers, audience entered events and left tombstones, erasure tombstones."""
    p = Produced(bootstrap)
    t0 = 1_795_600_000_000
    for i in range(24):
        user = f"u{i % 12:02d}"
        change = {"schema": "propstream.change/1", "user_id": user, "target": "purchase", "score": i / 24,
                  "event_id": f"e{i}", "event_ts_ms": t0 + i}  # fmt: skip
        p.send(s.topic_changes, user, change, expect=change)
    for i in range(12):
        user = f"u{i:02d}"
        trigger = {"schema": "propstream.trigger/1", "trigger": "cart_abandoned", "user_id": user,
                   "trigger_id": f"cart_abandoned:{t0 + i}", "event_ts_ms": t0 + i}  # fmt: skip
        p.send(s.topic_triggers, user, trigger, expect=trigger)
    for i in range(10):
        user = f"u{i:02d}"
        entered = {"event": "entered", "audience": "at_risk", "user_id": user, "event_ts_ms": t0 + 100 + i}
        p.send(
            s.topic_audiences, f"at_risk|{user}", entered, [("propstream.event", b"entered")], expect=entered
        )
    for i in range(5):
        user, reason = f"u{i:02d}", ("condition", "erasure")[i % 2]
        left = {
            "event": "left",
            "audience": "at_risk",
            "user_id": user,
            "event_ts_ms": t0 + 200 + i,
            "reason": reason,
        }
        p.send(
            s.topic_audiences,
            f"at_risk|{user}",
            None,
            left_headers("at_risk", user, t0 + 200 + i, reason),
            left,
        )
    for i in range(3):  # erasures: not events
        p.send(s.topic_changes, f"u{i:02d}", None)
    for i in range(2):
        p.send(s.topic_triggers, f"u{i:02d}", None)
    p.send(s.topic_audiences, "at_risk|u11", None)  # a null without the left header: not an event
    p.close()
    return p


def signed_by_secret(request: dict[str, Any]) -> bool:
    h = request["headers"]
    ts = h["X-Propstream-Timestamp"]
    mac = hmac.new(SECRET, ts.encode() + b"." + request["body"], hashlib.sha256).hexdigest()
    return h["X-Propstream-Signature"] == f"sha256={mac}" and abs(int(ts) - request["at"]) < 60


def test_forward_survives_a_refusing_dropping_stalling_failing_endpoint_and_loses_nothing(
    kafka: str, settings: Settings, forwarders: Callable[..., WorkerProc]
) -> None:
    s = settings
    produced = produce_mix(kafka, s)
    expected = produced.expected()
    assert len(expected) == 24 + 12 + 10 + 5
    port = free_port()  # nobody listens yet: connections are refused
    w = forwarders(
        f"http://127.0.0.1:{port}/hook", PROPSTREAM_FORWARD_ATTEMPTS="1000", PROPSTREAM_FORWARD_BATCH="20"
    )
    wait_until(
        lambda: w.metric("propstream_forward_failed_total", reason="connect") >= 2, 30, what="refusals"
    )
    wait_until(lambda: w.metric("propstream_forward_lag") > 0, 15, what="the lag to show the held batch")
    hook = Hook(port, ["drop", "slow", "500"])
    try:
        want = {(t, p, o) for t, p, o in expected}
        wait_until(
            lambda: want <= {(e["topic"], e["partition"], e["offset"]) for e in hook.delivered()},
            30,
            what="every produced event in a request answered 200",
        )
        wait_settled(kafka, f"{s.app_id}-forward", [s.topic_changes, s.topic_triggers, s.topic_audiences], 30)

        # every copy of an event is the produced event, and carries one key; different events, different keys
        keys: dict[tuple[str, int, int], set[str]] = defaultdict(set)
        for e in hook.received():
            where = (e["topic"], e["partition"], e["offset"])
            assert where in expected, f"{where} was delivered but is no event: {e}"
            assert e["event"] == expected[where]["expect"]
            assert e["key"] == produced.records[where]["key"]
            assert e["kind"] == {s.topic_changes: "change", s.topic_triggers: "trigger"}.get(
                e["topic"], "audience"
            )
            keys[where].add(e["idempotency_key"])
        assert all(len(k) == 1 for k in keys.values()), {w: k for w, k in keys.items() if len(k) > 1}
        assert len({next(iter(k)) for k in keys.values()}) == len(expected)
        copies = defaultdict(int)
        for e in hook.received():
            copies[(e["topic"], e["partition"], e["offset"])] += 1
        assert max(copies.values()) >= 2, "the dropped and the stalled requests were received: duplicates"
        # per partition, the accepted requests went in offset order (per key order)
        last: dict[tuple[str, int], int] = {}
        for e in hook.delivered():
            tp = (e["topic"], e["partition"])
            assert e["offset"] > last.get(tp, -1), f"{tp}: {e['offset']} after {last[tp]}"
            last[tp] = e["offset"]
        # every request was signed with the secret, over its timestamp and exact body
        assert hook.requests and all(signed_by_secret(r) for r in hook.requests)
        assert [r["mode"] for r in hook.requests[:3]] == ["drop", "slow", "500"]

        for reason in ("connect", "disconnected", "timeout", "http_500"):
            assert w.metric("propstream_forward_failed_total", reason=reason) >= 1, reason
        assert w.metric("propstream_forward_sent_total", kind="change") == 24
        assert w.metric("propstream_forward_sent_total", kind="trigger") == 12
        assert w.metric("propstream_forward_sent_total", kind="audience") == 15
        assert w.metric("propstream_forward_skipped_total", topic=s.topic_changes) == 3
        assert w.metric("propstream_forward_skipped_total", topic=s.topic_triggers) == 2
        assert w.metric("propstream_forward_skipped_total", topic=s.topic_audiences) == 1
        assert w.metric("propstream_forward_deadletter_total") == 0
        wait_until(lambda: w.metric("propstream_forward_lag") == 0, 15, what="the lag to drop to 0")
    finally:
        hook.close()
    w.stop()
    assert w.proc is not None and w.proc.returncode == 0, w.log.read_text()[-3000:]
    log = w.log.read_text()
    assert f"to http://127.0.0.1:{port}/hook (signed)" in log
    assert SECRET.decode() not in log


def test_forward_dead_letters_what_an_always_failing_endpoint_never_takes_and_moves_on(
    kafka: str, settings: Settings, forwarders: Callable[..., WorkerProc]
) -> None:
    s = settings
    p = Produced(kafka)
    sent = [p.send(s.topic_changes, f"u{i}", {"user_id": f"u{i}", "i": i}, expect=True) for i in range(10)]
    left = p.send(
        s.topic_audiences, "at_risk|u1", None, left_headers("at_risk", "u1", 5, "erasure"), expect=True
    )
    bad = p.send(s.topic_triggers, "u1", b"{not json")
    p.close()
    hook = Hook(free_port(), ["fail"])
    try:
        w = forwarders(f"http://127.0.0.1:{hook.port}/", PROPSTREAM_FORWARD_ATTEMPTS="2")
        dead = consume_all(kafka, s.topic_forward_deadletter, expect=12, timeout_s=30)
        assert len(dead) == 12
        by_source = {}
        for m in dead:
            h = dict(m.headers)
            where = (
                h["propstream.source.topic"].decode(),
                int(h["propstream.source.partition"]),
                int(h["propstream.source.offset"]),
            )
            by_source[where] = (m, h)
            original = p.records[where]
            assert (m.key, m.value) == (original["key"].encode(), original["value"])
        assert set(by_source) == {*sent, left, bad}
        for where in [*sent, left]:
            _, h = by_source[where]
            assert h["propstream.reason"] == b"http_500"
            assert h["propstream.attempts"] == b"2"
            assert h["propstream.detail"].startswith(b"HTTP 500")
        _, h = by_source[bad]
        assert (h["propstream.reason"], h["propstream.attempts"]) == (b"not_json", b"0")
        _, h = by_source[left]  # the left tombstone's own reason is kept, renamed
        assert h["propstream.original.reason"] == b"erasure" and h["propstream.event"] == b"left"
        # each event was tried exactly twice; the record that is no event never went out
        tries = defaultdict(int)
        for e in hook.received():
            tries[(e["topic"], e["partition"], e["offset"])] += 1
        assert tries == {where: 2 for where in [*sent, left]}
        # the offsets moved on past the dead letters
        wait_settled(kafka, f"{s.app_id}-forward", [s.topic_changes, s.topic_triggers, s.topic_audiences], 30)
        assert w.metric("propstream_forward_deadletter_total", reason="http_500") == 11
        assert w.metric("propstream_forward_deadletter_total", reason="not_json") == 1
        assert w.metric("propstream_forward_failed_total", reason="http_500") >= 2
        assert w.metric("propstream_forward_sent_total") == 0
        assert w.alive()
    finally:
        hook.close()


def test_sigterm_abandons_the_batch_uncommitted_and_the_next_process_sends_it_with_the_same_keys(
    kafka: str, settings: Settings, forwarders: Callable[..., WorkerProc]
) -> None:
    s = settings
    p = Produced(kafka)
    sent = {p.send(s.topic_changes, f"u{i}", {"user_id": f"u{i}", "i": i}, expect=True) for i in range(5)}
    p.close()
    hook = Hook(free_port(), ["fail"])
    try:
        first = forwarders(f"http://127.0.0.1:{hook.port}/", PROPSTREAM_FORWARD_ATTEMPTS="1000")
        wait_until(lambda: len(hook.requests) >= 3, 30, what="a few failed tries")
        t0 = time.monotonic()
        first.stop()
        assert first.proc is not None and first.proc.returncode == 0
        assert time.monotonic() - t0 < 10, "a retrying batch must not hold up a shutdown"
        group = f"{s.app_id}-forward"
        c = KafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
        try:
            assert all(c.committed(TopicPartition(t, n)) is None for t, n, _ in sent), "nothing was delivered"
        finally:
            c.close()
        before = {(e["topic"], e["partition"], e["offset"]): e["idempotency_key"] for e in hook.received()}
        assert before and set(before) <= sent  # the batch out (all 5, unless the first fetch was partial)
        with hook.lock:
            hook.script = []  # recovered
        forwarders(f"http://127.0.0.1:{hook.port}/")
        wait_until(lambda: sent <= {(e["topic"], e["partition"], e["offset"]) for e in hook.delivered()}, 30)
        after = {(e["topic"], e["partition"], e["offset"]): e["idempotency_key"] for e in hook.delivered()}
        assert {k: after[k] for k in before} == before  # the same events, the same keys, another process
        wait_settled(kafka, group, [s.topic_changes], 30)
    finally:
        hook.close()


def test_forward_refuses_a_topic_that_does_not_exist(
    env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    w = WorkerProc(
        {**env, "PROPSTREAM_FORWARD_URL": "http://127.0.0.1:9/", "PROPSTREAM_FORWARD_METRICS_PORT": "0"},
        tmp_path,
        tmp_path / "forward.log",
    )
    out = w.cli("forward", "--topics", f"{settings.topic_changes},no.such.topic", timeout_s=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "topic(s) no.such.topic do not exist (PROPSTREAM_FORWARD_TOPICS)" in out.stderr


def test_two_forwarders_share_the_partitions_and_a_rebalance_abandons_the_batch_out(
    kafka: str, settings: Settings, forwarders: Callable[..., WorkerProc]
) -> None:
    s = settings
    p = Produced(kafka)
    sent = {p.send(s.topic_changes, f"u{i}", {"user_id": f"u{i}", "i": i}, expect=True) for i in range(40)}
    p.close()
    hook = Hook(free_port(), ["fail"])
    try:
        url = f"http://127.0.0.1:{hook.port}/"
        a = forwarders(url, PROPSTREAM_FORWARD_ATTEMPTS="1000")
        wait_until(lambda: len(hook.requests) >= 2, 30, what="a's first failures")
        b = forwarders(url, PROPSTREAM_FORWARD_ATTEMPTS="1000")
        # the join revokes a's partitions while its batch is being retried: it lets the batch go
        wait_until(lambda: "abandoned a batch" in a.log.read_text(), 30, what="a to abandon its batch")
        wait_until(
            lambda: "assigned 6 partitions" in b.log.read_text(), 30, what="b to get half the partitions"
        )
        with hook.lock:
            hook.script = []  # recovered
        wait_until(lambda: sent <= {(e["topic"], e["partition"], e["offset"]) for e in hook.delivered()}, 30)
        wait_settled(kafka, f"{s.app_id}-forward", [s.topic_changes, s.topic_triggers, s.topic_audiences], 30)
        keys: dict[tuple[str, int, int], set[str]] = defaultdict(set)
        for e in hook.received():
            keys[(e["topic"], e["partition"], e["offset"])].add(e["idempotency_key"])
        assert set(keys) == sent and all(len(k) == 1 for k in keys.values())
        by_a, by_b = a.metric("propstream_forward_sent_total"), b.metric("propstream_forward_sent_total")
        assert (
            by_a > 0 and by_b > 0 and by_a + by_b == 40
        )  # each event accepted once, by its partition's owner
    finally:
        hook.close()
