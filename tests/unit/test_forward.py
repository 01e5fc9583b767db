"""The webhook contract without Kafka: backoff, classification, signatures, idempotency keys, rendering,
the retry/split loop, the HTTP client's failure reasons against a real local server, the documented
receiver snippets, and the command's refusals."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from streams.broker import free_port
from streams.cli import main
from streams.forward import Forwarder, forward_topics, shown_url
from streams.forward_metrics import ForwardMetrics
from streams.settings import Settings
from streams.webhook import (
    Abandoned,
    Answer,
    Event,
    Policy,
    Record,
    Reject,
    Skip,
    backoff_s,
    batch_key,
    classify,
    dead_letter_headers,
    deliver,
    idempotency_key,
    render,
    request_body,
    request_headers,
    retry_after_s,
    sign,
    verify,
)
from tests.conftest import ROOT

DOC = ROOT / "docs" / "activation.md"


def rec(
    value: bytes | None, key: bytes | None = b"u1", topic: str = "propensity.changes", **kw: Any
) -> Record:
    return Record(
        topic, kw.get("partition", 0), kw.get("offset", 0), key, value, tuple(kw.get("headers", ()))
    )


def events(n: int, bad: set[int] = frozenset()) -> list[Event]:  # type: ignore[assignment]
    out = []
    for i in range(n):
        value = json.dumps({"i": i, "bad": i in bad}).encode()
        e = render(rec(value, offset=i), "change")
        assert isinstance(e, Event)
        out.append(e)
    return out


# --- backoff ---------------------------------------------------------------------------------
@pytest.mark.parametrize("failures", [1, 2, 3, 5, 8, 12, 40])
def test_backoff_is_full_jitter_under_an_exponential_cap(failures: int) -> None:
    policy = Policy(attempts=8, backoff_s=0.5, backoff_max_s=60)
    cap = min(60.0, 0.5 * 2 ** (failures - 1))  # written out by hand: 0.5, 1, 2, 8, 60, 60, 60
    rng = random.Random(failures)
    waits = [backoff_s(failures, policy, rng) for _ in range(2000)]
    assert all(0 <= w <= cap for w in waits)
    # full jitter: spread over the whole range, not bunched at the cap (uniform: mean cap/2)
    assert min(waits) < 0.05 * cap and max(waits) > 0.95 * cap
    assert abs(sum(waits) / len(waits) - cap / 2) < 0.05 * cap


def test_retry_after_is_a_floor_up_to_the_longest_wait() -> None:
    policy = Policy(attempts=8, backoff_s=0.5, backoff_max_s=30)
    rng = random.Random(0)
    assert all(backoff_s(1, policy, rng, retry_after=7) >= 7 for _ in range(100))
    assert all(backoff_s(1, policy, rng, retry_after=3600) == 30 for _ in range(100))
    assert all(backoff_s(9, policy, rng, retry_after=1) <= 30 for _ in range(100))


def test_retry_after_parses_seconds_and_dates() -> None:
    assert retry_after_s("120", now_s=0) == 120.0
    assert retry_after_s(" 3 ", now_s=0) == 3.0
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 GMT", now_s=784111717) == 60.0  # 1994-11-06T08:48:37Z
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 GMT", now_s=784111777 + 100) == 0.0  # past: no wait
    assert retry_after_s(None, now_s=0) is None
    assert retry_after_s("-1", now_s=0) is None
    assert retry_after_s("later", now_s=0) is None


# --- classification --------------------------------------------------------------------------
def test_classification_of_answers() -> None:
    assert [classify(s) for s in (200, 201, 202, 204, 299, 409)] == ["delivered"] * 6  # 409: had it already
    assert [classify(s) for s in (400, 413, 422)] == ["split"] * 3
    retried = (None, 301, 302, 307, 401, 403, 404, 405, 408, 410, 429, 500, 502, 503, 504)
    assert {classify(s) for s in retried} == {"retry"}


# --- signatures ------------------------------------------------------------------------------
def test_signature_is_an_hmac_of_timestamp_and_body_checkable_with_hmac_alone() -> None:
    secret = b"s3cret"
    evs = events(3)
    body = request_body(evs, sent_ts_ms=1_795_676_967_123)
    headers = request_headers(body, evs, secret, now_s=1_795_676_967)
    expected = hmac.new(secret, b"1795676967." + body, hashlib.sha256).hexdigest()
    assert headers["X-Propstream-Signature"] == f"sha256={expected}" == sign(secret, 1_795_676_967, body)
    assert headers["X-Propstream-Timestamp"] == "1795676967"
    assert headers["Content-Type"] == "application/json"
    assert verify(secret, body, "1795676967", headers["X-Propstream-Signature"], now_s=1_795_676_970)
    assert not verify(b"other", body, "1795676967", headers["X-Propstream-Signature"], now_s=1_795_676_970)
    assert not verify(secret, body + b" ", "1795676967", headers["X-Propstream-Signature"], 1_795_676_970)
    assert not verify(secret, body, "1795676968", headers["X-Propstream-Signature"], now_s=1_795_676_970)
    assert not verify(secret, body, "1795676967", headers["X-Propstream-Signature"], now_s=1_795_677_300)
    assert not verify(secret, body, None, headers["X-Propstream-Signature"], now_s=1_795_676_970)
    # unsigned without a secret, and the batch key is the same for a retry of the same events
    unsigned = request_headers(body, evs, None, now_s=1)
    assert "X-Propstream-Signature" not in unsigned
    assert unsigned["Idempotency-Key"] == headers["Idempotency-Key"] == batch_key(events(3))
    assert batch_key(evs[:2]) != batch_key(evs)


def test_request_body_carries_the_events_in_order() -> None:
    evs = events(3)
    doc = json.loads(request_body(evs, sent_ts_ms=1_700_000_000_250))
    assert doc["schema"] == "propstream.webhook/1"
    assert doc["sent_at"] == "2023-11-14T22:13:20.250Z"
    assert [e["event"]["i"] for e in doc["events"]] == [0, 1, 2]
    first = doc["events"][0]
    assert first == {
        "idempotency_key": evs[0].idempotency_key,
        "topic": "propensity.changes",
        "partition": 0,
        "offset": 0,
        "kind": "change",
        "key": "u1",
        "event": {"i": 0, "bad": False},
    }


# --- idempotency keys ------------------------------------------------------------------------
def test_idempotency_key_is_stable_for_the_same_content_and_distinct_otherwise() -> None:
    base = rec(b'{"a":1}', headers=[("propstream.event", b"entered"), ("traceparent", b"00-1")])
    same = [
        rec(
            b'{"a":1}',
            headers=[("propstream.event", b"entered"), ("traceparent", b"00-1")],
            partition=3,
            offset=9,
        ),
        rec(b'{"a":1}', headers=[("propstream.event", b"entered"), ("traceparent", b"00-2")]),  # not ours
        rec(b'{"a":1}', headers=[("traceparent", b"00-1"), ("propstream.event", b"entered")]),  # order
    ]
    for r in same:
        assert idempotency_key(r) == idempotency_key(base)
    different = [
        rec(b'{"a":2}', headers=[("propstream.event", b"entered")]),
        rec(b'{"a":1}', key=b"u2", headers=[("propstream.event", b"entered")]),
        rec(b'{"a":1}', topic="propensity.triggers", headers=[("propstream.event", b"entered")]),
        rec(b'{"a":1}', headers=[("propstream.event", b"left")]),
        rec(b'{"a":1}'),
        rec(None, headers=[("propstream.event", b"entered")]),
        rec(b"", headers=[("propstream.event", b"entered")]),
    ]
    keys = {idempotency_key(r) for r in different} | {idempotency_key(base)}
    assert len(keys) == len(different) + 1
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)
    # length-prefixed: moving bytes between key and value is another record
    assert idempotency_key(rec(b"c", key=b"ab")) != idempotency_key(rec(b"bc", key=b"a"))
    assert idempotency_key(rec(b"x", key=None)) != idempotency_key(rec(b"x", key=b""))


@given(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), unique=True, max_size=40))
def test_distinct_key_value_pairs_get_distinct_idempotency_keys(pairs: list[tuple[bytes, bytes]]) -> None:
    keys = {idempotency_key(rec(v, key=k)) for k, v in pairs}
    assert len(keys) == len(pairs)


# --- rendering -------------------------------------------------------------------------------
LEFT_HEADERS = [  # as streams/erasure.py writes them
    ("propstream.event", b"left"),
    ("propstream.audience", b"at_risk"),
    ("propstream.user", b"u|1"),
    ("propstream.event_ts_ms", b"1795667300000"),
    ("propstream.trigger", b"erasure"),
    ("propstream.reason", b"erasure"),
]


def test_a_left_tombstone_is_rendered_from_its_headers() -> None:
    out = render(
        rec(None, key=b"at_risk|u|1", topic="propensity.audiences", headers=LEFT_HEADERS), "audience"
    )
    assert isinstance(out, Event)
    assert out.kind == "audience"
    assert out.event == {
        "event": "left",
        "audience": "at_risk",
        "user_id": "u|1",
        "event_ts_ms": 1795667300000,
        "reason": "erasure",
        "trigger": "erasure",
    }
    assert out.as_json()["key"] == "at_risk|u|1"
    # without the audience and user headers, the key is split on its first "|"
    bare = render(rec(None, key=b"at_risk|u|1", headers=LEFT_HEADERS[:1]), "audience")
    assert isinstance(bare, Event)
    assert bare.event == {
        "event": "left",
        "audience": "at_risk",
        "user_id": "u|1",
        "event_ts_ms": None,
        "reason": None,
    }
    # and a left event whose key says nothing is a dead letter, not a guess
    assert isinstance(render(rec(None, key=b"u1", headers=LEFT_HEADERS[:1]), "audience"), Reject)
    bad_ts = [*LEFT_HEADERS[:4], ("propstream.event_ts_ms", b"soon")]
    assert render(rec(None, key=b"a|u", headers=bad_ts), "audience") == Reject(
        "bad_left", "propstream.event_ts_ms is not an integer: 'soon'"
    )


def test_tombstones_are_skipped_and_values_are_passed_as_they_are() -> None:
    assert render(rec(None), "change") == Skip("tombstone")
    assert render(rec(None), "trigger") == Skip("tombstone")
    assert render(rec(None, key=b"a|u", headers=[("propstream.event", b"entered")]), "audience") == Skip(
        "tombstone"
    )
    assert render(rec(None, key=b"a|u"), "audience") == Skip("tombstone")
    entered = {"event": "entered", "audience": "at_risk", "user_id": "u1", "event_ts_ms": 1, "score": 0.7}
    out = render(rec(json.dumps(entered).encode(), key=b"at_risk|u1"), "audience")
    assert isinstance(out, Event) and out.event == entered
    assert isinstance(r := render(rec(b"\xff\xfe"), "change"), Reject) and r.reason == "not_utf8"
    assert isinstance(r := render(rec(b"{nope"), "trigger"), Reject) and r.reason == "not_json"
    assert isinstance(r := render(rec(b"[1, 2]"), "change"), Reject) and r.reason == "not_object"


def test_dead_letter_headers_keep_the_originals_and_say_why() -> None:
    r = rec(
        None, key=b"at_risk|u|1", topic="propensity.audiences", partition=2, offset=41, headers=LEFT_HEADERS
    )
    h = dead_letter_headers(r, "http_500", "HTTP 500 Internal Server Error: boom", 8, "k" * 32)
    names = [k for k, _ in h]
    assert names[:6] == [
        "propstream.event",
        "propstream.audience",
        "propstream.user",
        "propstream.event_ts_ms",
        "propstream.trigger",
        "propstream.original.reason",  # the left event's own reason, renamed
    ]
    ours = dict(h[6:])
    assert ours == {
        "propstream.reason": b"http_500",
        "propstream.detail": b"HTTP 500 Internal Server Error: boom",
        "propstream.source.topic": b"propensity.audiences",
        "propstream.source.partition": b"2",
        "propstream.source.offset": b"41",
        "propstream.attempts": b"8",
        "propstream.idempotency_key": b"k" * 32,
    }
    assert len(dict(dead_letter_headers(r, "x", "d" * 5000, 1, "k"))["propstream.detail"]) == 1024


# --- the retry and split loop ----------------------------------------------------------------
class Script:
    """A fake receiver: answers in order from ``answers`` (then 200), recording every request."""

    def __init__(self, *answers: Answer, judge: Any = None) -> None:
        self.answers = list(answers)
        self.judge = judge
        self.requests: list[list[int]] = []

    async def post(self, chunk: Sequence[Event]) -> Answer:
        self.requests.append([e.event["i"] for e in chunk])
        if self.judge is not None:
            return self.judge(chunk)  # type: ignore[no-any-return]
        return self.answers.pop(0) if self.answers else Answer(200, "ok")


def run_deliver(evs: list[Event], script: Script, policy: Policy, stop_after: int | None = None) -> Any:
    waits: list[float] = []
    reports: list[tuple[str, int, int, str, float]] = []

    async def wait(s: float) -> None:
        waits.append(s)

    def stopped() -> bool:
        return stop_after is not None and len(script.requests) >= stop_after

    def report(answer: Answer, n: int, attempt: int, action: str, delay: float) -> None:
        reports.append((answer.reason, n, attempt, action, delay))

    result = asyncio.run(
        deliver(evs, script.post, policy, rng=random.Random(7), wait=wait, stopped=stopped, report=report)
    )
    return result, waits, reports


def test_failures_are_retried_until_delivered_with_the_waits_reported() -> None:
    script = Script(
        Answer(None, "connect"), Answer(None, "timeout"), Answer(503, "http_503", retry_after_s=2)
    )
    (delivered, failed), waits, reports = run_deliver(events(5), script, Policy(8, 0.5, 60))
    assert [e.event["i"] for e in delivered] == [0, 1, 2, 3, 4] and failed == []
    assert script.requests == [[0, 1, 2, 3, 4]] * 4
    assert [r[:4] for r in reports] == [
        ("connect", 5, 1, "retry"),
        ("timeout", 5, 2, "retry"),
        ("http_503", 5, 3, "retry"),
    ]
    assert waits == [r[4] for r in reports]
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 1.0 and waits[2] >= 2.0  # Retry-After honoured


def test_after_the_last_attempt_the_events_fail_with_the_last_reason() -> None:
    script = Script(judge=lambda chunk: Answer(500, "http_500", "HTTP 500: boom"))
    (delivered, failed), waits, reports = run_deliver(events(4), script, Policy(3, 0.01, 0.02))
    assert delivered == [] and len(script.requests) == 3 and len(waits) == 2
    assert len(failed) == 1
    assert [e.event["i"] for e in failed[0].events] == [0, 1, 2, 3]
    assert (failed[0].reason, failed[0].detail, failed[0].attempts) == ("http_500", "HTTP 500: boom", 3)
    assert reports[-1][3] == "dead_letter"


def test_a_refused_batch_is_halved_until_the_refused_events_are_alone() -> None:
    bad = {3, 10}

    def judge(chunk: Sequence[Event]) -> Answer:
        return (
            Answer(400, "http_400", "bad field") if any(e.event["bad"] for e in chunk) else Answer(200, "ok")
        )

    script = Script(judge=judge)
    (delivered, failed), waits, _ = run_deliver(events(16, bad), script, Policy(8, 0.5, 60))
    assert [e.event["i"] for e in delivered] == [i for i in range(16) if i not in bad]  # order kept
    assert sorted((f.events[0].event["i"], f.reason, f.attempts) for f in failed) == [
        (3, "http_400", 1),
        (10, "http_400", 1),
    ]
    assert waits == []  # a refusal is not retried
    # every event went out in one accepted request, no more
    accepted = [i for req in script.requests if not any(i in bad for i in req) for i in req]
    assert sorted(accepted) == [i for i in range(16) if i not in bad]
    assert len(script.requests) <= 2 * 2 * 4 + 1  # two bisections of depth log2(16)


def test_too_large_requests_are_split() -> None:
    script = Script(judge=lambda c: Answer(413, "http_413") if len(c) > 3 else Answer(204, "ok"))
    (delivered, failed), _, _ = run_deliver(events(10), script, Policy(8, 0.5, 60))
    assert [e.event["i"] for e in delivered] == list(range(10)) and failed == []
    assert script.requests == [
        list(range(10)),
        [0, 1, 2, 3, 4],
        [0, 1],
        [2, 3, 4],
        [5, 6, 7, 8, 9],
        [5, 6],
        [7, 8, 9],
    ]


def test_stopping_abandons_the_batch_before_the_next_request() -> None:
    script = Script(judge=lambda chunk: Answer(500, "http_500"))
    with pytest.raises(Abandoned):
        run_deliver(events(3), script, Policy(100, 0.01, 0.02), stop_after=2)
    assert len(script.requests) == 2


def test_nothing_to_send_sends_nothing() -> None:
    script = Script()
    (delivered, failed), _, _ = run_deliver([], script, Policy(8, 0.5, 60))
    assert (delivered, failed, script.requests) == ([], [], [])


# --- the HTTP client against a real local server ---------------------------------------------
def test_post_names_each_failure_and_sends_a_verifiable_request(tmp_path: Path) -> None:
    seen: list[tuple[bytes, dict[str, str]]] = []

    async def scenario() -> list[Answer]:
        async def hook(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            seen.append((body, dict(request.headers)))
            mode = request.query.get("mode")
            if mode == "slow":
                await asyncio.sleep(2)
            if mode == "drop":
                assert request.transport is not None
                request.transport.close()
                await asyncio.sleep(0.5)
            if mode == "busy":
                return web.Response(status=429, text="slow down", headers={"Retry-After": "3"})
            if mode == "moved":
                raise web.HTTPFound("https://elsewhere.example/")
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        closed = free_port()
        answers = []
        try:
            for url in [
                f"http://127.0.0.1:{port}/hook",
                f"http://127.0.0.1:{port}/hook?mode=slow",
                f"http://127.0.0.1:{port}/hook?mode=drop",
                f"http://127.0.0.1:{port}/hook?mode=busy",
                f"http://127.0.0.1:{port}/hook?mode=moved",
                f"http://127.0.0.1:{closed}/hook",
            ]:
                s = Settings(forward_url=url, forward_timeout_s=0.5, forward_secret="k", home=tmp_path)
                fw = Forwarder(s, ForwardMetrics(CollectorRegistry()))
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
                    answers.append(await fw._post(session, events(2)))
        finally:
            await runner.cleanup()
        return answers

    answers = asyncio.run(scenario())
    assert [(a.status, a.reason) for a in answers] == [
        (204, "ok"),
        (None, "timeout"),
        (None, "disconnected"),
        (429, "http_429"),
        (302, "http_302"),  # not followed
        (None, "connect"),
    ]
    assert answers[3].retry_after_s == 3.0 and "slow down" in answers[3].detail
    body, headers = seen[0]
    ts = headers["X-Propstream-Timestamp"]
    assert (
        headers["X-Propstream-Signature"]
        == "sha256=" + hmac.new(b"k", ts.encode() + b"." + body, "sha256").hexdigest()
    )
    assert abs(int(ts) - time.time()) < 60
    assert [e["event"]["i"] for e in json.loads(body)["events"]] == [0, 1]


# --- metrics, topics, URLs -------------------------------------------------------------------
def test_metrics_live_on_the_given_registry_and_pass_promtool() -> None:
    registry = CollectorRegistry()
    m = ForwardMetrics(registry)
    m.sent.labels("change").inc(3)
    m.failed.labels("timeout").inc()
    m.dead_letters.labels("http_500").inc(2)
    m.skipped.labels("propensity.changes", "tombstone").inc()
    m.lag.labels("propensity.changes").set(7)
    m.request_seconds.observe(0.2)
    text = generate_latest(registry)
    for name in (
        b"propstream_forward_sent_total",
        b"propstream_forward_failed_total",
        b"propstream_forward_deadletter_total",
        b"propstream_forward_lag",
    ):
        assert name in text
    ForwardMetrics(CollectorRegistry())  # a second instance does not clash: nothing is global
    promtool = shutil.which("promtool")
    if promtool is not None:
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_default_topics_and_url_shown_without_secrets(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    assert forward_topics(s) == ["propensity.changes", "propensity.triggers", "propensity.audiences"]
    assert forward_topics(Settings(home=tmp_path, forward_topics=" a, b ,")) == ["a", "b"]
    assert shown_url("http://u:p@h/x?token=t") == "http://h/x"


# --- the snippets of docs/activation.md ------------------------------------------------------
def snippet(name: str) -> str:
    match = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"no snippet {name} in {DOC}"
    return match.group(1)


def test_the_documented_verification_accepts_our_signature_and_refuses_the_rest() -> None:
    ns: dict[str, Any] = {}
    exec(snippet("verify"), ns)
    check = ns["verify_propstream"]
    body = request_body(events(2), int(time.time() * 1000))
    now = int(time.time())
    good = request_headers(body, events(2), b"k", now)
    assert check(b"k", body, good)
    assert not check(b"other", body, good)
    assert not check(b"k", body.replace(b'"i":0', b'"i":9'), good)
    assert not check(b"k", body, request_headers(body, events(2), b"k", now - 301))  # a replay
    assert not check(b"k", body, {**good, "X-Propstream-Timestamp": str(now + 1)})
    assert not check(b"k", body, {})


def test_the_documented_receiver_sends_one_email_per_entered_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROPSTREAM_FORWARD_SECRET", "k")
    monkeypatch.setenv("SEEN_DB", str(tmp_path / "seen.sqlite"))
    ns: dict[str, Any] = {"__name__": "receiver"}
    exec(snippet("verify") + snippet("receiver"), ns)
    emails: list[str] = []
    ns["send_winback"] = emails.append
    now_ms = int(time.time() * 1000)

    def audience(user: str, what: str, audience: str = "at_risk", age_ms: int = 0) -> Event:
        value = {"event": what, "audience": audience, "user_id": user, "event_ts_ms": now_ms - age_ms}
        e = render(rec(json.dumps(value).encode(), key=f"{audience}|{user}".encode()), "audience")
        assert isinstance(e, Event)
        return e

    batch = [
        audience("u1", "entered"),
        audience("u2", "entered", audience="high_intent"),
        audience("u3", "entered", age_ms=3 * 86_400_000),  # from a new group's catch-up: too old
        *events(1),  # a change event
        audience("u4", "entered"),
    ]
    server = HTTPServer(("127.0.0.1", 0), ns["Hook"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    def post(evs: list[Event], secret: bytes = b"k") -> int:
        body = request_body(evs, now_ms)
        req = urllib.request.Request(url, body, request_headers(body, evs, secret, int(time.time())))
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert post(batch, secret=b"wrong") == 401
        assert emails == []
        assert post(batch) == 204
        assert post(batch[::-1]) == 204  # a redelivery, in another request
        assert post([audience("u1", "left")]) == 204
    finally:
        server.shutdown()
    assert emails == ["u1", "u4"]


# --- the command -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PROPSTREAM_FORWARD_URL": ""}, "no webhook: set PROPSTREAM_FORWARD_URL or --url"),
        ({"PROPSTREAM_FORWARD_URL": "hooks.example.com/in"}, "must be http(s)"),
        (
            {"PROPSTREAM_FORWARD_URL": "https://h/in", "PROPSTREAM_FORWARD_BACKOFF_MAX_S": "0.1"},
            "PROPSTREAM_FORWARD_BACKOFF_MAX_S (0.1s) is below PROPSTREAM_FORWARD_BACKOFF_S (0.5s)",
        ),
    ],
)
def test_forward_refuses_a_missing_or_bad_url(env: dict[str, str], message: str) -> None:
    result = CliRunner().invoke(main, ["forward"], env={"PROPSTREAM_BOOTSTRAP": "127.0.0.1:9", **env})
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_forward_help_names_every_variable() -> None:
    result = CliRunner().invoke(main, ["forward", "--help"])
    assert result.exit_code == 0
    for var in (
        "PROPSTREAM_FORWARD_URL",
        "PROPSTREAM_FORWARD_TOPICS",
        "PROPSTREAM_FORWARD_ATTEMPTS",
        "PROPSTREAM_FORWARD_START_AT",
        "PROPSTREAM_FORWARD_METRICS_PORT",
        "PROPSTREAM_BOOTSTRAP",
    ):
        assert var in result.output
    assert "--secret" not in result.output  # the secret comes from the environment only
