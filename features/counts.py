"""Event counts per type over 1h, 24h, 7d and 30d sliding windows (bucketed, see ``buckets``)."""

from __future__ import annotations

from features.buckets import DAY_MS, HOUR_MS, MINUTE_MS, add, prune
from features.contract import CANONICAL_TYPES
from features.state import UserState

COUNTED_TYPES: tuple[str, ...] = (*CANONICAL_TYPES, "custom")
# window name -> (state field, bucket width ms, buckets in the window)
WINDOWS: dict[str, tuple[str, int, int]] = {
    "1h": ("cm", MINUTE_MS, 60),
    "24h": ("ch", HOUR_MS, 24),
    "7d": ("ch", HOUR_MS, 168),
    "30d": ("cd", DAY_MS, 30),
}
# how many buckets each resolution keeps: the widest window that uses it
KEEP: dict[str, tuple[int, int]] = {"cm": (MINUTE_MS, 60), "ch": (HOUR_MS, 168), "cd": (DAY_MS, 30)}


def counted_type(etype: str) -> str:
    return etype if etype in CANONICAL_TYPES else "custom"


def update(state: UserState, etype: str, ts_ms: int) -> None:
    """Count one event; skip resolutions whose retained range it already falls behind."""
    t = counted_type(etype)
    latest = state.last_ms if state.last_ms > ts_ms else ts_ms
    for field, (width, keep) in KEEP.items():
        idx = ts_ms // width
        if idx > latest // width - keep:
            per_type: dict[str, dict[int, int]] = getattr(state, field)
            buckets = per_type.get(t)
            if buckets is None:
                buckets = per_type[t] = {}
            add(buckets, idx)


def finalize(state: UserState) -> None:
    for field, (width, keep) in KEEP.items():
        per_type: dict[str, dict[int, int]] = getattr(state, field)
        for t in list(per_type):
            prune(per_type[t], state.last_ms // width, keep)
            if not per_type[t]:
                del per_type[t]


_KEYS: dict[str, tuple[str, ...]] = {w: tuple(f"n_{t}_{w}" for t in COUNTED_TYPES) for w in WINDOWS}
_TOTALS: dict[str, str] = {w: f"n_events_{w}" for w in WINDOWS}


def result(state: UserState, as_of_ms: int) -> dict[str, float | int | bool | None]:
    # ``buckets.window_sum`` inlined, names precomputed: this runs once per user per batch when scoring
    out: dict[str, float | int | bool | None] = {}
    for window, (field, width, n_buckets) in WINDOWS.items():
        per_type: dict[str, dict[int, int]] = getattr(state, field)
        now_idx = as_of_ms // width
        lo = now_idx - n_buckets
        total = 0
        for t, key in zip(COUNTED_TYPES, _KEYS[window], strict=True):
            n = 0
            buckets = per_type.get(t)
            if buckets:
                for i, c in buckets.items():
                    if lo < i <= now_idx:
                        n += c
            out[key] = n
            total += n
        out[_TOTALS[window]] = total
    return out
