"""Hostile input against the contract and the batch handler: nothing raises, every input is accounted for.

Properties (hypothesis), over random bytes, arbitrary JSON, mutated valid events, all three
vocabularies, NaN/infinities and odd unicode:

- :func:`features.contract.parse` either returns valid events or raises :class:`Rejected` with a
  reason of :data:`REASONS`; nothing else escapes;
- :meth:`streams.ingest.IngestHandler.process` never raises, and every event of every record is
  either accepted, set aside for consent, or dead-lettered with a reason of :data:`REASONS`;
- the stored state of one heavy user stays under a fixed size however many events arrive.
"""

from __future__ import annotations

import json
import math
import random
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.contract import CANONICAL_TYPES, MAX_ID_LEN, REASONS, Rejected, Rules, parse
from features.state import decode
from streams.ingest import DeadLetter, IngestHandler, MemoryStore, Record
from streams.settings import Settings

NOW_MS = 1_800_000_000_000
RULES = Rules()
TOPICS = ("events.clickstream", "events.cart", "events.purchase")

# --- strategies --------------------------------------------------------------------------------
odd_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # JSON text cannot carry lone surrogates
    max_size=40,
) | st.sampled_from(
    [
        "",
        "\u0000",
        "\u202e\u202d",  # bidi overrides
        "\ufeff",
        "\u200b\u200d",
        "e\u0301",
        "\U0001d4fe\U0001d4fc\U0001d4ee\U0001d4fb",  # mathematical script letters
        "👩‍👩‍👧‍👦",
        "x" * (MAX_ID_LEN + 1),
        "NaN",
        "Infinity",
        "2024-01-01T00:00:00",
        "2024-02-30T00:00:00Z",
        "+275760-09-13T00:00:00Z",
    ]
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1e308, -0.0, 2**63, 2**64, NOW_MS, NOW_MS // 1000, NOW_MS * 1000]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=20,
)
FIELDS = (
    "event_id",
    "user_id",
    "type",
    "ts",
    "session_id",
    "product_id",
    "category",
    "price",
    "quantity",
    "order_id",
    "revenue",
    "currency",
    "channel",
    "campaign",
    "consent",
)


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid canonical event with some fields replaced, dropped or added."""
    ev: dict[str, Any] = {
        "event_id": f"e{draw(st.integers(0, 50))}",
        "user_id": draw(st.sampled_from(["u1", "u2", "ü3", 42])),
        "type": draw(st.sampled_from([*CANONICAL_TYPES, "sign_up"])),
        "ts": NOW_MS - draw(st.integers(0, 10 * 86_400_000)),
        "product_id": "p1",
        "price": 9.5,
        "quantity": 2,
    }
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        if draw(st.booleans()):
            ev[field] = draw(json_values)
        else:
            ev.pop(field, None)
    text = json.dumps(ev, allow_nan=True)  # NaN / Infinity literals: not JSON, must be rejected
    return text.encode("utf-8", "surrogatepass")


@st.composite
def vendor_payloads(draw: st.DrawFn) -> bytes:
    """Segment track calls and GA4 bodies with random holes and wrong types."""
    if draw(st.booleans()):
        body: dict[str, Any] = {
            "type": "track",
            "event": draw(st.sampled_from(["Product Added", "Order Completed", "Signed Up", "Nope"])),
            "userId": draw(st.one_of(st.just("u1"), json_values)),
            "messageId": draw(st.one_of(st.just("m1"), json_values)),
            "timestamp": draw(st.one_of(st.just("2026-12-01T00:00:00Z"), json_values)),
            "properties": draw(st.one_of(st.just({"price": 3, "product_id": "p"}), json_values)),
            "context": draw(st.one_of(st.just({"campaign": {"name": "c"}}), json_values)),
        }
    else:
        body = {
            "client_id": draw(st.one_of(st.just("c1"), json_values)),
            "timestamp_micros": draw(st.one_of(st.just(NOW_MS * 1000 - 5), json_values)),
            "events": draw(
                st.one_of(
                    st.lists(
                        st.fixed_dictionaries(
                            {
                                "name": st.one_of(
                                    st.sampled_from(["purchase", "view_item", "x"]), json_values
                                ),
                                "params": st.one_of(st.just({"items": [{"item_id": "i"}]}), json_values),
                            }
                        ),
                        max_size=3,
                    ),
                    json_values,
                )
            ),
        }
    return json.dumps(body, allow_nan=True).encode()


payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    mutated_events(),
    vendor_payloads(),
)


def outcome(payload: bytes) -> list[Any] | str:
    """Events, or the rejection reason; any other exception fails the test."""
    try:
        return parse(payload, RULES, NOW_MS)
    except Rejected as r:
        assert r.reason in REASONS, r.reason
        assert isinstance(r.detail, str)
        return r.reason


# --- parse -------------------------------------------------------------------------------------
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_parse_accepts_valid_events_or_rejects_with_a_known_reason(payload: bytes) -> None:
    got = outcome(payload)
    if isinstance(got, str):
        return
    assert got, "accepted, but no event"
    for ev in got:
        assert 1 <= len(ev.event_id) <= MAX_ID_LEN and 1 <= len(ev.user_id) <= MAX_ID_LEN
        ev.user_id.encode()  # stored and keyed as UTF-8: must be encodable
        assert ev.type in CANONICAL_TYPES or ev.type in RULES.custom_types
        assert RULES.earliest_ms <= ev.ts_ms <= NOW_MS + RULES.max_future_ms
        for x in (ev.price, ev.revenue):
            assert x is None or (math.isfinite(x) and x >= 0)
        assert ev.quantity >= 1


@pytest.mark.parametrize(
    "payload",
    [
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":NaN}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":1799999999000,"price":NaN}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":1799999999000,"price":Infinity}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":1799999999000,"price":1e999}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":1799999999000,"price":-1e999}',
        b'{"event_id":"e","user_id":"\\ud800","type":"page_view","ts":1799999999000}',
        b'{"event_id":"\\udfff","user_id":"u","type":"page_view","ts":1799999999000}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":1e400}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":100000000000000000000000000000}',
        b'{"event_id":"e","user_id":"u","type":"page_view","ts":"9999-12-31T23:59:59-23:59"}',
        b"\xef\xbb\xbf{}",
        b"",
        b"\x00" * 100,
    ],
)
def test_nan_infinity_and_broken_unicode_are_rejected(payload: bytes) -> None:
    assert isinstance(outcome(payload), str)


@pytest.mark.parametrize("shape", ["array", "object"])
def test_nested_json_is_rejected_not_raised(shape: str) -> None:
    depth = 500
    payload = b"[" * depth + b"]" * depth if shape == "array" else b'{"a":' * depth + b"1" + b"}" * depth
    assert outcome(payload) in {"not_object", "missing_field"}


def test_a_2kb_deeply_nested_message_is_dead_lettered() -> None:
    h, _, dead = make_handler()
    payload = b"[" * 1000 + b"]" * 1000
    h.process([Record(TOPICS[0], 0, 0, b"u", payload)])
    assert [d.reason for d in dead] == ["not_json"]


# --- the batch handler -------------------------------------------------------------------------
def make_handler(**overrides: Any) -> tuple[IngestHandler, MemoryStore, list[DeadLetter]]:
    store = MemoryStore()
    dead: list[DeadLetter] = []
    h = IngestHandler(Settings(**overrides), store, dead.append, clock=lambda: NOW_MS / 1000)
    return h, store, dead


keys = st.one_of(st.none(), st.sampled_from([b"u1", b"u2", "ü3".encode(), b"42", b""]), st.binary(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), keys, payloads), min_size=1, max_size=40))
def test_handler_never_raises_and_accounts_for_every_event(
    batch: list[tuple[int, int, bytes | None, bytes]],
) -> None:
    h, store, dead = make_handler()
    records = [
        Record(TOPICS[t], p, i, key, value)
        for i, (p, t, key, value) in enumerate(batch)
        if not _too_deep(value)
    ]
    units = 0
    no_consent = 0
    for r in records:
        got = outcome(r.value)
        if isinstance(got, str):
            units += 1
        else:
            units += len(got)
            no_consent += sum(1 for ev in got if not ev.personalization and r.key == ev.user_id.encode())
    out = h.process(records)
    accepted = sum(len(v) for v in out.values())
    assert all(d.reason in REASONS for d in dead), {d.reason for d in dead}
    assert accepted + len(dead) + no_consent == units
    for d in dead:  # every dead letter carries its source and the original bytes
        headers = dict(d.headers())
        assert headers["propstream.reason"].decode() in REASONS
        assert d.record in records
    for user, evs in out.items():
        assert decode(store.get(user)).events >= len(evs)
    # a second delivery of the same batch (a redelivery after a crash) accepts nothing new
    before = dict(store.data)
    again = h.process(records)
    assert not again and store.data == before


def _too_deep(value: bytes) -> bool:
    """Hypothesis' JSON is shallow; deep nesting has its own test."""
    return value.count(b"[") + value.count(b"{") > 800


# --- bounded state -----------------------------------------------------------------------------
STATE_BOUND_BYTES = 96 * 1024  # measured: about 66 KiB with every id at its 256-character maximum


def heavy_user_events(n: int, seed: int) -> list[bytes]:
    """One user doing everything, with maximal-length ids: new products, sessions, carts, orders."""
    rng = random.Random(seed)
    start = NOW_MS - 120 * 86_400_000
    kinds = [*CANONICAL_TYPES, "sign_up", "login", "lead"]
    out = []
    for i in range(n):
        ts = start + i * (120 * 86_400_000 // n)
        long_id = "".join(rng.choices(string.ascii_letters, k=MAX_ID_LEN - 8)) + f"{i:08d}"
        ev = {
            "event_id": long_id,
            "user_id": "heavy",
            "type": rng.choice(kinds) if i % 5 else "add_to_cart",
            "ts": ts,
            "session_id": long_id,
            "product_id": long_id,
            "category": long_id,
            "price": 9999.0,
            "quantity": 1000,
            "order_id": long_id,
            "currency": "USD",
            "channel": long_id,
            "campaign": long_id,
        }
        out.append(json.dumps(ev).encode())
    return out


def test_state_of_a_heavy_user_stays_bounded() -> None:
    h, store, dead = make_handler()
    values = heavy_user_events(12_000, seed=3)
    sizes = []
    for i in range(0, len(values), 500):
        h.process([Record(TOPICS[0], 0, i + j, b"heavy", v) for j, v in enumerate(values[i : i + 500])])
        sizes.append(len(store.data["heavy"]))
    assert not dead
    assert decode(store.data["heavy"]).events == len(values)
    assert max(sizes) <= STATE_BOUND_BYTES, sizes
    # no growth with the number of events: the second half is no larger than the first
    half = len(sizes) // 2
    assert max(sizes[half:]) <= max(sizes[:half]) * 1.1, sizes
