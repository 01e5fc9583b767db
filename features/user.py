"""Fold events into a user's state and read features from it: the whole feature store, as pure code.

The worker, ``propstream eval`` and the tests all go through these three functions, so a replay
of history computes exactly what live processing computed. Features are order-insensitive for
events the user's state still covers (all but derived sessions and capped lists), so arrival
order across the three source topics does not change them.
"""

from __future__ import annotations

from collections.abc import Iterable

from features import activity, commerce, counts, dedup
from features.contract import Event
from features.state import FeatureParams, UserState

FeatureValue = float | int | bool | None


def apply(state: UserState, ev: Event, params: FeatureParams, min_ts_ms: int = 0) -> str | None:
    """Fold one event into ``state``; returns a rejection reason (``duplicate``/``late``) or ``None``.

    ``min_ts_ms`` is the lateness floor the caller derives from its watermark; a duplicate is
    reported as such even when it is also late.
    """
    h = dedup.id_hash(ev.event_id)
    refused = dedup.check(state, h, ev.ts_ms)
    if refused is None and ev.ts_ms < min_ts_ms:
        refused = "late"
    if refused is not None:
        return refused
    dedup.remember(state, h, ev.ts_ms, params.dedup_capacity)
    ts = ev.ts_ms
    counts.update(state, ev.type, ts)
    activity.update_session(state, ev.session_id, ts, params, ev.type)
    commerce.update(state, ev)
    if state.first_ms == 0 or ts < state.first_ms:
        state.first_ms = ts
    if ts > state.last_ms:
        state.last_ms = ts
    state.events += 1
    return None


def finalize(state: UserState, since_ms: int | None = None) -> None:
    """Drop what no future window can reach; call once after a batch of ``apply``.

    ``since_ms``: the state's latest event time when it was last finalised, with nothing but
    :func:`apply` since (the hot path, :class:`Finalizer`). A bucketed window whose floor has not
    moved since then has nothing to drop: ``apply`` adds no bucket below it.
    """
    counts.finalize(state, since_ms)
    activity.finalize(state)
    commerce.finalize(state, since_ms)


class Finalizer:
    """:func:`finalize`, skipped for the state it finalized last while that state is unchanged.

    The hot path asks after every event, and again before a snapshot, a trigger and the store
    write. A state changes only through :func:`apply`, which moves ``events``, so the same object
    with the same ``events`` and latest time has nothing left to drop, and one with a later
    latest time needs only the windows whose floor moved (``finalize(state, since_ms)``).
    """

    __slots__ = ("_events", "_last_ms", "_state")

    def __init__(self) -> None:
        self._state: UserState | None = None
        self._events = self._last_ms = -1

    def __call__(self, state: UserState) -> None:
        if state is self._state:
            if state.events == self._events and state.last_ms == self._last_ms:
                return
            finalize(state, self._last_ms)
        else:
            finalize(state)
        self._state, self._events, self._last_ms = state, state.events, state.last_ms


def compute(state: UserState, as_of_ms: int, params: FeatureParams) -> dict[str, FeatureValue]:
    """All features as of ``as_of_ms`` (clamped to the user's latest event: state holds no earlier view)."""
    as_of = max(as_of_ms, state.last_ms)
    out = counts.result(state, as_of)
    out.update(activity.result(state, as_of, params))
    out.update(commerce.result(state, as_of, params))
    return out


def fold(events: Iterable[Event], params: FeatureParams, state: UserState | None = None) -> UserState:
    """Apply events in order and finalize: the reference path used by replays and tests."""
    st = state or UserState()
    for ev in events:
        apply(st, ev, params)
    finalize(st)
    return st
