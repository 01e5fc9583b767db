"""Readers for real public event logs, mapped to our event contract and sorted by event time.

Each reader yields canonical event dicts (``docs/events.md``) so ``propstream replay`` publishes them
exactly as a live producer would. Rows are never dropped silently: a row with an unparseable time
keeps its original text in ``ts`` so the worker rejects it with a reason (``bad_time``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from features.contract import parse_time_ms

FORMATS: tuple[str, ...] = ("jsonl", "taobao", "rees46", "retailrocket")

TAOBAO_TYPES = {"pv": "product_view", "fav": "add_to_wishlist", "cart": "add_to_cart", "buy": "purchase"}
REES46_TYPES = {
    "view": "product_view",
    "cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "purchase": "purchase",
}
RETAILROCKET_TYPES = {"view": "product_view", "addtocart": "add_to_cart", "transaction": "purchase"}
HEADERS = {
    "taobao": ("user_id", "item_id", "category_id", "behavior", "timestamp"),
    "rees46": (
        "event_time",
        "event_type",
        "product_id",
        "category_id",
        "category_code",
        "brand",
        "price",
        "user_id",
        "user_session",
    ),
    "retailrocket": ("timestamp", "visitorid", "event", "itemid", "transactionid"),
}

Row = dict[str, str]
Event = dict[str, object]


class DatasetError(ValueError):
    """The file cannot be read as the given format; the message says why and what was expected."""


def _int_or_raw(value: str, scale: int = 1) -> object:
    try:
        return int(value) * scale
    except ValueError:
        return value


def _taobao(row: Row, n: int) -> Event:
    behaviour = row["behavior"]
    return {
        "event_id": f"taobao-{n}",
        "user_id": row["user_id"],
        "type": TAOBAO_TYPES.get(behaviour, behaviour),
        "ts": _int_or_raw(row["timestamp"], 1000),  # unix seconds in the source
        "product_id": row["item_id"],
        "category": row["category_id"],
    }


def _rees46_time(value: str) -> object:
    try:
        dt = datetime.strptime(value, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc)
    except ValueError:
        return value
    return int(dt.timestamp() * 1000)


def _rees46(row: Row, n: int) -> Event:
    kind = row["event_type"]
    ev: Event = {
        "event_id": f"rees46-{n}",
        "user_id": row["user_id"],
        "type": REES46_TYPES.get(kind, kind),
        "ts": _rees46_time(row["event_time"]),
        "session_id": row["user_session"] or None,
        "product_id": row["product_id"],
        "category": row["category_code"] or row["category_id"],
    }
    try:
        ev["price"] = float(row["price"])
    except ValueError:
        ev["price"] = row["price"]  # the worker rejects it as wrong_type, with the row
    if ev["type"] == "purchase" and isinstance(ev["price"], float):
        ev["revenue"] = ev["price"]
    return ev


def _retailrocket(row: Row, n: int) -> Event:
    kind = row["event"]
    ev: Event = {
        "event_id": f"retailrocket-{n}",
        "user_id": row["visitorid"],
        "type": RETAILROCKET_TYPES.get(kind, kind),
        "ts": _int_or_raw(row["timestamp"]),  # already milliseconds
        "product_id": row["itemid"],
    }
    if row.get("transactionid"):
        ev["order_id"] = row["transactionid"]
    return ev


MAPPERS: dict[str, Callable[[Row, int], Event]] = {
    "taobao": _taobao,
    "rees46": _rees46,
    "retailrocket": _retailrocket,
}


def _read_csv(path: Path, fmt: str) -> list[Event]:
    mapper = MAPPERS[fmt]
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in HEADERS[fmt] if c not in (reader.fieldnames or ())]
        if missing:
            header = ",".join(HEADERS[fmt])
            msg = f"{path}: not a {fmt} file: missing columns {missing}; expected header {header}"
            raise DatasetError(msg)
        return [mapper(row, n) for n, row in enumerate(reader, start=2)]  # n: the file's line number


def _read_jsonl(path: Path) -> list[Event]:
    out: list[Event] = []
    with path.open(encoding="utf-8", errors="surrogateescape") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            # Lines that are not objects are passed on untouched (as text) for the worker to reject.
            out.append(value if isinstance(value, dict) else {"_raw": line.rstrip("\n"), "_line": n})
    return out


def _sort_key(ev: Event) -> tuple[int, int]:
    ts = parse_time_ms(ev.get("ts"))
    return (0, ts) if ts is not None else (1, 0)  # unparseable times last, in file order


def _derive_sessions(events: list[Event], gap_ms: int) -> None:
    """Session ids from inactivity, per user, over time-sorted events (sources without sessions)."""
    last: dict[object, tuple[int, int]] = {}  # user -> (last ts, session number)
    for ev in events:
        if ev.get("session_id") is not None:
            continue
        ts = parse_time_ms(ev.get("ts"))
        if ts is None:
            continue
        user = ev.get("user_id")
        prev = last.get(user)
        n = prev[1] + (ts - prev[0] > gap_ms) if prev else 0
        last[user] = (ts, n)
        ev["session_id"] = f"{user}-{n}"


def read_events(path: Path, fmt: str, *, session_gap_s: int = 1800) -> Iterator[Event]:
    """Events of ``path`` as canonical dicts in event-time order (stable: ties keep file order)."""
    if fmt not in FORMATS:
        msg = f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}"
        raise DatasetError(msg)
    try:
        events = _read_jsonl(path) if fmt == "jsonl" else _read_csv(path, fmt)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        msg = f"cannot read {path} as {fmt}: {exc}"
        raise DatasetError(msg) from None
    events.sort(key=_sort_key)
    if fmt != "jsonl":
        _derive_sessions(events, session_gap_s * 1000)
    yield from events
