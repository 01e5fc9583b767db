"""Scoring inside the ingest batch: snapshots and labels per event, scores and change events per user.

Called by :class:`streams.ingest.IngestHandler` while it holds the partition context. The score
state and the ledger are two parts of the user's row (``streams/rows.py``), so their writes land in
the user's partition and changelog with the features, in one message. Per user and batch: one
read of the small score state, the ledger only when needed. Per partition and batch: snapshots
whose horizon passed the partition's lateness floor leave the ledger, labelled, for the trainer
(no accepted event can still change their label). Unreadable stored parts are reported to
:class:`streams.faults.Faults` and start afresh; a failure inside one user's horizon is isolated.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from features.contract import Event
from features.state import Corrupt, UserState
from models.drift import DriftMonitor, uniform_edges
from models.ledger import Matured
from models.scoring import LazyLedger, ScoreState, ScoringCore, decode_state, encode
from models.training import Example, inputs_hash
from streams.faults import Faults
from streams.metrics import Metrics
from streams.model_metrics import ModelMetrics

CHANGE_SCHEMA = "propstream.change/1"

# Drift of the main model inputs (log1p-compressed, so one set of edges fits counts, money and
# durations), beside the score's drift per target. Reference: the first 10,000 values a worker sees.
DRIFT_INPUTS = ("n_events_24h", "n_events_7d", "session_events", "cart_value", "s_since_last_event")
LOG_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 10.0, 13.0)


class KV(Protocol):
    """One partitioned key-value table (a Faust table in the worker, a dict in tests and eval)."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def scan(self, partition: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        """Every key and value stored for ``partition`` on this process, in key order after ``after``."""


class MemoryKV:
    """A :class:`KV` over a dict (one partition: scans return everything)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def set(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def scan(self, partition: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        for key in sorted(k for k in self.data if after is None or k > after):
            yield key, self.data[key]


def iso_ms(ts_ms: int) -> str:
    return (
        datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class UserScoring:
    __slots__ = ("deadline_ms", "ledger", "raw", "state", "user_id")

    def __init__(self, user_id: str, raw: bytes | None, state: ScoreState, ledger: LazyLedger) -> None:
        self.user_id = user_id
        self.raw = raw
        self.state = state
        self.deadline_ms = state.deadline_ms  # as read: a new one goes into the horizon heap
        self.ledger = ledger


class ScoreStage:
    def __init__(
        self,
        core: ScoringCore,
        scores: KV,
        ledgers: KV,
        send_change: Callable[[str, bytes], None],
        send_example: Callable[[str, bytes], None],
        metrics: ModelMetrics,
        wall_clock: Callable[[], float] = time.time,
        faults: Faults | None = None,
    ) -> None:
        self.core = core
        self.faults = faults or Faults(Metrics())
        self.scores = scores
        self.ledgers = ledgers
        self.send_change = send_change
        self.send_example = send_example
        self.metrics = metrics
        self.wall_clock = wall_clock
        self.deadlines: dict[int, list[tuple[int, str]]] = {}  # partition -> heap of (horizon, user)
        self.inputs_hash = inputs_hash()
        self._json = msgspec.json.Encoder()
        self._msgpack = msgspec.msgpack.Encoder()
        self._batch_scores: dict[str, list[float]] = {}
        self._changes = 0
        score_edges = uniform_edges(0.0, 1.0, 10)
        self.score_drift = {t.name: DriftMonitor(score_edges) for t in core.targets}
        self.input_drift = {name: DriftMonitor(LOG_EDGES) for name in DRIFT_INPUTS}

    # --- per user ----------------------------------------------------------------------------
    def begin_user(self, user_id: str) -> UserScoring:
        raw = self.scores.get(user_id)
        ledger = LazyLedger(lambda: self.ledgers.get(user_id), lambda exc: self.faults.corrupt(exc, user_id))
        return UserScoring(user_id, raw, self._state(user_id, raw), ledger)

    def _state(self, user_id: str, raw: bytes | None) -> ScoreState:
        try:
            return decode_state(raw)
        except Corrupt as exc:
            self.faults.corrupt(exc, user_id)
            return ScoreState()  # what downstream was told is forgotten: the next change is a baseline

    def on_event(self, u: UserScoring, st: UserState, ev: Event) -> None:
        self.core.on_event(u.state, u.ledger, st, ev)

    def end_user(self, u: UserScoring, st: UserState, trigger: Event, partition: int) -> None:
        """Rescore, then write and publish: what cannot be taken back (sends) comes last."""
        scores, changes = self.core.rescore(u.user_id, u.state, st, trigger)
        out: list[bytes] = []
        if changes:
            now_ms = int(self.wall_clock() * 1000)
            for ch in changes:
                ch["schema"] = CHANGE_SCHEMA
                ch["event_time"] = iso_ms(ch["event_ts_ms"])
                ch["emit_ts_ms"] = now_ms
                ch["emitted_at"] = iso_ms(now_ms)
                out.append(self._json.encode(ch))
        self._save(u, partition)
        for target, s in scores.items():
            self._batch_scores.setdefault(target, []).append(s)
        x = self.core.last_inputs
        for name, monitor in self.input_drift.items():
            monitor.observe(x.get(name, math.nan))
        for ch, value in zip(changes, out, strict=True):
            self.send_change(u.user_id, value)
            self.metrics.changes.labels(ch["target"], ch["reason"], ch["direction"]).inc()
        self._changes += len(changes)

    def _save(self, u: UserScoring, partition: int) -> None:
        """Write the user's score state and ledger (encoded first: a failure writes neither)."""
        raw = encode(u.state)
        led = u.ledger.loaded
        led_raw = encode(led) if u.ledger.dirty and led is not None and led.pending else None
        if raw != u.raw:
            self.scores.set(u.user_id, raw)
            u.raw = raw
        if u.ledger.dirty and led is not None:
            if led_raw is not None:
                self.ledgers.set(u.user_id, led_raw)
            else:
                self.ledgers.delete(u.user_id)
            u.ledger.dirty = False
        end = u.state.deadline_ms
        if end and end != u.deadline_ms and partition in self.deadlines:
            heapq.heappush(self.deadlines[partition], (end, u.user_id))
        u.deadline_ms = end

    # --- per partition -------------------------------------------------------------------------
    def expire_partition(self, partition: int, clock_ms: int) -> int:
        """Send every snapshot whose horizon is before ``clock_ms`` to the trainer; returns how many."""
        heap = self.deadlines.get(partition)
        if heap is None:
            heap = self.deadlines[partition] = self._index(partition)
        sent = 0
        while heap and heap[0][0] < clock_ms:
            end, user = heapq.heappop(heap)
            try:
                u = self.begin_user(user)
                if u.state.deadline_ms != end:
                    continue  # stale entry: the user's earliest horizon moved
                matured = self.core.expire(user, u.state, u.ledger, end + 1)  # one horizon at a time
                self._save(u, partition)
            except Exception as exc:  # nothing of it was written; re-indexed when the partition moves
                self.faults.failed("expire", exc, user)
                continue
            for m in matured:
                self._send(m)
                sent += 1
        return sent

    def _index(self, partition: int) -> list[tuple[int, str]]:
        """Pending horizons of a partition this process just got: read once from the table."""
        heap = []
        for user, raw in self.scores.scan(partition):
            ss = self._state(user, raw)
            if ss.deadline_ms:
                heap.append((ss.deadline_ms, user))
        heapq.heapify(heap)
        return heap

    def forget_user(self, user_id: str) -> None:
        """Drop a user's score state and pending labels (retention; tombstones on the changelogs)."""
        self.scores.delete(user_id)
        self.ledgers.delete(user_id)

    def forget(self, partitions: set[int]) -> None:
        """Partitions moved to another worker: their horizons are that worker's now."""
        for p in partitions:
            self.deadlines.pop(p, None)

    def _send(self, m: Matured) -> None:
        s = m.snapshot
        ex = Example(m.target, s.ts_ms, s.features, m.label, s.score, s.model_version, self.inputs_hash)
        self.send_example(m.target, self._msgpack.encode(ex))
        self.metrics.matured.labels(m.target, "positive" if m.label else "negative").inc()

    # --- per batch ---------------------------------------------------------------------------
    def end_batch(self, started: float) -> None:
        if self._batch_scores:
            self.metrics.record_scores(self._batch_scores)
            for target, values in self._batch_scores.items():
                monitor = self.score_drift[target]
                for v in values:
                    monitor.observe(v)
                self._set_psi(target, "score", monitor)
            for name, monitor in self.input_drift.items():
                self._set_psi("all", name, monitor)
            self._batch_scores = {}
        if self._changes:
            self.metrics.emit_latency.observe(time.perf_counter() - started)
            self._changes = 0

    def _set_psi(self, target: str, name: str, monitor: DriftMonitor) -> None:
        value = monitor.psi()
        if value is not None:
            self.metrics.psi.labels(target, name).set(value)

    def current(self, user_id: str, st: UserState) -> dict[str, Any]:
        """Per target: score, tier, model version, warming-up flag and top factors as of the user's
        last event (the per-target dict is built in one place, ``streams/lookup.py``)."""
        from streams.lookup import user_scores

        return user_scores(self.core, self.scores, self.ledgers, self.faults, user_id, st, st.last_ms)[1]
