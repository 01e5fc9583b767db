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


def finalize(state: UserState, since_ms: int | None = None) -> None:
    """Drop buckets no window reaches; a resolution whose current bucket is the one it had at
    ``since_ms`` (see ``features.user.finalize``) is skipped: nothing below its floor was added."""
    for field, (width, keep) in KEEP.items():
        latest = state.last_ms // width
        if since_ms is not None and since_ms // width == latest:
            continue
        per_type: dict[str, dict[int, int]] = getattr(state, field)
        for t in list(per_type):
            prune(per_type[t], latest, keep)
            if not per_type[t]:
                del per_type[t]


_KEYS: dict[str, tuple[str, ...]] = {w: tuple(f"n_{t}_{w}" for t in COUNTED_TYPES) for w in WINDOWS}
_TOTALS: dict[str, str] = {w: f"n_events_{w}" for w in WINDOWS}
_ZEROS: dict[str, float | int | bool | None] = {
    k: 0 for w in WINDOWS for k in (*_KEYS[w], _TOTALS[w])
}  # every count, in catalogue order
# per resolution: its bucket width and the (at most two) windows over it, the wider first:
# (buckets in the window, type -> feature name, total's name)
_PLAN = tuple(
    (
        field,
        width,
        tuple(
            (n, dict(zip(COUNTED_TYPES, _KEYS[w], strict=True)), _TOTALS[w])
            for w, (f, _, n) in sorted(WINDOWS.items(), key=lambda kv: -kv[1][2])
            if f == field
        ),
    )
    for field, (width, _) in KEEP.items()
)
assert all(len(windows) <= 2 for _, _, windows in _PLAN), "result() reads at most two windows per resolution"


def result(state: UserState, as_of_ms: int) -> dict[str, float | int | bool | None]:
    """Every count as of ``as_of_ms`` (at or after the state's latest event, as ``compute`` clamps).

    Runs on every event and timer, so each type's buckets are read in one pass for both windows
    of their resolution; no bucket lies after ``as_of_ms`` (the state holds nothing later).
    """
    out = dict(_ZEROS)
    for field, width, windows in _PLAN:
        per_type: dict[str, dict[int, int]] = getattr(state, field)
        if not per_type:
            continue
        now_idx = as_of_ms // width
        wide_n, wide_keys, wide_total = windows[0]
        lo_wide = now_idx - wide_n
        if len(windows) == 1:
            total = 0
            for t, buckets in per_type.items():
                n = 0
                for i, c in buckets.items():
                    if i > lo_wide:
                        n += c
                out[wide_keys[t]] = n
                total += n
            out[wide_total] = total
            continue
        narrow_n, narrow_keys, narrow_total = windows[1]
        lo_narrow = now_idx - narrow_n
        total_wide = total_narrow = 0
        for t, buckets in per_type.items():
            wide = narrow = 0
            for i, c in buckets.items():
                if i > lo_wide:
                    wide += c
                    if i > lo_narrow:
                        narrow += c
            out[wide_keys[t]] = wide
            out[narrow_keys[t]] = narrow
            total_wide += wide
            total_narrow += narrow
        out[wide_total] = total_wide
        out[narrow_total] = total_narrow
    return out
