"""Idempotence by event id: a bounded per-user memory of recent ids.

When the memory overflows, the oldest quarter is forgotten and ``floor_ms`` rises to the
newest forgotten time; events older than the floor are then refused as late, so an id is
never accepted twice.
"""

from __future__ import annotations

import hashlib

from features.state import UserState


def id_hash(event_id: str) -> int:
    """Stable 63-bit hash of an event id (Python's ``hash`` changes per process)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little") >> 1


def check(state: UserState, h: int, ts_ms: int) -> str | None:
    """``'duplicate'``, ``'late'`` (below the dedup floor) or ``None`` when the event is new."""
    if h in state.ids:
        return "duplicate"
    if ts_ms < state.floor_ms:
        return "late"
    return None


def remember(state: UserState, h: int, ts_ms: int, capacity: int) -> None:
    ids = state.ids
    ids[h] = ts_ms
    if len(ids) > capacity:
        ordered = sorted(ids.items(), key=lambda kv: kv[1])
        drop = ordered[: len(ids) - capacity * 3 // 4]
        for k, _ in drop:
            del ids[k]
        state.floor_ms = max(state.floor_ms, drop[-1][1])
