"""The event contract: every rejection reason, both tracker vocabularies, time parsing."""

from __future__ import annotations

import json

import pytest

from features.contract import REASONS, Rejected, Rules, parse

NOW = 1_763_900_000_000  # 2025-11-23
ISO = "2025-11-23T10:00:00Z"
ISO_MS = 1_763_892_000_000


def good(**kw: object) -> dict:
    return {"event_id": "e1", "user_id": "u1", "type": "page_view", "ts": ISO, **kw}


def reason_of(payload: bytes | dict, rules: Rules | None = None) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(Rejected) as info:
        parse(raw, rules or Rules(), NOW)
    assert info.value.reason in REASONS
    return info.value.reason


def test_valid_event_normalised() -> None:
    [ev] = parse(
        json.dumps(good(type="purchase", price=10.0, quantity=3, currency="eur")).encode(),
        Rules(default_currency="EUR"),
        NOW,
    )
    assert ev.ts_ms == ISO_MS
    assert ev.revenue == 30.0  # revenue defaults to price * quantity for orders
    assert ev.currency == "EUR"


def test_epoch_ms_and_integer_ids_accepted() -> None:
    [ev] = parse(json.dumps(good(ts=ISO_MS, user_id=123)).encode(), Rules(), NOW)
    assert ev.ts_ms == ISO_MS and ev.user_id == "123"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", "not_utf8"),
        (b'{"event_id": ', "not_json"),
        (b"[1, 2]", "not_object"),
        ({"user_id": "u1", "type": "page_view", "ts": ISO}, "missing_field"),
        (good(user_id=None), "missing_field"),
        (good(price="12"), "wrong_type"),
        (good(user_id=True), "wrong_type"),
        (good(quantity=1.5), "wrong_type"),
        (good(type="teleport"), "unknown_type"),
        (good(price=-1), "out_of_range"),
        (good(quantity=0), "out_of_range"),
        (good(user_id="x" * 300), "out_of_range"),
        (
            b'{"event_id":"e","user_id":"u","type":"page_view","ts":"' + ISO.encode() + b'","price":1e400}',
            "not_json",
        ),  # decoder refuses inf
        (good(ts="yesterday"), "bad_time"),
        (good(ts="2025-11-23T10:00:00"), "bad_time"),  # naive: no offset
        (good(ts=[1]), "wrong_type"),
        (good(ts=NOW + 3_600_000), "future"),
        (good(ts=1_763_892_000), "too_old"),  # seconds, not milliseconds
        (good(ts="1999-12-31T23:59:59Z"), "too_old"),
        (good(consent="yes"), "wrong_type"),
    ],
)
def test_rejection_reasons(payload: bytes | dict, reason: str) -> None:
    assert reason_of(payload) == reason


def test_oversize() -> None:
    assert reason_of(good(category="x" * 200), Rules(max_event_bytes=256)) == "oversize"


def test_seconds_hint_in_detail() -> None:
    with pytest.raises(Rejected) as info:
        parse(json.dumps(good(ts=1_763_892_000)).encode(), Rules(), NOW)
    assert "milliseconds" in info.value.detail


def test_custom_types_configurable() -> None:
    assert reason_of(good(type="webinar_signup")) == "unknown_type"
    rules = Rules(custom_types=frozenset({"webinar_signup"}))
    assert parse(json.dumps(good(type="webinar_signup")).encode(), rules, NOW)[0].type == "webinar_signup"


SEGMENT = {
    "type": "track",
    "event": "Product Added",
    "userId": "u9",
    "messageId": "m-1",
    "timestamp": ISO,
    "properties": {"product_id": "p1", "category": "shoes", "price": 59.5, "quantity": 2},
    "context": {"campaign": {"name": "bf", "medium": "email"}},
}


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("Product Viewed", "product_view"),
        ("Product Added", "add_to_cart"),
        ("Product Removed", "remove_from_cart"),
        ("Checkout Started", "checkout_start"),
        ("Order Completed", "purchase"),
        ("Products Searched", "search"),
    ],
)
def test_segment_vocabulary(name: str, canonical: str) -> None:
    [ev] = parse(json.dumps({**SEGMENT, "event": name}).encode(), Rules(), NOW)
    assert (ev.type, ev.user_id, ev.event_id, ev.ts_ms) == (canonical, "u9", "m-1", ISO_MS)
    assert (ev.product_id, ev.price, ev.quantity, ev.campaign, ev.channel) == ("p1", 59.5, 2, "bf", "email")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("page_view", "page_view"),
        ("view_item", "product_view"),
        ("add_to_cart", "add_to_cart"),
        ("remove_from_cart", "remove_from_cart"),
        ("begin_checkout", "checkout_start"),
        ("purchase", "purchase"),
        ("search", "search"),
    ],
)
def test_ga4_vocabulary(name: str, canonical: str) -> None:
    body = {
        "client_id": "c.1",
        "user_id": "u7",
        "timestamp_micros": ISO_MS * 1000,
        "events": [
            {
                "name": name,
                "params": {
                    "currency": "EUR",
                    "value": 20.0,
                    "transaction_id": "T1",
                    "items": [{"item_id": "sku1", "item_category": "hats", "price": 10.0, "quantity": 2}],
                },
            }
        ],
    }
    [ev] = parse(json.dumps(body).encode(), Rules(default_currency="EUR"), NOW)
    assert (ev.type, ev.user_id, ev.ts_ms, ev.product_id, ev.quantity) == (canonical, "u7", ISO_MS, "sku1", 2)
    assert ev.revenue == (20.0 if canonical == "purchase" else None)
    # the same payload twice gets the same derived id, so dedup catches re-sent batches
    assert parse(json.dumps(body).encode(), Rules(default_currency="EUR"), NOW)[0].event_id == ev.event_id


def test_unknown_vocabulary_names() -> None:
    assert reason_of({**SEGMENT, "event": "Rocket Launched"}) == "unknown_type"
    assert reason_of({"user_id": "u", "timestamp_micros": 1, "events": [{"name": "x"}]}) == "unknown_type"


def test_published_schema_agrees_with_the_parser() -> None:
    """The JSON Schema accepts what the parser accepts and refuses what it refuses for shape reasons."""
    import jsonschema

    from streams.settings import Settings  # noqa: F401  (package import: schema ships beside it)
    from tests.conftest import ROOT
    from tests.reference import random_events

    schema = json.loads((ROOT / "streams" / "schemas" / "event.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for e in random_events(3, users=5, per_user=40, start_ms=NOW - 86_400_000 * 5, span_ms=86_400_000 * 4):
        assert parse(json.dumps(e).encode(), Rules(), NOW)
        assert not list(validator.iter_errors(e)), e
    for bad in (
        good(user_id=None),
        good(price="12"),
        good(price=-1),
        good(quantity=0),
        good(ts=1_763_892_000),
    ):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(Rejected):
            parse(json.dumps(bad).encode(), Rules(), NOW)
