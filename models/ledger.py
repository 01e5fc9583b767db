"""The pending-label ledger: scored snapshots wait here until their label is known, without leakage.

A snapshot taken at event time ``t`` asks "does the target happen in ``(t, t + horizon]``?".
- Event targets (``purchase``, custom types): **positive** as soon as a matching event with time in
  that window is observed; **negative** once the clock passes ``t + horizon`` without one.
- The ``churn`` target: **negative** (not churned) as soon as any activity falls in the window;
  **positive** once the clock passes ``t + horizon`` with none. Its window opens after a grace
  period (``grace_ms``, default: the 30-minute session gap), so the rest of the session in which the
  snapshot was taken does not count as "coming back".
The window is closed at ``t + horizon``: an event exactly at the horizon still counts.

Nothing observed after ``t`` ever changes a snapshot's features: they are frozen when it is offered.
Sampling keeps heavy users from dominating: at most one snapshot per user and target per
``sample_every_ms`` of event time. Pure code over plain state, so replay and live give the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


@dataclass(frozen=True)
class Target:
    """A prediction target as a data scientist declares it."""

    name: str
    horizon_ms: int
    event_types: frozenset[str] = frozenset()  # empty for churn: any activity counts
    churn: bool = False
    sample_every_ms: int = 3_600_000
    grace_ms: int = 0  # activity in (t, t + grace] does not resolve the snapshot

    def matches(self, event_type: str) -> bool:
        return self.churn or event_type in self.event_types


class Snapshot(msgspec.Struct, array_like=True):
    ts_ms: int
    features: list[float]
    score: float
    model_version: int


class Matured(msgspec.Struct, array_like=True):
    """A labelled snapshot, ready to learn from."""

    user_id: str
    target: str
    snapshot: Snapshot
    label: int
    resolved_ms: int


class UserLedger(msgspec.Struct, array_like=True):
    """Per user: pending snapshots and the last sampled time, per target name."""

    pending: dict[str, list[Snapshot]] = msgspec.field(default_factory=dict)
    last_sampled: dict[str, int] = msgspec.field(default_factory=dict)


def offer(ledger: UserLedger, target: Target, snap: Snapshot) -> bool:
    """Add ``snap`` unless the sampling rule says this user was sampled too recently. True if kept."""
    last = ledger.last_sampled.get(target.name)
    if last is not None and snap.ts_ms - last < target.sample_every_ms:
        return False
    ledger.last_sampled[target.name] = snap.ts_ms
    ledger.pending.setdefault(target.name, []).append(snap)
    return True


def observe(
    ledger: UserLedger, user_id: str, targets: tuple[Target, ...], event_type: str, ts_ms: int
) -> list[Matured]:
    """An event happened: resolve every pending snapshot whose window contains it and whose target it hits."""
    out: list[Matured] = []
    for target in targets:
        pending = ledger.pending.get(target.name)
        if not pending or not target.matches(event_type):
            continue
        keep = []
        for snap in pending:
            if snap.ts_ms + target.grace_ms < ts_ms <= snap.ts_ms + target.horizon_ms:
                out.append(Matured(user_id, target.name, snap, 0 if target.churn else 1, ts_ms))
            else:
                keep.append(snap)
        ledger.pending[target.name] = keep
    return out


def expire(ledger: UserLedger, user_id: str, targets: tuple[Target, ...], clock_ms: int) -> list[Matured]:
    """Event time reached ``clock_ms``: snapshots whose window closed before it are censored."""
    out: list[Matured] = []
    for target in targets:
        pending = ledger.pending.get(target.name)
        if not pending:
            continue
        keep = []
        for snap in pending:
            if clock_ms > snap.ts_ms + target.horizon_ms:
                out.append(Matured(user_id, target.name, snap, 1 if target.churn else 0, clock_ms))
            else:
                keep.append(snap)
        ledger.pending[target.name] = keep
    return out
