"""The webhook contract of ``propstream forward``: events, idempotency keys, signatures, retry policy.

Pure: no Kafka, no sockets and no clock or randomness of its own (the caller passes the time, the
random source and the HTTP call), so every rule here is unit-tested without a broker and
``streams/forward.py`` only wires it to aiokafka and aiohttp. The contract is documented in
docs/activation.md; a receiver checks a request with :func:`verify` or the standard-library
snippet there.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

SCHEMA = "propstream.webhook/1"
SIGNATURE_HEADER = "X-Propstream-Signature"
TIMESTAMP_HEADER = "X-Propstream-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
KEY_BYTES = 16  # 128 bits of sha256: collisions are out of reach for any stream we will see
HEADER_PREFIX = "propstream."

Kind = Literal["change", "trigger", "audience", "event"]


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as consumed: where it came from and its raw key, value and headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` as text, or None."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v.decode("utf-8", "replace")
        return found


@dataclass(frozen=True, slots=True)
class Event:
    """A record rendered for the webhook."""

    record: Record
    kind: Kind
    idempotency_key: str
    event: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        r = self.record
        key = None if r.key is None else r.key.decode("utf-8", "replace")
        return {
            "idempotency_key": self.idempotency_key,
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "kind": self.kind,
            "key": key,
            "event": self.event,
        }


@dataclass(frozen=True, slots=True)
class Skip:
    """A record that is no event (an erasure tombstone): committed, counted, not sent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that cannot be rendered (not a JSON object): a dead letter at once."""

    reason: str
    detail: str


def idempotency_key(record: Record) -> str:
    """A key derived from the record's content: topic, key, value and its ``propstream.*`` headers.

    The same record read again (a redelivery, a retry, a replay of the topic) has the same key; the
    partition and offset are left out, so a byte-identical copy written twice (an at-least-once
    producer's resend) is recognised as the same event too. Fields are length-prefixed, so no two
    different records hash the same input.

    >>> r = Record("propensity.changes", 0, 7, b"u1", b'{"score": 0.7}')
    >>> idempotency_key(r) == idempotency_key(Record("propensity.changes", 3, 99, b"u1", b'{"score": 0.7}'))
    True
    >>> tombstone = Record("propensity.changes", 0, 7, b"u1", None)
    >>> len(idempotency_key(r)), idempotency_key(r) == idempotency_key(tombstone)
    (32, False)
    """
    h = hashlib.sha256()

    def part(b: bytes | None) -> None:
        h.update(b"-" if b is None else b"+%d:" % len(b) + b)

    part(record.topic.encode())
    part(record.key)
    part(record.value)
    for name, value in sorted((k, v) for k, v in record.headers if k.startswith(HEADER_PREFIX)):
        part(name.encode())
        part(value)
    return h.hexdigest()[: KEY_BYTES * 2]


def _left(record: Record) -> dict[str, Any] | Reject:
    """A ``left`` event from an audience tombstone's headers (from its key ``audience|user`` without them).

    ``trigger`` (event, silence, retention, erasure) is added when the tombstone's header has one.
    """
    audience, user = record.header("propstream.audience"), record.header("propstream.user")
    if audience is None or user is None:
        key = (record.key or b"").decode("utf-8", "replace")
        if "|" not in key:
            return Reject(
                "bad_left", f"no propstream.audience/user headers and key {key[:80]!r} is not audience|user"
            )
        from_key = key.split("|", 1)  # audience names are [a-z][a-z0-9_]*: the first | separates
        audience, user = audience or from_key[0], user or from_key[1]
    ts = record.header("propstream.event_ts_ms")
    ts_ms = None
    if ts is not None:
        try:
            ts_ms = int(ts)
        except ValueError:
            return Reject("bad_left", f"propstream.event_ts_ms is not an integer: {ts[:40]!r}")
    left = {
        "event": "left",
        "audience": audience,
        "user_id": user,
        "event_ts_ms": ts_ms,
        "reason": record.header("propstream.reason"),
    }
    trigger = record.header("propstream.trigger")
    if trigger:  # what rescored the user, as in an entered event
        left["trigger"] = trigger
    return left


def render(record: Record, kind: Kind) -> Event | Skip | Reject:
    """What the webhook receives for ``record``: an event, nothing (a tombstone), or a dead letter.

    A null value is an erasure tombstone on the change and trigger topics (not an event); on the
    audience topic it is a ``left`` event when its ``propstream.event`` header says so, rendered
    from the headers.

    >>> left = Record("propensity.audiences", 1, 5, b"at_risk|u1", None, (("propstream.event", b"left"),
    ...     ("propstream.audience", b"at_risk"), ("propstream.user", b"u1"),
    ...     ("propstream.event_ts_ms", b"1700000000000"), ("propstream.reason", b"condition")))
    >>> render(left, "audience").event  # doctest: +NORMALIZE_WHITESPACE
    {'event': 'left', 'audience': 'at_risk', 'user_id': 'u1', 'event_ts_ms': 1700000000000,
     'reason': 'condition'}
    >>> render(Record("propensity.changes", 0, 1, b"u1", None), "change")
    Skip(reason='tombstone')
    >>> render(Record("propensity.changes", 0, 2, b"u1", b"{oops"), "change").reason
    'not_json'
    """
    if record.value is None:
        if kind == "audience" and record.header("propstream.event") == "left":
            body = _left(record)
            if isinstance(body, Reject):
                return body
            return Event(record, kind, idempotency_key(record), body)
        return Skip("tombstone")
    try:
        text = record.value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject("not_utf8", str(exc))
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Reject("not_json", str(exc))
    if not isinstance(value, dict):
        return Reject("not_object", f"a JSON {type(value).__name__}, not an object")
    return Event(record, kind, idempotency_key(record), value)


def iso_ms(ts_ms: int) -> str:
    """``2023-11-14T22:13:20.000Z`` for epoch milliseconds.

    >>> iso_ms(1_700_000_000_000)
    '2023-11-14T22:13:20.000Z'
    """
    return (
        datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def request_body(events: Sequence[Event], sent_ts_ms: int) -> bytes:
    """The JSON body of one request: the events in consumption order, and when it was sent."""
    doc = {"schema": SCHEMA, "sent_at": iso_ms(sent_ts_ms), "events": [e.as_json() for e in events]}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def batch_key(events: Iterable[Event]) -> str:
    """The request's ``Idempotency-Key``: the same for a retry of the same events."""
    return hashlib.sha256(",".join(e.idempotency_key for e in events).encode()).hexdigest()[: KEY_BYTES * 2]


def sign(secret: bytes, timestamp_s: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret`` (as Stripe signs).

    Signing the timestamp with the body lets a receiver refuse a replayed request whose timestamp
    is old, since an attacker cannot change it without the secret.

    >>> sign(b"k", 1700000000, b'{"events":[]}')[:15]
    'sha256=fad0a656'
    """
    mac = hmac.new(secret, b"%d." % timestamp_s + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def request_headers(body: bytes, events: Sequence[Event], secret: bytes | None, now_s: int) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(now_s),
        IDEMPOTENCY_HEADER: batch_key(events),
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(secret, now_s, body)
    return headers


def verify(
    secret: bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    now_s: float,
    tolerance_s: float = 300,
) -> bool:
    """A receiver's check: the signature matches and the timestamp is within ``tolerance_s`` of now.

    >>> body = b'{"events":[]}'
    >>> verify(b"k", body, "1700000000", sign(b"k", 1700000000, body), now_s=1700000010)
    True
    >>> verify(b"k", body, "1700000000", sign(b"k", 1700000000, body), now_s=1700009999)  # a replay
    False
    """
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    if abs(now_s - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


# --- what to do with an answer ----------------------------------------------------------------
Verdict = Literal["delivered", "retry", "split"]


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of one POST: an HTTP status, or None when no response came (``reason`` says why)."""

    status: int | None
    reason: str  # ok, http_<status>, connect, timeout, disconnected, tls, client_error
    detail: str = ""
    retry_after_s: float | None = None


def classify(status: int | None) -> Verdict:
    """2xx delivered, and 409 too (the receiver has this batch already: its Idempotency-Key, a
    redelivery after a lost answer); 400/413/422 split (the receiver refuses this content or its
    size: halve the batch to isolate what it refuses, a single refused event is a dead letter at
    once); anything else, no response included, is retried.

    401, 403 and 404 are retried too: they say the URL or the secret is wrong, which an operator
    fixes, not the events; dead-lettering at once would empty the stream into the dead-letter topic
    within seconds of a bad deploy. Redirects are not followed (a signed POST must not be replayed
    to another host): they are retried, and dead-lettered once the attempts run out.

    >>> [classify(s) for s in (200, 204, 409, 400, 413, 422)]
    ['delivered', 'delivered', 'delivered', 'split', 'split', 'split']
    >>> {classify(s) for s in (301, 401, 403, 404, 408, 429, 500, 503, None)}
    {'retry'}
    """
    if status is not None and (200 <= status < 300 or status == 409):
        return "delivered"
    if status in (400, 413, 422):
        return "split"
    return "retry"


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """Seconds to wait that a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None.

    >>> retry_after_s("7", 0), retry_after_s("soon", 0)
    (7.0, None)
    >>> retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now_s=1445412480)
    10.0
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)


@dataclass(frozen=True, slots=True)
class Policy:
    attempts: int  # tries of one batch before its events are dead letters
    backoff_s: float  # the first retry waits up to this long
    backoff_max_s: float  # no wait is longer


def backoff_s(failures: int, policy: Policy, rng: random.Random, retry_after: float | None = None) -> float:
    """The wait after the ``failures``-th failure in a row: exponential with full jitter, capped.

    Uniform in [0, min(max, base * 2**(failures-1))] (AWS's "full jitter": many forwarders that
    failed together do not retry together). A ``Retry-After`` the receiver sent is honoured as a
    floor, up to ``backoff_max_s``: a receiver cannot stall the stream for longer than the operator
    allows between two tries.

    >>> p = Policy(attempts=8, backoff_s=0.5, backoff_max_s=60)
    >>> all(0 <= backoff_s(3, p, random.Random(s)) <= 2.0 for s in range(100))
    True
    >>> backoff_s(1, p, random.Random(1), retry_after=5), backoff_s(1, p, random.Random(1), retry_after=600)
    (5.0, 60.0)
    """
    cap = min(policy.backoff_max_s, policy.backoff_s * 2 ** min(failures - 1, 60))
    delay = rng.uniform(0, cap)
    if retry_after is not None:
        delay = max(delay, float(min(retry_after, policy.backoff_max_s)))
    return delay


@dataclass(frozen=True, slots=True)
class Failed:
    """Events the receiver did not take: why (the last answer) and after how many tries."""

    events: tuple[Event, ...]
    reason: str
    detail: str
    attempts: int


class Abandoned(Exception):
    """The batch was given up (shutdown, or its partitions were revoked): nothing of it is committed."""


Action = Literal["retry", "split", "dead_letter"]


async def deliver(
    events: Sequence[Event],
    post: Callable[[Sequence[Event]], Awaitable[Answer]],
    policy: Policy,
    *,
    rng: random.Random,
    wait: Callable[[float], Awaitable[None]],
    stopped: Callable[[], bool],
    report: Callable[[Answer, int, int, Action, float], None] = lambda *a: None,
) -> tuple[list[Event], list[Failed]]:
    """Send ``events`` in order until each is delivered or failed: (delivered, failed).

    One request at a time, in order: the halves of a split batch go before anything after them.
    ``wait(delay)`` sleeps between tries (and may return early when ``stopped()`` became true);
    ``report(answer, events in the request, attempt, action, delay)`` is told of every failure.
    Raises :class:`Abandoned` when ``stopped()`` before a request.
    """
    delivered: list[Event] = []
    failed: list[Failed] = []
    todo: deque[Sequence[Event]] = deque([events] if events else [])
    while todo:
        chunk = todo.popleft()
        attempt = 0
        while True:
            if stopped():
                raise Abandoned
            attempt += 1
            answer = await post(chunk)
            verdict = classify(answer.status)
            if verdict == "delivered":
                delivered.extend(chunk)
                break
            if verdict == "split" and len(chunk) > 1:
                mid = len(chunk) // 2
                todo.extendleft([chunk[mid:], chunk[:mid]])
                report(answer, len(chunk), attempt, "split", 0.0)
                break
            if verdict == "split" or attempt >= policy.attempts:
                report(answer, len(chunk), attempt, "dead_letter", 0.0)
                failed.append(Failed(tuple(chunk), answer.reason, answer.detail, attempt))
                break
            delay = backoff_s(attempt, policy, rng, answer.retry_after_s)
            report(answer, len(chunk), attempt, "retry", delay)
            await wait(delay)
    return delivered, failed


def dead_letter_headers(
    record: Record, reason: str, detail: str, attempts: int, key: str
) -> list[tuple[str, bytes]]:
    """The original headers, then why it is a dead letter.

    An original header with a name the forwarder writes is kept as ``propstream.original.<rest>``,
    so a reader never has to guess which of two ``propstream.reason`` is ours (a left event's
    tombstone carries its own).

    >>> r = Record("propensity.audiences", 2, 9, b"a|u", None, (("propstream.reason", b"erasure"),))
    >>> [k for k, _ in dead_letter_headers(r, "http_500", "HTTP 500", 8, "ab")][:3]
    ['propstream.original.reason', 'propstream.reason', 'propstream.detail']
    """
    ours = {
        "propstream.reason": reason.encode(),
        "propstream.detail": detail.encode("utf-8", "replace")[:1024],
        "propstream.source.topic": record.topic.encode(),
        "propstream.source.partition": str(record.partition).encode(),
        "propstream.source.offset": str(record.offset).encode(),
        "propstream.attempts": str(attempts).encode(),
        "propstream.idempotency_key": key.encode(),
    }
    kept = [
        ("propstream.original." + k.removeprefix(HEADER_PREFIX) if k in ours else k, v)
        for k, v in record.headers
    ]
    return kept + list(ours.items())


def kinds_of(changes: str, triggers: str, audiences: str, topics: Iterable[str]) -> Mapping[str, Kind]:
    """The kind each forwarded topic's events get: change, trigger, audience, or event (any other topic).

    >>> dict(kinds_of("c", "t", "a", ["a", "c", "x"]))
    {'a': 'audience', 'c': 'change', 'x': 'event'}
    """
    known: dict[str, Kind] = {changes: "change", triggers: "trigger", audiences: "audience"}
    return {t: known.get(t, "event") for t in topics}
