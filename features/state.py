"""Per-user feature state: one plain, msgpack-serialisable struct, bounded in size.

Every feature family (``counts``, ``activity``, ``commerce``) reads and writes its own fields.
The stored bytes start with a version tag: state written by an older definition is discarded
rather than misread (see ``docs/features.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

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


def decode(raw: bytes | None) -> UserState:
    """The stored state, or a fresh one when absent or written by another version."""
    if not raw:
        return UserState()
    try:
        state = _decoder.decode(raw)
    except msgspec.DecodeError:
        return UserState()
    return state if state.v == STATE_VERSION else UserState()
