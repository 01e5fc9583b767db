"""The pending-label ledger: scored snapshots wait here until their label is known, without leakage.

A snapshot taken at event time ``t`` asks "does the target happen in ``(t, t + horizon]``?".
- Event targets (``purchase``, custom types): **positive** as soon as a matching event with time in
  that window is observed; **negative** once the clock passes ``t + horizon`` without one.
- The ``value`` target (:func:`make_target` ``"value"``): the snapshot's ``value`` is the revenue of
  every purchase with time in the window, summed; its label says whether there was one (so the
  hurdle model's classifier learns from the same snapshot). A labelled value snapshot keeps adding
  revenue until its horizon passes.
- The ``churn`` target: **negative** (not churned) as soon as any activity falls in the window;
  **positive** once the clock passes ``t + horizon`` with none. Its window opens after a grace
  period (``grace_ms``, default: the 30-minute session gap), so the rest of the session in which the
  snapshot was taken does not count as "coming back".
The window is closed at ``t + horizon``: an event exactly at the horizon still counts.

A label known early stays in the ledger until the horizon passes, and every snapshot leaves
(:func:`expire`) at its horizon whatever its label: learning in label-arrival order would feed the
model positives first (they resolve early) and wreck its calibration (see ``docs/models.md``).

Nothing observed after ``t`` ever changes a snapshot's features: they are frozen when it is offered.
Sampling keeps heavy users from dominating: at most one snapshot per user and target per
``sample_every_ms`` of event time, and at most ``max_pending`` waiting. Pure code over plain
state, so replay and live give the same labels.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

UNKNOWN = -1
VALUE = "value"  # the name of the value target


@dataclass(frozen=True)
class Target:
    """A prediction target as a data scientist declares it."""

    name: str
    horizon_ms: int
    event_types: frozenset[str] = frozenset()  # empty for churn: any activity counts
    churn: bool = False
    sample_every_ms: int = 3_600_000
    grace_ms: int = 0  # activity in (t, t + grace] does not resolve the snapshot
    max_pending: int = 64  # per user: bounds state; a heavier user is sampled less
    value: bool = False  # the revenue within the horizon, not whether the event happens

    def matches(self, event_type: str) -> bool:
        return self.churn or event_type in self.event_types

    @property
    def early_label(self) -> int:
        """The label an observed matching event gives (the censored label is its opposite)."""
        return 0 if self.churn else 1


def make_target(name: str, horizon_s: int, sample_every_s: int = 3600, max_pending: int = 64) -> Target:
    """``purchase``, ``churn``, or any event type as a custom target.

    >>> make_target("churn", 14 * 86400).grace_ms, sorted(make_target("value", 86400).event_types)
    (1800000, ['purchase'])
    """
    if name == VALUE:
        return Target(
            name,
            horizon_s * 1000,
            frozenset({"purchase"}),
            sample_every_ms=sample_every_s * 1000,
            max_pending=max_pending,
            value=True,
        )
    if name == "churn":
        return Target(
            name,
            horizon_s * 1000,
            churn=True,
            sample_every_ms=sample_every_s * 1000,
            grace_ms=1_800_000,
            max_pending=max_pending,
        )
    return Target(
        name,
        horizon_s * 1000,
        frozenset({name}),
        sample_every_ms=sample_every_s * 1000,
        max_pending=max_pending,
    )


def _packed(values: Sequence[float]) -> bytes:
    return array("d", values).tobytes()


VALUE_SCALE = 10_000  # revenue is summed in 1/10,000ths of the currency unit: exact in any order


def value_units(revenue: float | None) -> int:
    """``revenue`` in the ledger's integer units (None: a purchase without revenue adds nothing).

    Float sums depend on the order of the terms, and a user's purchases reach the worker in
    another order on replay (topics are not interleaved by time): integers make the label exact.

    >>> value_units(19.99), value_units(None), value_units(0.00004)
    (199900, 0, 0)
    """
    return 0 if revenue is None else round(revenue * VALUE_SCALE)


DENSE = -1  # ``Snapshot.size`` of a layout-2 snapshot: ``vector`` holds every input


class Snapshot(msgspec.Struct, array_like=True):
    """A scored snapshot waiting for its label.

    The model inputs are stored sparse and packed: ``vector`` holds the non-zero ones (float64, in
    the model's input order), ``at`` their positions (a byte each) and ``size`` how many inputs
    there are. A user's ledger (up to ``max_pending`` snapshots per target) is part of the row
    written whenever the user is touched, and about half the inputs of a snapshot are 0 (never
    seen, empty windows): measured on the simulator, a ledger of 29 snapshots took 15.1 kB dense.
    A packed vector decodes as one copy, a list of floats as one object per value. A snapshot of
    layout 2 (dense ``vector``, no ``at``) reads with ``size`` :data:`DENSE`.
    """

    ts_ms: int
    vector: bytes
    score: float
    model_version: int
    label: int = UNKNOWN  # known early (a target event, or churn activity) before the horizon
    resolved_ms: int = 0  # event time the label became known
    at: bytes = b""  # positions of the values in ``vector`` (layout 3)
    size: int = DENSE  # number of inputs (layout 3); DENSE: ``vector`` is every input (layout 2)
    value_units: int = 0  # value targets: revenue in the window so far (:data:`VALUE_SCALE` units)

    @property
    def value(self) -> float:
        """Revenue observed in the window so far, in currency units."""
        return self.value_units / VALUE_SCALE

    @classmethod
    def of(cls, ts_ms: int, features: Sequence[float], score: float, model_version: int) -> Snapshot:
        """A new snapshot of the inputs ``features`` (in the model's input order)."""
        at = bytes(i for i, v in enumerate(features) if v != 0.0)  # NaN is kept: NaN != 0
        vector = _packed([features[i] for i in at])
        return cls(ts_ms, vector, score, model_version, at=at, size=len(features))

    @property
    def features(self) -> list[float]:
        """The model inputs, in the model's input order (a -0.0 reads as 0.0)."""
        values = array("d")
        values.frombytes(self.vector)
        if self.size == DENSE:
            return values.tolist()
        out = [0.0] * self.size
        for i, v in zip(self.at, values, strict=True):
            out[i] = v
        return out


class Matured(msgspec.Struct, array_like=True):
    """A labelled snapshot whose horizon has passed: ready to learn from."""

    user_id: str
    target: str
    snapshot: Snapshot
    label: int
    resolved_ms: int


LEDGER_VERSION = 3  # 3: inputs sparse (2: packed, dense, read as is; 1: a list of floats, upgraded)
READABLE_LEDGERS = (2, 3)


class UserLedger(msgspec.Struct, array_like=True):
    """Per user: pending snapshots per target name, oldest first.

    ``v`` is the layout version, last so that ledgers written before it existed read as version 1.
    """

    pending: dict[str, list[Snapshot]] = msgspec.field(default_factory=dict)
    v: int = LEDGER_VERSION


class _SnapshotV1(msgspec.Struct, array_like=True):
    ts_ms: int
    features: list[float]
    score: float
    model_version: int
    label: int = UNKNOWN
    resolved_ms: int = 0


class _LedgerV1(msgspec.Struct, array_like=True):
    pending: dict[str, list[_SnapshotV1]] = msgspec.field(default_factory=dict)
    v: int = 1


_v1 = msgspec.msgpack.Decoder(_LedgerV1)


def upgrade_v1(raw: bytes) -> UserLedger | None:
    """A version-1 ledger (inputs as lists) in today's layout; None if ``raw`` is not one.

    So the pending labels of a worker upgraded in place are kept, not dropped as unreadable.
    """
    try:
        old = _v1.decode(raw)
    except msgspec.DecodeError:
        return None
    if old.v != 1:
        return None
    return UserLedger(
        {
            name: [
                Snapshot(s.ts_ms, _packed(s.features), s.score, s.model_version, s.label, s.resolved_ms)
                for s in snaps
            ]
            for name, snaps in old.pending.items()
        }
    )


def due(last_sampled_ms: int | None, target: Target, ts_ms: int) -> bool:
    """The sampling rule: is a snapshot at ``ts_ms`` allowed after the last one at ``last_sampled_ms``?"""
    return last_sampled_ms is None or ts_ms - last_sampled_ms >= target.sample_every_ms


def offer(ledger: UserLedger, target: Target, snap: Snapshot) -> bool:
    """Add ``snap`` unless ``max_pending`` snapshots whose window is still open at its time wait.
    True if kept.

    Snapshots whose horizon passed but which have not left yet do not count: when they leave
    depends on when the worker's batches end (a catch-up batch can span weeks of one user), and
    the cap must not, or a replay in other batches would keep other snapshots.
    """
    pending = ledger.pending.setdefault(target.name, [])
    if len(pending) >= target.max_pending:
        open_at = snap.ts_ms - target.horizon_ms  # windows ending before the new snapshot are closed
        if sum(s.ts_ms >= open_at for s in pending) >= target.max_pending:
            return False
    pending.append(snap)
    return True


def observe(
    ledger: UserLedger, targets: tuple[Target, ...], event_type: str, ts_ms: int, revenue: float | None = None
) -> int:
    """An event happened: label every unresolved snapshot whose window holds it (a value snapshot
    also adds ``revenue``, labelled or not). Returns how many snapshots it changed."""
    n = 0
    for target in targets:
        pending = ledger.pending.get(target.name)
        if not pending or not target.matches(event_type):
            continue
        units = value_units(revenue) if target.value else 0
        for snap in pending:
            if not snap.ts_ms + target.grace_ms < ts_ms <= snap.ts_ms + target.horizon_ms:
                continue
            if snap.label == UNKNOWN:
                snap.label = target.early_label
                snap.resolved_ms = ts_ms
                n += 1
            elif target.value:
                n += 1
            snap.value_units += units
    return n


def expire(ledger: UserLedger, user_id: str, targets: tuple[Target, ...], clock_ms: int) -> list[Matured]:
    """Event time reached ``clock_ms``: snapshots whose window closed before it leave, labelled."""
    out: list[Matured] = []
    for target in targets:
        pending = ledger.pending.get(target.name)
        if not pending:
            continue
        keep = []
        for snap in pending:
            if clock_ms > snap.ts_ms + target.horizon_ms:
                if snap.label == UNKNOWN:
                    out.append(Matured(user_id, target.name, snap, 1 - target.early_label, clock_ms))
                else:
                    out.append(Matured(user_id, target.name, snap, snap.label, snap.resolved_ms))
            else:
                keep.append(snap)
        if keep:
            ledger.pending[target.name] = keep
        else:
            del ledger.pending[target.name]
    return out


def open_from(ledger: UserLedger, target: Target) -> int | None:
    """Time of the oldest snapshot an event could still change (None: nothing to resolve).

    Any pending value snapshot can still gain revenue; others only until labelled.
    """
    times = [s.ts_ms for s in ledger.pending.get(target.name, ()) if target.value or s.label == UNKNOWN]
    return min(times) if times else None


def next_deadline(ledger: UserLedger, targets: tuple[Target, ...]) -> int:
    """Earliest ``t + horizon`` over pending snapshots (0: none pending)."""
    ends = [s.ts_ms + t.horizon_ms for t in targets for s in ledger.pending.get(t.name, ())]
    return min(ends) if ends else 0
