"""Readers for real public event logs, mapped to our event contract and sorted by event time.

:func:`read_events` yields canonical event dicts (``docs/events.md``) so ``propstream replay``
publishes them exactly as a live producer would. The reader judges files, not rows: a file it cannot
read as the format raises :class:`DatasetError`, but no row is dropped or "repaired" silently. A row
whose value does not parse keeps the original text (``"ts": "yesterday"``, ``"price": "n/a"``) and an
empty required value becomes ``None``, so the worker's validation rejects the row with a reason
(``bad_time``, ``wrong_type``, ``missing_field``) and the dead-letter topic shows it. Only blank lines
are skipped; undecodable bytes become U+FFFD.

Formats (one name per source, see :data:`FORMATS`):

- ``taobao``: ``user_id,item_id,category_id,behavior,timestamp`` (unix seconds); ``pv``, ``fav``,
  ``cart``, ``buy`` become ``product_view``, ``add_to_wishlist``, ``add_to_cart``, ``purchase``.
  No prices.
- ``rees46``: ``event_time,event_type,product_id,category_id,category_code,brand,price,user_id,
  user_session`` (``2019-10-01 00:00:00 UTC``); ``view``, ``cart``, ``remove_from_cart``,
  ``purchase``; a purchase is one item (quantity 1, revenue = price).
- ``retailrocket``: ``timestamp,visitorid,event,itemid,transactionid`` (epoch ms); ``view``,
  ``addtocart``, ``transaction`` (``order_id`` = transactionid). No prices.
- ``jsonl``: one JSON object per line, already in our contract, passed through unchanged. A line that
  is not a JSON object becomes ``{"_raw": <line>, "_line": <number>}`` (it has no ``type``, so the
  worker dead-letters it as ``missing_field`` with the original text in the value).

Other vocabulary (an unknown behaviour) is passed through as the type, for ``unknown_type``.
``event_id`` is ``<format>-<line number>``: deterministic, unique, and it points at the source line.
Events are sorted by event time (stable: ties keep file order); events whose time does not parse
come last, in file order. Sources without sessions get ``session_id`` ``<user>-<n>`` from inactivity:
per user, in time order, a gap longer than ``session_gap_s`` starts session ``n + 1``.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     path = Path(d) / "t.csv"
...     _ = path.write_text("user_id,item_id,category_id,behavior,timestamp\\n7,11,3,buy,1511600000\\n")
...     list(read_events(path, "taobao"))  # doctest: +NORMALIZE_WHITESPACE
[{'event_id': 'taobao-2', 'user_id': '7', 'type': 'purchase', 'ts': 1511600000000,
  'product_id': '11', 'category': '3', 'session_id': '7-0'}]
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec

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
HEADERS: dict[str, tuple[str, ...]] = {
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

EventDict = dict[str, object]
Cells = list[str | None]  # a row's cells in HEADERS order; None: empty, or missing from a short row


class DatasetError(ValueError):
    """The file cannot be read as the given format; the message says why and what was expected."""


def _int(text: str | None, scale: int = 1) -> object:
    """An integer (times ``scale``), else the original text for the worker to reject; None if empty."""
    if text is None:
        return None
    try:
        return int(text) * scale
    except ValueError:
        return text


def _put(ev: EventDict, key: str, value: object) -> None:
    if value is not None:
        ev[key] = value


def _taobao(cells: Cells, line: int) -> EventDict:
    user, item, category, behaviour, seconds = cells
    ev: EventDict = {
        "event_id": f"taobao-{line}",
        "user_id": user,
        "type": TAOBAO_TYPES.get(behaviour, behaviour) if behaviour is not None else None,
        "ts": _int(seconds, 1000),  # unix seconds in the source
    }
    _put(ev, "product_id", item)
    _put(ev, "category", category)
    return ev


@functools.lru_cache(maxsize=1024)  # many rows share a second
def _rees46_time(text: str) -> object:
    """``2019-10-01 00:00:00 UTC`` (or ISO-8601 with an offset) to epoch ms, else the text itself."""
    if text.endswith(" UTC"):
        try:
            return int(datetime.fromisoformat(text[:-4]).replace(tzinfo=UTC).timestamp() * 1000)
        except ValueError:
            return text
    ms = parse_time_ms(text)
    return ms if ms is not None else text


def _rees46(cells: Cells, line: int) -> EventDict:
    when, kind, product, category_id, category_code, _brand, price_text, user, session = cells
    etype = REES46_TYPES.get(kind, kind) if kind is not None else None
    ev: EventDict = {
        "event_id": f"rees46-{line}",
        "user_id": user,
        "type": etype,
        "ts": _rees46_time(when) if when is not None else None,
    }
    _put(ev, "session_id", session)
    _put(ev, "product_id", product)
    _put(ev, "category", category_code or category_id)
    if price_text is not None:
        try:
            price: object = float(price_text)
        except ValueError:
            price = price_text  # the worker rejects it as wrong_type, with the row
        ev["price"] = price
        if etype == "purchase" and isinstance(price, float):
            ev["revenue"] = price
    if etype in ("add_to_cart", "remove_from_cart", "purchase"):
        ev["quantity"] = 1
    return ev


def _retailrocket(cells: Cells, line: int) -> EventDict:
    ms, visitor, kind, item, transaction = cells
    ev: EventDict = {
        "event_id": f"retailrocket-{line}",
        "user_id": visitor,
        "type": RETAILROCKET_TYPES.get(kind, kind) if kind is not None else None,
        "ts": _int(ms),  # already milliseconds
    }
    _put(ev, "product_id", item)
    _put(ev, "order_id", transaction)
    return ev


MAPPERS: dict[str, Callable[[Cells, int], EventDict]] = {
    "taobao": _taobao,
    "rees46": _rees46,
    "retailrocket": _retailrocket,
}


def _read_csv(path: Path, fmt: str) -> list[EventDict]:
    mapper, expected = MAPPERS[fmt], HEADERS[fmt]
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        try:
            header = [name.strip() for name in next(reader, [])]
            missing = [c for c in expected if c not in header]
            if missing:
                found = ",".join(header) if header else "(empty file)"
                msg = (
                    f"{path}: not a {fmt} file: missing columns {', '.join(missing)}; "
                    f"expected header {','.join(expected)}; found {found}"
                )
                raise DatasetError(msg)
            columns = [header.index(name) for name in expected]
            out: list[EventDict] = []
            for row in reader:
                if not row:
                    continue  # a blank line carries no event
                width = len(row)
                cells: Cells = [(row[i] or None) if i < width else None for i in columns]
                out.append(mapper(cells, reader.line_num))
        except csv.Error as exc:
            msg = f"{path}, line {reader.line_num}: not readable as CSV: {exc}"
            raise DatasetError(msg) from None
    return out


def _read_jsonl(path: Path) -> list[EventDict]:
    decode = msgspec.json.decode
    out: list[EventDict] = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value = decode(raw)
            except msgspec.DecodeError:
                value = None
            if isinstance(value, dict):
                out.append(value)
            else:
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                out.append({"_raw": text, "_line": n})
    return out


def _time_of(ev: EventDict) -> int | None:
    return parse_time_ms(ev["ts"] if "ts" in ev else ev.get("timestamp"))


def _derive_sessions(events: list[EventDict], gap_ms: int) -> None:
    """Session ids from inactivity, per user, over time-sorted events that have none."""
    last: dict[object, tuple[int, int]] = {}  # user -> (latest ts, session number)
    for ev in events:
        user = ev.get("user_id")
        if "session_id" in ev or user is None:
            continue
        ts = _time_of(ev)
        if ts is None:
            continue
        prev = last.get(user)
        n = (prev[1] + (ts - prev[0] > gap_ms)) if prev is not None else 0
        last[user] = (ts, n)
        ev["session_id"] = f"{user}-{n}"


def read_events(path: Path, fmt: str, *, session_gap_s: int = 1800) -> Iterator[EventDict]:
    """Events of ``path`` as canonical dicts in event-time order (stable: ties keep file order).

    The whole file is read (and any :class:`DatasetError` raised) before this returns: sorting needs
    every row.
    """
    if fmt not in FORMATS:
        msg = f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}"
        raise DatasetError(msg)
    if session_gap_s <= 0:
        msg = f"session_gap_s must be > 0, got {session_gap_s}"
        raise DatasetError(msg)
    try:
        events = _read_jsonl(path) if fmt == "jsonl" else _read_csv(path, fmt)
    except OSError as exc:
        msg = f"cannot read {path} as {fmt}: {exc}"
        raise DatasetError(msg) from None
    # Unparseable times sort after every real one; the sort is stable, so ties keep file order.
    events.sort(key=lambda ev: t if (t := _time_of(ev)) is not None else math.inf)
    if fmt != "jsonl":
        _derive_sessions(events, session_gap_s * 1000)
    return iter(events)
