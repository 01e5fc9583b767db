"""The event contract: decode raw bytes, normalise three vocabularies, validate, or reject with a reason.

Pure code (no I/O): the worker calls :func:`parse` once per Kafka message on the hot path, so the
common case (our own vocabulary, well-formed) takes the shortest route. Anything wrong raises
:class:`Rejected` with a machine-readable ``reason`` from :data:`REASONS`; the worker turns it into
a dead-letter record. See ``docs/events.md`` and ``streams/schemas/event.schema.json``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime

import msgspec

# Canonical event types (our vocabulary); every feature is defined over these.
CANONICAL_TYPES: tuple[str, ...] = (
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "checkout_start",
    "purchase",
)
DEFAULT_CUSTOM_TYPES: frozenset[str] = frozenset(
    {"sign_up", "demo_request", "add_to_wishlist", "subscribe", "lead", "login"}
)

# Segment e-commerce spec v2 event names.
SEGMENT_NAMES: dict[str, str] = {
    "Page Viewed": "page_view",
    "Product Viewed": "product_view",
    "Products Searched": "search",
    "Product Added": "add_to_cart",
    "Product Removed": "remove_from_cart",
    "Checkout Started": "checkout_start",
    "Order Completed": "purchase",
    "Product Added to Wishlist": "add_to_wishlist",
    "Signed Up": "sign_up",
}
# GA4 recommended e-commerce event names.
GA4_NAMES: dict[str, str] = {
    "page_view": "page_view",
    "view_item": "product_view",
    "search": "search",
    "add_to_cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "begin_checkout": "checkout_start",
    "purchase": "purchase",
    "add_to_wishlist": "add_to_wishlist",
    "sign_up": "sign_up",
    "generate_lead": "lead",
    "login": "login",
}

REASONS: dict[str, str] = {
    "oversize": "payload larger than max_event_bytes",
    "not_utf8": "payload is not valid UTF-8",
    "not_json": "payload is not valid JSON",
    "not_object": "payload is JSON but not an object",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong JSON type",
    "unknown_type": "event type is in none of the accepted vocabularies",
    "out_of_range": "a number is negative, not finite, or beyond its bound; or a string is too long",
    "bad_time": "event time is not ISO-8601 with offset nor epoch milliseconds",
    "future": "event time is more than max_future_s ahead of wall-clock time",
    "too_old": "event time is before earliest_event_time",
    "wrong_key": "Kafka message key is not the event's user_id",
    "currency": "money in a currency other than the deployment's, with no rate for it in currency_rates",
    "late": "event time is further behind the watermark than allowed_lateness_s",
    "duplicate": "event_id already seen for this user",
    "processing_error": "the worker failed while processing this user's events of the batch (a bug or a "
    "value no check foresaw); nothing of them was applied: replay them once it is fixed",
}

MAX_ID_LEN = 256
MAX_PRICE = 10_000_000.0
MAX_QUANTITY = 100_000
MIN_PLAUSIBLE_MS = 100_000_000_000  # 1973 in ms; smaller integers are almost surely seconds

_decoder = msgspec.json.Decoder()


class Rejected(Exception):
    """Input that breaks the contract; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Event(msgspec.Struct, gc=False):
    """One normalised, validated event. Times are epoch milliseconds, UTC."""

    event_id: str
    user_id: str
    type: str
    ts_ms: int
    session_id: str | None = None
    product_id: str | None = None
    category: str | None = None
    price: float | None = None
    quantity: int = 1
    order_id: str | None = None
    revenue: float | None = None
    currency: str | None = None
    channel: str | None = None
    campaign: str | None = None
    personalization: bool = True


@dataclass(frozen=True)
class Rules:
    """The validation knobs, copied from settings once so the hot path reads plain attributes."""

    max_event_bytes: int = 65536
    max_future_ms: int = 300_000
    earliest_ms: int = 946_684_800_000  # 2000-01-01
    custom_types: frozenset[str] = DEFAULT_CUSTOM_TYPES
    default_currency: str = "USD"  # the deployment's one currency: every amount is in it
    currency_rates: tuple[tuple[str, float], ...] = ()  # (code, units of default_currency per unit)


def _in_currency(currency: str | None, rules: Rules) -> float:
    """The rate that turns amounts in ``currency`` into the deployment's (1.0: already in it).

    One rule for every amount (price, revenue): a deployment has one currency, because revenue
    features and the value target add amounts up. An event in another currency is converted at
    the configured rate, or rejected (``currency``) when there is none: summing euros and dollars
    silently is the error this refuses.

    >>> _in_currency("eur", Rules(currency_rates=(("EUR", 1.1),))), _in_currency(None, Rules())
    (1.1, 1.0)
    """
    if currency is None:
        return 1.0
    code = currency.upper()
    if code == rules.default_currency:
        return 1.0
    for known, rate in rules.currency_rates:
        if known == code:
            return rate
    msg = f"{code} is not the deployment currency {rules.default_currency}; currency_rates has no rate for it"
    raise Rejected("currency", msg)


def parse_time_ms(value: object) -> int | None:
    """Epoch milliseconds from an ISO-8601 string with offset or an integer of milliseconds.

    >>> parse_time_ms("2024-01-01T00:00:00Z")
    1704067200000
    >>> parse_time_ms(1704067200000)
    1704067200000
    >>> parse_time_ms("2024-01-01T00:00:00") is None  # naive: ambiguous, refused
    True
    """
    if type(value) is int:
        return value
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            return None
        if dt.tzinfo is None:
            return None
        return int(dt.timestamp() * 1000)
    return None


def _id(raw: dict[str, object], field: str, *, required: bool = True) -> str | None:
    value = raw.get(field)
    if value is None:
        if required:
            raise Rejected("missing_field", field)
        return None
    t = type(value)
    if t is str:
        s = value
    elif t is int:
        s = str(value)
    else:
        raise Rejected("wrong_type", f"{field} must be a string, got {t.__name__}")
    assert isinstance(s, str)
    if not s or len(s) > MAX_ID_LEN:
        raise Rejected("out_of_range", f"{field} must have 1..{MAX_ID_LEN} characters")
    return s


def _num(raw: dict[str, object], field: str, upper: float) -> float | None:
    value = raw.get(field)
    if value is None:
        return None
    t = type(value)
    if t is not float and t is not int:
        raise Rejected("wrong_type", f"{field} must be a number, got {t.__name__}")
    f = float(value)  # type: ignore[arg-type]
    if not (0.0 <= f <= upper) or math.isnan(f):
        raise Rejected("out_of_range", f"{field}={value!r} outside 0..{upper:g}")
    return f


def _quantity(raw: dict[str, object]) -> int:
    value = raw.get("quantity")
    if value is None:
        return 1
    if type(value) is not int:
        raise Rejected("wrong_type", f"quantity must be an integer, got {type(value).__name__}")
    if not 1 <= value <= MAX_QUANTITY:
        raise Rejected("out_of_range", f"quantity={value} outside 1..{MAX_QUANTITY}")
    return value


def _time(value: object, rules: Rules, now_ms: int) -> int:
    if value is None:
        raise Rejected("missing_field", "ts")
    ts = parse_time_ms(value)
    if ts is None:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            raise Rejected("bad_time", f"{value!r} is not ISO-8601 with a UTC offset nor epoch milliseconds")
        raise Rejected("wrong_type", f"ts must be a string or integer, got {type(value).__name__}")
    if ts < rules.earliest_ms:
        hint = " (looks like epoch seconds: send milliseconds)" if 0 < ts < MIN_PLAUSIBLE_MS else ""
        raise Rejected("too_old", f"ts={value!r} is before the earliest accepted time{hint}")
    if ts > now_ms + rules.max_future_ms:
        raise Rejected("future", f"ts={value!r} is {(ts - now_ms) / 1000:.0f}s ahead of wall-clock time")
    return ts


def _str(raw: dict[str, object], field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if type(value) is not str:
        raise Rejected("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LEN:
        raise Rejected("out_of_range", f"{field} longer than {MAX_ID_LEN} characters")
    return value


def _consent(raw: dict[str, object]) -> bool:
    consent = raw.get("consent")
    if consent is None:
        return True
    if type(consent) is not dict:
        raise Rejected("wrong_type", "consent must be an object of boolean flags")
    flag = consent.get("personalization", True)
    if type(flag) is not bool:
        raise Rejected("wrong_type", "consent.personalization must be a boolean")
    return flag


def _canonical(raw: dict[str, object], etype: str, ts_ms: int, rules: Rules) -> Event:
    """Validate a payload already in our field names (after any vocabulary mapping)."""
    price = _num(raw, "price", MAX_PRICE)
    quantity = _quantity(raw)
    revenue = _num(raw, "revenue", MAX_PRICE * MAX_QUANTITY)
    if etype == "purchase" and revenue is None and price is not None:
        revenue = price * quantity
    currency = _str(raw, "currency")
    rate = _in_currency(currency, rules)
    if rate != 1.0:
        price = None if price is None else price * rate
        revenue = None if revenue is None else revenue * rate
    return Event(
        event_id=_id(raw, "event_id"),  # type: ignore[arg-type]
        user_id=_id(raw, "user_id"),  # type: ignore[arg-type]
        type=etype,
        ts_ms=ts_ms,
        session_id=_id(raw, "session_id", required=False),
        product_id=_id(raw, "product_id", required=False),
        category=_str(raw, "category"),
        price=price,
        quantity=quantity,
        order_id=_id(raw, "order_id", required=False),
        revenue=revenue,
        currency=rules.default_currency if currency or revenue is not None else None,
        channel=_str(raw, "channel"),
        campaign=_str(raw, "campaign"),
        personalization=_consent(raw),
    )


def _check_type(etype: object, rules: Rules) -> str:
    if etype is None:
        raise Rejected("missing_field", "type")
    if type(etype) is not str:
        raise Rejected("wrong_type", f"type must be a string, got {type(etype).__name__}")
    if etype in CANONICAL_TYPES or etype in rules.custom_types:
        return etype
    raise Rejected("unknown_type", f"{etype[:64]!r} is not a known or configured custom event type")


def _from_segment(raw: dict[str, object], rules: Rules, now_ms: int) -> Event:
    name = raw.get("event")
    if type(name) is not str:
        raise Rejected("wrong_type", "Segment 'event' must be a string")
    etype = SEGMENT_NAMES.get(name)
    if etype is None:
        raise Rejected("unknown_type", f"Segment event {name[:64]!r} has no mapping")
    props = raw.get("properties") or {}
    if type(props) is not dict:
        raise Rejected("wrong_type", "Segment 'properties' must be an object")
    context = raw.get("context") or {}
    campaign = context.get("campaign") if type(context) is dict else None
    campaign = campaign if type(campaign) is dict else {}
    flat: dict[str, object] = {
        "event_id": raw.get("messageId"),
        "user_id": raw.get("userId") if raw.get("userId") is not None else raw.get("anonymousId"),
        "session_id": props.get("session_id"),
        "product_id": props.get("product_id"),
        "category": props.get("category"),
        "price": props.get("price"),
        "quantity": props.get("quantity"),
        "order_id": props.get("order_id"),
        "revenue": props.get("revenue", props.get("total")),
        "currency": props.get("currency"),
        "channel": campaign.get("medium") or campaign.get("source"),
        "campaign": campaign.get("name"),
        "consent": raw.get("consent"),
    }
    return _canonical(flat, etype, _time(raw.get("timestamp"), rules, now_ms), rules)


def _from_ga4(raw: dict[str, object], rules: Rules, now_ms: int, payload: bytes) -> list[Event]:
    """GA4 Measurement-Protocol body: ``{user_id|client_id, timestamp_micros, events: [{name, params}]}``."""
    events = raw.get("events")
    if type(events) is not list or not events:
        raise Rejected("wrong_type", "GA4 'events' must be a non-empty array")
    micros = raw.get("timestamp_micros")
    if micros is not None and type(micros) is not int:
        raise Rejected("wrong_type", "GA4 'timestamp_micros' must be an integer")
    out = []
    digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
    for i, item in enumerate(events):
        if type(item) is not dict:
            raise Rejected("wrong_type", "each GA4 event must be an object")
        name = item.get("name")
        etype = GA4_NAMES.get(name) if type(name) is str else None
        if etype is None:
            raise Rejected("unknown_type", f"GA4 event {str(name)[:64]!r} has no mapping")
        params = item.get("params") or {}
        if type(params) is not dict:
            raise Rejected("wrong_type", "GA4 'params' must be an object")
        items = params.get("items") or [{}]
        first = items[0] if type(items) is list and items and type(items[0]) is dict else {}
        ts_micros = params.get("timestamp_micros", micros)
        if type(ts_micros) is not int:
            raise Rejected("missing_field", "timestamp_micros")
        flat: dict[str, object] = {
            "event_id": params.get("event_id") or f"ga4-{digest}-{i}",
            "user_id": raw.get("user_id") if raw.get("user_id") is not None else raw.get("client_id"),
            "session_id": params.get("session_id"),
            "product_id": first.get("item_id"),
            "category": first.get("item_category"),
            "price": first.get("price"),
            "quantity": first.get("quantity"),
            "order_id": params.get("transaction_id"),
            "revenue": params.get("value") if etype == "purchase" else None,
            "currency": params.get("currency"),
            "channel": params.get("medium") or params.get("source"),
            "campaign": params.get("campaign"),
            "consent": raw.get("consent"),
        }
        out.append(_canonical(flat, etype, _time(ts_micros // 1000, rules, now_ms), rules))
    return out


def parse(payload: bytes, rules: Rules, now_ms: int) -> list[Event]:
    """Decode and validate one Kafka message value into one or more events, or raise :class:`Rejected`.

    >>> ev = parse(b'{"event_id":"e1","user_id":"u1","type":"page_view","ts":"2024-05-01T12:00:00Z"}',
    ...            Rules(), now_ms=1_800_000_000_000)[0]
    >>> (ev.user_id, ev.type, ev.ts_ms)
    ('u1', 'page_view', 1714564800000)
    """
    if len(payload) > rules.max_event_bytes:
        raise Rejected("oversize", f"{len(payload)} bytes > {rules.max_event_bytes}")
    try:
        raw = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        try:
            bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("not_utf8", str(exc)[:200]) from None
        raise Rejected("not_json", str(exc)[:200]) from None
    except RecursionError:  # msgspec's decoder has no depth limit of its own for nested arrays
        raise Rejected("not_json", "nested deeper than the decoder's recursion limit") from None
    if type(raw) is not dict:
        raise Rejected("not_object", f"top-level JSON is {type(raw).__name__}")
    etype = raw.get("type")
    if etype is not None and etype != "track":
        ts = raw["ts"] if "ts" in raw else raw.get("timestamp")
        return [_canonical(raw, _check_type(etype, rules), _time(ts, rules, now_ms), rules)]
    if "event" in raw:
        return [_from_segment(raw, rules, now_ms)]
    if "events" in raw:
        return _from_ga4(raw, rules, now_ms, payload)
    raise Rejected("missing_field", "type")
