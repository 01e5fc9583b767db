"""Recency, tenure, engagement trend and sessions: how much and how lately a user is active."""

from __future__ import annotations

from features.buckets import DAY_MS
from features.state import FeatureParams, UserState

SESSION_WINDOW_MS = 7 * DAY_MS
MAX_SESSIONS = 64


def _seconds_since(as_of_ms: int, ts_ms: int) -> float | None:
    return None if ts_ms == 0 else (as_of_ms - ts_ms) / 1000.0


def update_session(
    state: UserState, session_id: str | None, ts_ms: int, params: FeatureParams, etype: str = ""
) -> None:
    """Extend the event's session; without a ``session_id``, a gap of ``session_gap_ms`` starts a new one.

    Derived sessions depend on arrival order; sessions keyed by the producer's id do not.
    """
    sid = session_id
    if sid is None:
        if not state.cur_sid or ts_ms - state.last_ms > params.session_gap_ms:
            state.cur_sid = f"~{ts_ms}"
        sid = state.cur_sid
    s = state.sessions.get(sid)
    if s is None:
        state.sessions[sid] = [ts_ms, ts_ms, 1, int(etype == "add_to_cart"), int(etype == "checkout_start")]
    else:
        if ts_ms < s[0]:
            s[0] = ts_ms
        if ts_ms > s[1]:
            s[1] = ts_ms
        s[2] += 1
        if etype == "add_to_cart":
            s[3] += 1
        elif etype == "checkout_start":
            s[4] += 1


def finalize(state: UserState) -> None:
    horizon = state.last_ms - SESSION_WINDOW_MS
    sessions = state.sessions
    for sid in [sid for sid, s in sessions.items() if s[1] <= horizon]:
        del sessions[sid]
    if len(sessions) > MAX_SESSIONS:
        for sid, _ in sorted(sessions.items(), key=lambda kv: kv[1][1])[: len(sessions) - MAX_SESSIONS]:
            del sessions[sid]


def result(state: UserState, as_of_ms: int, params: FeatureParams) -> dict[str, float | int | bool | None]:
    """Runs on every event and timer: the sessions are read in one pass (window, sums and the
    latest), the day buckets in another."""
    lo = as_of_ms - SESSION_WINDOW_MS
    n = n_events = span_ms = 0
    current: list[int] | None = None  # the latest session (the first of equals, as max() picks)
    for s in state.sessions.values():
        if s[1] > lo:
            n += 1
            n_events += s[2]
            span_ms += s[1] - s[0]
        if current is None or s[1] > current[1]:
            current = s
    today = as_of_ms // DAY_MS
    last7 = prev7 = 0
    mid, lo_d = today - 7, today - 14  # one pass: last7 = (mid, today], prev7 = (lo_d, mid]
    for buckets in state.cd.values():
        for d, c in buckets.items():
            if mid < d <= today:
                last7 += c
            elif lo_d < d <= mid:
                prev7 += c
    # the session in progress: the latest one, if its last event is within the session gap
    if current is not None and as_of_ms - current[1] > params.session_gap_ms:
        current = None
    return {
        "in_session": current is not None,
        "session_events": current[2] if current else 0,
        "session_duration_s": (current[1] - current[0]) / 1000.0 if current else 0.0,
        "session_add_to_cart": current[3] if current else 0,
        "session_checkout_start": current[4] if current else 0,
        "s_since_last_event": _seconds_since(as_of_ms, state.last_ms),
        "s_since_last_add_to_cart": _seconds_since(as_of_ms, state.last_cart_ms),
        "s_since_last_purchase": _seconds_since(as_of_ms, state.last_purchase_ms),
        "tenure_days": (as_of_ms - state.first_ms) / DAY_MS if state.first_ms else 0.0,
        "engagement_trend": (last7 - prev7) / (last7 + prev7) if last7 + prev7 else 0.0,
        "sessions_7d": n,
        "events_per_session_7d": n_events / n if n else 0.0,
        "mean_session_duration_s_7d": span_ms / n / 1000.0 if n else 0.0,
    }
