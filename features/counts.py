"""Event counts per type over 1h, 24h, 7d and 30d sliding windows (bucketed, see ``buckets``)."""

from __future__ import annotations

from features.buckets import DAY_MS, HOUR_MS, MINUTE_MS, add, prune, window_sum
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


def result(state: UserState, as_of_ms: int) -> dict[str, float | int | bool | None]:
    out: dict[str, float | int | bool | None] = {}
    for window, (field, width, n_buckets) in WINDOWS.items():
        per_type: dict[str, dict[int, int]] = getattr(state, field)
        now_idx = as_of_ms // width
        total = 0
        for t in COUNTED_TYPES:
            buckets = per_type.get(t)
            n = window_sum(buckets, now_idx, n_buckets) if buckets else 0
            out[f"n_{t}_{window}"] = n
            total += n
        out[f"n_events_{window}"] = total
    return out
