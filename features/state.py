"""Per-user feature state: one plain, msgpack-serialisable struct, bounded in size.

Every feature family (``counts``, ``activity``, ``commerce``) reads and writes its own fields.
The stored bytes start with a version tag: state written by another definition is refused
(:class:`Corrupt`, which the worker counts) rather than misread (see ``docs/features.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

V = TypeVar("V", bound=Any)

STATE_VERSION = 2  # 2: sessions also count add_to_cart and checkout_start


class UserState(msgspec.Struct, array_like=True):
    """Everything the worker remembers about one user. All times are epoch ms, UTC."""

    v: int = STATE_VERSION
    first_ms: int = 0  # earliest accepted event time
    last_ms: int = 0  # latest accepted event time: the user's event-time clock
    events: int = 0  # accepted events, lifetime
    floor_ms: int = 0  # events older than this were evicted from dedup memory: refused as late
    ids: dict[int, int] = msgspec.field(default_factory=dict)  # event-id hash -> ts
    cm: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)  # type -> minute -> n
    ch: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)  # type -> hour -> n
    cd: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)  # type -> day -> n
    last_cart_ms: int = 0  # latest add_to_cart (0: never)
    last_purchase_ms: int = 0  # latest purchase (0: never)
    orders: dict[int, list[float]] = msgspec.field(default_factory=dict)  # day -> [orders, revenue]
    sessions: dict[str, list[int]] = msgspec.field(
        default_factory=dict
    )  # id -> [start, end, events, adds, checkouts]
    cur_sid: str = ""  # current derived session, for events without session_id
    cart: list[tuple[int, str, int, float]] = msgspec.field(
        default_factory=list
    )  # (ts, product, +-qty, price)
    views: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)  # product -> hour -> views
    bought: dict[str, int] = msgspec.field(default_factory=dict)  # product -> latest purchase ts


@dataclass(frozen=True)
class FeatureParams:
    """Feature definitions that are configuration rather than code."""

    session_gap_ms: int = 1_800_000
    abandon_after_ms: int = 1_800_000
    dedup_capacity: int = 512


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(UserState)


def encode(state: UserState) -> bytes:
    return _encoder.encode(state)


class Corrupt(ValueError):
    """Stored or consumed bytes that are not the expected value: garbage, or another layout version.

    Pure code raises it; the worker counts it (``propstream_decode_errors_total{what}``), logs it
    and carries on with a fresh value, so one bad value never stops a batch.
    """

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"unreadable {what}: {detail}")
        self.what = what
        self.detail = detail


def decode(raw: bytes | None) -> UserState:
    """The stored state (a fresh one when absent); :class:`Corrupt` for garbage or another version.

    >>> decode(encode(UserState(events=3))).events
    3
    >>> try:
    ...     decode(b"\\xc1")
    ... except Corrupt as exc:
    ...     exc.what
    'features'
    """
    return decode_versioned(_decoder, raw, "features", STATE_VERSION, UserState)


class _Head(msgspec.Struct, array_like=True):
    """The leading fields of a stored :class:`UserState`: msgspec skips the rest unread."""

    v: int = 0
    first_ms: int = 0
    last_ms: int = 0


_head_decoder = msgspec.msgpack.Decoder(_Head)


def last_ms_of(raw: bytes) -> int:
    """The stored state's latest event time, read from its head only (a tenth of a full decode):
    the retention sweep asks this of every user it passes. :class:`Corrupt` as :func:`decode`.

    >>> last_ms_of(encode(UserState(last_ms=42)))
    42
    """
    return decode_versioned(_head_decoder, raw, "features", STATE_VERSION, _Head).last_ms


def decode_versioned(
    decoder: msgspec.msgpack.Decoder[V], raw: bytes | None, what: str, version: int, empty: Callable[[], V]
) -> V:
    """Decode a stored value that carries its layout version in ``v``; :class:`Corrupt` otherwise."""
    if not raw:
        return empty()
    try:
        value = decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise Corrupt(what=what, detail=str(exc)) from None
    if value.v != version:
        raise Corrupt(what=what, detail=f"layout version {value.v}, this version reads {version}")
    return value
