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
from models.audience_stats import PartitionStats
from models.drift import DriftMonitor, uniform_edges
from models.ledger import Matured
from models.online import INPUT_NAMES
from models.scoring import LazyLedger, ScoreState, ScoringCore, decode_state, encode
from models.training import Example, inputs_hash
from streams.faults import Faults
from streams.metrics import Metrics
from streams.model_metrics import ModelMetrics

CHANGE_SCHEMA = "propstream.change/1"
TRIGGER_SCHEMA = "propstream.trigger/1"
AUDIENCE_SCHEMA = "propstream.audience/1"

Headers = list[tuple[str, bytes]]
# key, value (None: a tombstone, the audience's left event), headers
SendAudience = Callable[[bytes, bytes | None, Headers], None]

# Drift of the main model inputs (log1p-compressed, so one set of edges fits counts, money and
# durations), beside the score's drift per target. Reference: the first 10,000 values a worker sees.
DRIFT_INPUTS = ("n_events_24h", "n_events_7d", "session_events", "cart_value", "s_since_last_event")
PSI_EVERY_S = 1.0  # the drift gauges are computed at most this often (a scrape is every few seconds)
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
    """One user's score state and ledger while a batch works on them, and what it will publish."""

    __slots__ = (
        "audience_out",
        "changes",
        "deadline_ms",
        "fired",
        "ledger",
        "moves",
        "raw",
        "state",
        "timer_ms",
        "triggers",
        "user_id",
        "was",
    )

    def __init__(self, user_id: str, raw: bytes | None, state: ScoreState, ledger: LazyLedger) -> None:
        self.user_id = user_id
        self.raw = raw
        self.state = state
        self.deadline_ms = state.deadline_ms  # as read: a new one goes into the horizon heap
        self.timer_ms = state.timer_ms  # as read: an earlier one goes into the timer heap
        self.ledger = ledger
        self.changes: list[dict[str, Any]] = []  # published only once the whole user succeeded
        self.triggers: list[dict[str, Any]] = []
        self.moves: list[dict[str, Any]] = []  # audience entered / left
        self.audience_out: list[tuple[bytes, bytes | None, Headers]] = []
        self.fired = False
        self.was: tuple[dict[str, float], list[str]] | None = None  # as counted in the partition's stats


class PartitionIndex:
    """A partition's horizon and timer heaps, rebuilt a slice per batch after an assignment.

    Each heap holds at least one entry at or before every user's current due time (stale entries
    are checked against the user's state when popped, and re-queued if the time moved later), so
    it has one live entry per user however often the user's times change. Until the rebuild has
    read every user, a timer or horizon of a user not read yet fires later than its time (as of
    its time all the same: the user's own events fire it first if they come).
    """

    __slots__ = ("cursor", "deadlines", "indexed", "timers")

    def __init__(self) -> None:
        self.deadlines: list[tuple[int, str]] = []
        self.timers: list[tuple[int, str]] = []
        self.cursor: str | None = None
        self.indexed = False


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
        send_trigger: Callable[[str, bytes], None] | None = None,
        index_slice: int = 20_000,
        send_audience: SendAudience | None = None,
    ) -> None:
        self.core = core
        self.send_audience = send_audience or (lambda key, value, headers: None)
        self.stats: dict[int, PartitionStats] = {}  # per partition: sizes, converters, distributions
        self.faults = faults or Faults(Metrics())
        self.counters = self.faults.metrics  # triggers and timers, beside the event counters
        self.send_trigger = send_trigger or (lambda user, value: None)
        self.index_slice = index_slice
        self.parts: dict[int, PartitionIndex] = {}
        self.scores = scores
        self.ledgers = ledgers
        self.send_change = send_change
        self.send_example = send_example
        self.metrics = metrics
        self.wall_clock = wall_clock
        self.inputs_hash = inputs_hash()
        self._json = msgspec.json.Encoder()
        self._msgpack = msgspec.msgpack.Encoder()
        self._batch_scores: dict[str, list[float]] = {}
        self._changes = 0
        self._moved: dict[tuple[str, str], int] = {}  # (audience, event) -> published this batch
        self._psi_at = -math.inf  # monotonic s of the last PSI gauges: at most once a second
        self._figures_at = -math.inf  # likewise for the audience sizes
        score_edges = uniform_edges(0.0, 1.0, 10)
        value_edges = tuple(math.expm1(e) for e in LOG_EDGES)  # amounts: a log scale, any currency
        self.score_drift = {
            t.name: DriftMonitor(value_edges if t.value else score_edges) for t in core.targets
        }
        self.input_drift = {name: DriftMonitor(LOG_EDGES) for name in DRIFT_INPUTS}
        self._drift_at = [(INPUT_NAMES.index(name), m) for name, m in self.input_drift.items()]

    # --- per user ----------------------------------------------------------------------------
    def begin_partition(self, partition: int) -> None:
        """The users that follow are of ``partition``: its percentile cuts are the ones in force.

        Taken once per partition and batch, so every user of the batch meets the same cuts."""
        if self.core.audiences:
            self.core.cuts = self.stats_of(partition).cuts()
            self.core.untrusted = self.core.untrusted_targets()

    def begin_user(self, user_id: str) -> UserScoring:
        raw = self.scores.get(user_id)
        ledger = LazyLedger(lambda: self.ledgers.get(user_id), lambda exc: self.faults.corrupt(exc, user_id))
        u = UserScoring(user_id, raw, self._state(user_id, raw), ledger)
        if self.core.audiences:
            u.was = _counted(u.state)
        return u

    def _state(self, user_id: str, raw: bytes | None) -> ScoreState:
        try:
            return decode_state(raw)
        except Corrupt as exc:
            self.faults.corrupt(exc, user_id)
            return ScoreState()  # what downstream was told is forgotten: the next change is a baseline

    def on_event(self, u: UserScoring, st: UserState, ev: Event) -> None:
        """``ev`` was just folded into ``st``: labels, snapshot, triggers, and a rescore now.

        Every event is rescored (not once per batch), so the change events are the same however
        the stream was cut into batches; the features are computed once for both.
        """
        self.core.finalize(st)
        self.core.on_event(u.state, u.ledger, st, ev, u.triggers)
        scores, changes, moves = self.core.rescore(u.user_id, u.state, st, ev)
        u.changes.extend(changes)
        if moves:
            u.moves.extend(moves)
        for target, s in scores.items():
            self._batch_scores.setdefault(target, []).append(s)
        x = self.core.last_vector
        for i, monitor in self._drift_at:
            monitor.observe(x[i])

    def fire_user(self, u: UserScoring, st: UserState, clock_ms: int) -> None:
        """Fire the user's timers due by ``clock_ms`` (before an event past them is applied)."""
        fired = self.core.fire(u.user_id, u.state, u.ledger, st, clock_ms)
        u.changes.extend(fired.changes)
        u.triggers.extend(fired.triggers)
        u.moves.extend(fired.audiences)
        u.fired = True
        self.counters.timers_fired.inc()

    def end_user(self, u: UserScoring, partition: int) -> None:
        """The user's events and timers of the batch are done: write, then publish (what cannot be
        taken back comes last)."""
        out = self._encode(u)
        self._save(u, partition)
        self._publish(u, out)

    def _encode(self, u: UserScoring) -> list[tuple[str, bytes]]:
        now_ms = int(self.wall_clock() * 1000)
        out: list[tuple[str, bytes]] = []
        for ch in u.changes:
            ch["schema"] = CHANGE_SCHEMA
            ch["event_time"] = iso_ms(ch["event_ts_ms"])
            ch["emit_ts_ms"] = now_ms
            ch["emitted_at"] = iso_ms(now_ms)
            out.append(("change", self._json.encode(ch)))
        for tr in u.triggers:
            body = {
                "schema": TRIGGER_SCHEMA,
                "trigger": tr["trigger"],
                "trigger_id": tr["trigger_id"],
                "user_id": u.user_id,
                "event_ts_ms": tr["event_ts_ms"],
                "event_time": iso_ms(tr["event_ts_ms"]),
                "emit_ts_ms": now_ms,
                "emitted_at": iso_ms(now_ms),
                "facts": tr["facts"],
                "scores": tr["scores"],
            }
            out.append(("trigger", self._json.encode(body)))
        u.audience_out = [self._audience(u.user_id, mv, now_ms) for mv in u.moves]
        return out

    def _audience(self, user_id: str, mv: dict[str, Any], now_ms: int) -> tuple[bytes, bytes | None, Headers]:
        """An audience move as its message: entered is a JSON value, left a tombstone with headers
        (so the compacted topic holds exactly the current members)."""
        key = f"{mv['audience']}|{user_id}".encode()
        headers: Headers = [
            ("propstream.event", mv["event"].encode()),
            ("propstream.audience", mv["audience"].encode()),
            ("propstream.user", user_id.encode()),
            ("propstream.event_ts_ms", str(mv["event_ts_ms"]).encode()),
            ("propstream.trigger", str(mv.get("trigger", "")).encode()),
        ]
        if mv["event"] == "left":
            headers.append(("propstream.reason", mv["reason"].encode()))
            return key, None, headers
        body = {
            "schema": AUDIENCE_SCHEMA,
            "event": "entered",
            "audience": mv["audience"],
            "user_id": user_id,
            "event_ts_ms": mv["event_ts_ms"],
            "event_time": iso_ms(mv["event_ts_ms"]),
            "trigger": mv["trigger"],
            "event_id": mv["event_id"],
            "scores": mv["scores"],
            "emit_ts_ms": now_ms,
            "emitted_at": iso_ms(now_ms),
        }
        return key, self._json.encode(body), headers

    def _publish(self, u: UserScoring, out: list[tuple[str, bytes]]) -> None:
        for (kind, value), body in zip(out, [*u.changes, *u.triggers], strict=True):
            if kind == "change":
                self.send_change(u.user_id, value)
                self.metrics.changes.labels(body["target"], body["reason"], body["direction"]).inc()
                self._changes += 1
            else:
                self.send_trigger(u.user_id, value)
                self.counters.triggers.labels(body["trigger"]).inc()
        moved = self._moved
        for (key, message, headers), mv in zip(u.audience_out, u.moves, strict=True):
            self.send_audience(key, message, headers)
            k = (mv["audience"], mv["event"])
            moved[k] = moved.get(k, 0) + 1  # added to the counter once per batch
        u.changes = []
        u.triggers = []
        u.moves = []
        u.audience_out = []

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
        self._push_deadline(u, partition)
        if u.was is not None:
            self._recount(u.user_id, partition, u.was, now := _counted(u.state))
            u.was = now
        due = u.state.timer_ms
        part = self.parts.get(partition)
        if due and (u.timer_ms == 0 or due < u.timer_ms) and part is not None:
            heapq.heappush(part.timers, (due, u.user_id))
        u.timer_ms = due

    def _push_deadline(self, u: UserScoring, partition: int) -> None:
        """A new earliest horizon of the user goes into the partition's horizon heap."""
        part = self.parts.get(partition)
        end = u.state.deadline_ms
        if end and end != u.deadline_ms and part is not None:
            heapq.heappush(part.deadlines, (end, u.user_id))
        u.deadline_ms = end

    def _recount(
        self,
        user_id: str,
        partition: int,
        was: tuple[dict[str, float], list[str]],
        now: tuple[dict[str, float], list[str]] | None,
    ) -> None:
        """Move one user's counted state in the partition's audience figures (``now`` None: gone).

        While the partition's index is still being rebuilt, a user past its cursor is left to
        the rebuild, which reads the user's state as it is then: counting it here too would
        count it twice."""
        if was == now:
            return
        part = self.parts.get(partition)
        if part is None or (not part.indexed and (part.cursor is None or user_id > part.cursor)):
            return
        stats = self.stats_of(partition)
        stats.add(*was, sign=-1)
        if now is not None:
            stats.add(*now)

    def stats_of(self, partition: int) -> PartitionStats:
        stats = self.stats.get(partition)
        if stats is None:
            stats = self.stats[partition] = PartitionStats(
                self.core.audiences, (t.name for t in self.core.targets)
            )
        return stats

    # --- per partition -------------------------------------------------------------------------
    def index(self, partition: int) -> PartitionIndex:
        """The partition's heaps, read a further slice of users into them while still rebuilding."""
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = PartitionIndex()
        if not part.indexed:
            for n, (user, raw) in enumerate(self.scores.scan(partition, part.cursor), 1):
                ss = self._state(user, raw)
                if ss.deadline_ms:
                    heapq.heappush(part.deadlines, (ss.deadline_ms, user))
                if ss.timer_ms:
                    heapq.heappush(part.timers, (ss.timer_ms, user))
                if self.core.audiences:
                    self.stats_of(partition).add(*_counted(ss))
                part.cursor = user
                if n >= self.index_slice:
                    break
            else:
                part.indexed = True
        return part

    def fire_partition(
        self,
        partition: int,
        clock_ms: int,
        features: Callable[[str], UserState | None],
        limit: int | None = None,
    ) -> int:
        """Fire the timers of the partition due by ``clock_ms``, in due order, at most ``limit``
        users (None: all); returns users fired.

        What the limit leaves fires later, as of its due time all the same, so the outputs do not
        depend on it; a user's own next event fires that user's due timers first. ``features``
        reads a user's feature state (None: gone or unreadable). One user's failure is isolated:
        nothing of it is written or sent.
        """
        heap = self.index(partition).timers
        if heap and heap[0][0] <= clock_ms:
            self.begin_partition(partition)  # an idle tick fires without a batch before it
        fired = 0
        while heap and heap[0][0] <= clock_ms and (limit is None or fired < limit):
            due, user = heapq.heappop(heap)
            try:
                u = self.begin_user(user)
                now = u.state.timer_ms
                if now == 0:
                    continue  # no timer any more (fired inline, cancelled, user gone)
                if now > due:
                    heapq.heappush(heap, (now, user))  # moved later: queued at its time
                    continue
                st = features(user)
                if st is None:
                    continue
                self.fire_user(u, st, clock_ms)
                out = self._encode(u)
                self._save(u, partition)
                if u.state.timer_ms:
                    heapq.heappush(heap, (u.state.timer_ms, user))
            except Exception as exc:  # nothing of it was written or sent
                self.faults.failed("timer", exc, user)
                continue
            self._publish(u, out)
            fired += 1
        return fired

    def backlog(self, partition: int, clock_ms: int) -> bool:
        """Are timers of the partition due by ``clock_ms`` still waiting (a fire limit left them)?"""
        part = self.parts.get(partition)
        return part is not None and bool(part.timers) and part.timers[0][0] <= clock_ms

    def expire_partition(self, partition: int, clock_ms: int) -> int:
        """Send every snapshot whose horizon is before ``clock_ms`` to the trainer; returns how many.

        In horizon order, one horizon at a time, so the trainer's order does not depend on the
        batching; each user touched is written once at the end (a user with several horizons
        passing would otherwise be encoded once per horizon), then the examples are sent.
        """
        heap = self.index(partition).deadlines
        matured: list[tuple[str, list[Matured]]] = []
        touched: dict[str, UserScoring] = {}
        failed: set[str] = set()
        while heap and heap[0][0] < clock_ms:
            end, user = heapq.heappop(heap)
            if user in failed:
                continue
            try:
                u = touched.get(user) or self.begin_user(user)  # one read per user, as its write
                if u.state.deadline_ms != end:
                    continue  # stale entry: the user's earliest horizon moved
                matured.append((user, self.core.expire(user, u.state, u.ledger, end + 1)))
                touched[user] = u
                self._push_deadline(u, partition)  # its next horizon may pass in this same call
            except Exception as exc:  # nothing of it is written or sent; re-indexed when the partition moves
                failed.add(user)
                self._lost(user, exc)
        for user, u in touched.items():
            if user in failed:
                continue
            try:
                self._save(u, partition)
            except Exception as exc:
                failed.add(user)
                self._lost(user, exc)
        sent = 0
        for user, ms in matured:
            if user not in failed:
                for m in ms:
                    self._send(m)
                    sent += 1
        return sent

    def _lost(self, user: str, exc: Exception) -> None:
        self.faults.failed("expire", exc, user)

    def forget_user(self, user_id: str, partition: int, reason: str, clock_ms: int) -> None:
        """Drop a user's score state and pending labels (retention; tombstones on the changelogs);
        the user leaves every audience it was in, with ``reason``."""
        if self.core.audiences:
            u = self.begin_user(user_id)
            assert u.was is not None
            u.moves = [_removed(name, reason, clock_ms) for name in u.state.audiences]
            u.audience_out = [self._audience(user_id, mv, clock_ms) for mv in u.moves]
            self._recount(user_id, partition, u.was, None)
            self._publish(u, [])
        self.scores.delete(user_id)
        self.ledgers.delete(user_id)

    def erased(
        self, user_id: str, partition: int, scores_raw: bytes | None, now_ms: int
    ) -> list[tuple[bytes, bytes | None, Headers]]:
        """An erased user leaves the partition's audience figures; returns the tombstones (left
        messages) of every audience key of the user: each one defined, and any the state names."""
        names = [a.name for a in self.core.audiences]
        if scores_raw:
            ss = self._state(user_id, scores_raw)
            if self.core.audiences:
                self._recount(user_id, partition, _counted(ss), None)
            names += [n for n in ss.audiences if n not in names]
        return [self._audience(user_id, _removed(n, "erasure", now_ms), now_ms) for n in names]

    def forget(self, partitions: set[int]) -> None:
        """Partitions moved to another worker: their horizons, timers and audience figures are that
        worker's now."""
        for p in partitions:
            self.parts.pop(p, None)
            self.stats.pop(p, None)

    def audience_figures(self, partitions: set[int] | None = None) -> dict[str, dict[str, Any]]:
        """Per audience, members and expected converters over ``partitions`` (None: all this worker
        holds), and which partitions were counted and whether each was fully indexed."""
        out: dict[str, dict[str, Any]] = {}
        for a in self.core.audiences:
            size = 0
            expected = 0.0
            for p, stats in list(self.stats.items()):  # a lookup's thread may ask mid-batch
                if partitions is None or p in partitions:
                    size += stats.size[a.name]
                    expected += stats.expected[a.name]
            out[a.name] = {"members": size, "expected_converters": expected}
        return out

    def _send(self, m: Matured) -> None:
        s = m.snapshot
        ex = Example(
            m.target, s.ts_ms, s.features, m.label, s.score, s.model_version, self.inputs_hash, s.value
        )
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
            self._batch_scores = {}
            # the gauges are for a scrape every few seconds, and computing every PSI after each of
            # the small, many batches of live traffic cost more than the batches' events
            now = time.monotonic()
            if now - self._psi_at >= PSI_EVERY_S:
                self._psi_at = now
                for target, monitor in self.score_drift.items():
                    self._set_psi(target, "score", monitor)
                for name, monitor in self.input_drift.items():
                    self._set_psi("all", name, monitor)
        if self._changes:
            self.metrics.emit_latency.observe(time.perf_counter() - started)
            self._changes = 0
        if self.core.audiences:
            now = time.monotonic()
            if now - self._figures_at >= PSI_EVERY_S:  # a gauge for a scrape, not per small batch
                self._figures_at = now
                for name, fig in self.audience_figures().items():
                    self.counters.audience_members.labels(name).set(fig["members"])
            for (name, event), n in self._moved.items():
                self.counters.audience_moves.labels(name, event).inc(n)
            self._moved = {}

    def _set_psi(self, target: str, name: str, monitor: DriftMonitor) -> None:
        value = monitor.psi()
        if value is not None:
            self.metrics.psi.labels(target, name).set(value)

    def current(self, user_id: str, st: UserState) -> dict[str, Any]:
        """Per target: score, tier, model version, warming-up flag and top factors as of the user's
        last event (the per-target dict is built in one place, ``streams/lookup.py``)."""
        from streams.lookup import user_scores

        return user_scores(self.core, self.scores, self.ledgers, self.faults, user_id, st, st.last_ms)[1]


def _removed(audience: str, reason: str, ts_ms: int) -> dict[str, Any]:
    """A left move that no condition made: retention or erasure (its reason is its trigger)."""
    return {"event": "left", "audience": audience, "reason": reason, "trigger": reason, "event_ts_ms": ts_ms}


def _counted(ss: ScoreState) -> tuple[dict[str, float], list[str]]:
    """What a user adds to the partition's audience figures: latest scores and memberships."""
    return {name: ts.score for name, ts in ss.targets.items()}, list(ss.audiences)
