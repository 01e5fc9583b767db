"""The hot path: one batch of Kafka records in, validated events folded into per-user state, rejects out.

Kept free of Faust so it can be driven by the agent, by ``propstream eval`` and by unit tests alike:
the caller passes records and a :class:`StateStore`. Per batch, each user's state is read once,
every event of that user is applied, and the state is written once (one changelog message).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from features import state as codec
from features.contract import REASONS, Event, Rejected, parse
from features.state import Corrupt, UserState
from features.user import apply, finalize
from streams.faults import Faults, describe
from streams.metrics import Metrics
from streams.privacy import Pseudonymizer
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.score_stage import ScoreStage


class Record(NamedTuple):
    """One consumed Kafka message; ``ctx`` is opaque to the handler (the Faust event). A named
    tuple: one is made per event on the hot path, three times cheaper than a frozen dataclass."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    ctx: Any = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers of the dead-letter message; the value stays the original bytes."""
        r = self.record
        return [
            ("propstream.reason", self.reason.encode()),
            ("propstream.detail", self.detail.encode("utf-8", "replace")[:1024]),
            ("propstream.source.topic", r.topic.encode()),
            ("propstream.source.partition", str(r.partition).encode()),
            ("propstream.source.offset", str(r.offset).encode()),
        ]


class StateStore(Protocol):
    def partition(self, record: Record) -> AbstractContextManager[None]:
        """Context in which reads and writes belong to ``record``'s partition."""

    def get(self, user_id: str) -> bytes | None: ...

    def set(self, user_id: str, value: bytes) -> None: ...

    def get_mark(self, topic: str, partition: int) -> int | None:
        """Persisted newest event time of ``topic`` in ``partition`` (survives restarts and moves);
        :class:`~features.state.Corrupt` when the stored bytes are not one (:func:`decode_mark`)."""

    def set_mark(self, topic: str, partition: int, ts_ms: int) -> None: ...

    def scan_users(self, partition: int, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` users of ``partition`` in key order, after ``after`` (retention sweep),
        each with its feature state as this batch left it so far (unflushed writes included)."""

    def delete(self, user_id: str) -> None: ...

    def discard(self, user_id: str) -> None:
        """Forget this batch's unwritten changes to ``user_id`` (its processing failed)."""


def encode_mark(ts_ms: int) -> bytes:
    return str(ts_ms).encode()


def decode_mark(raw: bytes) -> int:
    """A stored watermark; :class:`~features.state.Corrupt` for anything else.

    >>> decode_mark(encode_mark(1764547200000))
    1764547200000
    """
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise Corrupt(what="watermark", detail=f"{bytes(raw[:40])!r} is not an epoch-ms integer") from None


class MemoryStore:
    """An in-process :class:`StateStore` (benchmarks, unit tests): a dict, no partitions.

    It writes through, so it holds nothing a failed user could :meth:`discard`; the worker's
    :class:`streams.rows.RowStore` holds a batch's writes until the partition is done.
    """

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.marks: dict[tuple[str, int], bytes] = {}
        self.writes = 0

    @contextmanager
    def partition(self, record: Record) -> Iterator[None]:
        yield

    def get(self, user_id: str) -> bytes | None:
        return self.data.get(user_id)

    def set(self, user_id: str, value: bytes) -> None:
        self.writes += 1
        self.data[user_id] = value

    def get_mark(self, topic: str, partition: int) -> int | None:
        raw = self.marks.get((topic, partition))
        return None if raw is None else decode_mark(raw)

    def set_mark(self, topic: str, partition: int, ts_ms: int) -> None:
        self.marks[(topic, partition)] = encode_mark(ts_ms)

    def scan_users(self, partition: int, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        keys = sorted(k for k in self.data if after is None or k > after)[:limit]
        return [(k, self.data[k]) for k in keys]

    def delete(self, user_id: str) -> None:
        self.data.pop(user_id, None)

    def discard(self, user_id: str) -> None:
        pass


class Watermarks:
    """Per partition, the minimum over source topics of the newest event time seen on each.

    Taking the minimum means a topic that is consumed ahead of the others (a small purchase
    topic during catch-up, say) does not make the others' events look late. A topic that is
    *idle* stops holding the partition back (Flink's idleness): one with nothing new for
    ``idle_ms`` of wall-clock time while another topic of the partition moved, or one that has
    not delivered at all ``idle_ms`` after the partition's first event here (an orders-only
    source). Without a wall-clock time (``now_ms`` None) nothing is idle: pure event time.
    """

    def __init__(
        self, topics: tuple[str, ...], idle_ms: int = 0, caught_up: Callable[[str, int], bool] | None = None
    ) -> None:
        self.topics = topics
        self.idle_ms = idle_ms
        # Is everything of this topic partition read? Only then can it be idle: a topic that is
        # merely slower during a catch-up must keep holding the watermark back, or its events
        # would look late. The worker asks its consumer; None (tests, eval): wall time alone.
        self.caught_up = caught_up
        self.newest: dict[tuple[str, int], int] = {}
        self.moved_at: dict[tuple[str, int], int] = {}  # wall ms of each topic's last advance
        self.first_at: dict[int, int] = {}  # wall ms of the partition's first event on this process
        self.wall: dict[int, int] = {}  # a clock moved on by wall-clock time (idle partitions, live)

    def of(self, partition: int, now_ms: int | None = None) -> int:
        """The watermark (0: nothing is late yet).

        >>> w = Watermarks(("a", "b"), idle_ms=1_000)
        >>> _ = w.advance("a", 0, 500, now_ms=0)
        >>> w.of(0, now_ms=10), w.of(0, now_ms=2_000), w.of(0)  # b: still may come; never came; pure
        (0, 500, 0)
        """
        idle = self.idle_ms if now_ms is not None else 0
        values = []
        latest = max((self.moved_at.get((t, partition), 0) for t in self.topics), default=0)
        for t in self.topics:
            ts = self.newest.get((t, partition))
            if ts is None:
                first = self.first_at.get(partition)
                if (
                    not idle
                    or first is None
                    or now_ms is None
                    or now_ms - first < idle
                    or not self._read(t, partition)
                ):
                    return self.wall.get(partition, 0)
                continue  # never delivered here: does not hold the partition back
            if (
                idle
                and latest - self.moved_at.get((t, partition), latest) >= idle
                and self._read(t, partition)
            ):
                continue  # idle while another topic moved on
            values.append(ts)
        if not values:
            values = [self.newest[(t, partition)] for t in self.topics if (t, partition) in self.newest]
        mark = min(values) if values else 0
        return max(mark, self.wall.get(partition, 0))

    def _read(self, topic: str, partition: int) -> bool:
        return self.caught_up is None or self.caught_up(topic, partition)

    def clock(self, partition: int) -> int:
        """The partition's event-time clock: newest event time on any of its topics."""
        # list(): a copy taken at once, as lookups read this from the web thread while it grows
        values = [ts for (_, p), ts in list(self.newest.items()) if p == partition]
        return max([*values, self.wall.get(partition, 0)]) if values or partition in self.wall else 0

    def advance(self, topic: str, partition: int, ts_ms: int, now_ms: int = 0) -> bool:
        key = (topic, partition)
        if partition not in self.first_at:
            self.first_at[partition] = now_ms
        if ts_ms > self.newest.get(key, 0):
            self.newest[key] = ts_ms
            self.moved_at[key] = now_ms
            return True
        return False

    def advance_wall(self, partition: int, ts_ms: int) -> bool:
        """Move an idle partition's clock on to ``ts_ms`` (never back); True if it moved."""
        if ts_ms > self.of(partition) and ts_ms > self.wall.get(partition, 0):
            self.wall[partition] = ts_ms
            return True
        return False

    def forget(self, partition: int) -> None:
        """The partition left this process: whoever owns it next moves its watermark on."""
        for key in [k for k in self.newest if k[1] == partition]:
            del self.newest[key]
            self.moved_at.pop(key, None)
        self.first_at.pop(partition, None)
        self.wall.pop(partition, None)


class IngestHandler:
    """Process batches; hands rejects to ``dead_letter`` and counts everything in ``metrics``."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        dead_letter: Callable[[DeadLetter], None],
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        stage: ScoreStage | None = None,
        faults: Faults | None = None,
        caught_up: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.rules = settings.ingest_rules()
        self.params = settings.feature_params()
        self.lateness_ms = settings.allowed_lateness_s * 1000
        self.store = store
        self.dead_letter = dead_letter
        self.metrics = metrics or Metrics()
        self.faults = faults or Faults(self.metrics)
        self.clock = clock
        self.watermarks = Watermarks(settings.source_topics, settings.source_idle_s * 1000, caught_up)
        self.loaded: set[int] = set()
        self.stage = stage  # scoring, labels and change events; None: features only
        # the stage's finalize skips a state it finalized after the user's last event already
        self.finalize = stage.core.finalize if stage is not None else finalize
        self.pseudonym = Pseudonymizer(settings.pseudonymize_key)
        self.ttl_ms = int(settings.user_ttl_days * 86_400_000)
        self.sweep_batch = settings.retention_sweep_batch
        self.sweep_after: dict[int, str | None] = {}  # per partition: the last user looked at
        self.sweep_every_ms = settings.retention_sweep_every_s * 1000
        self.swept_ms: dict[int, int] = {}  # per partition: wall ms of its last sweep
        self.sweep_pending: set[int] = set()  # partitions an idle tick sweeps (see _end_partition)
        self.idle_advance_ms = settings.idle_advance_s * 1000
        self.last_record: dict[int, Record] = {}  # per partition: a record for its context (tick)
        self.last_seen: dict[int, int] = {}  # per partition: wall ms of its last batch
        self.fires_per_batch = settings.timer_fires_per_batch or None
        self.fire_budget: int | None = None  # what this batch or tick may still fire (None: no bound)

    def process(self, batch: Sequence[Record]) -> dict[str, list[Event]]:
        """Process one batch; returns the accepted events per user (for scoring downstream).

        Event time moves record by record for timers: a user's timers due by the watermark its
        partition had when an event arrived fire before the event is applied, so they depend on
        the order of the records, never on where the batches cut it. Lateness is judged against
        the watermark at the batch's start (see ``floors``).
        """
        t0 = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        self.fire_budget = self.fires_per_batch
        consumed: dict[str, int] = {}
        rejected: dict[tuple[str, str], int] = {}
        no_consent: dict[str, int] = {}
        accepted: dict[tuple[str, str], int] = {}
        # partition -> user -> [(event, record, watermark at arrival)], arrival order kept per user
        groups: dict[int, dict[str, list[tuple[Event, Record, int]]]] = {}
        marks = self.watermarks
        wms: dict[int, int] = {}  # partition -> its watermark as of the record being read
        moved: dict[int, set[str]] = {}  # partition -> topics whose newest event time moved
        # Lateness is judged against the watermark at the batch's start: after a rebalance Faust can
        # hand over a partition's redelivered records behind later ones it had buffered, and a
        # per-record watermark would then refuse them as late against their own successors.
        floors: dict[int, int] = {}
        newest_ts = 0

        pseudonym = self.pseudonym

        def reject(rec: Record, reason: str, detail: str) -> None:
            key = (rec.topic, reason)
            rejected[key] = rejected.get(key, 0) + 1
            if pseudonym.enabled:  # no raw id may leave: pseudonymous key, payload withheld
                rec, detail = self._withhold(rec), REASONS.get(reason, reason)
            self.dead_letter(DeadLetter(rec, reason, detail))

        for rec in batch:
            consumed[rec.topic] = consumed.get(rec.topic, 0) + 1
            try:
                events = parse(rec.value, self.rules, now_ms)
            except Rejected as r:
                reject(rec, r.reason, r.detail)
                continue
            p = rec.partition
            wm = wms.get(p)
            if wm is None:
                if p not in self.loaded:
                    self._load_marks(rec)
                wm = wms[p] = marks.of(p, now_ms)
                floors[p] = wm - self.lateness_ms
                moved[p] = set()
                self.last_record[p] = rec
            for ev in events:
                if rec.key is None or rec.key != ev.user_id.encode():
                    reject(rec, "wrong_key", f"message key {rec.key!r} is not user_id {ev.user_id!r}")
                    continue
                if not ev.personalization:
                    no_consent[rec.topic] = no_consent.get(rec.topic, 0) + 1
                    continue
                if pseudonym.enabled:
                    ev.user_id = pseudonym(ev.user_id)  # before anything is stored or published
                users = groups.get(p)
                if users is None:
                    users = groups[p] = {}
                items = users.get(ev.user_id)
                if items is None:
                    users[ev.user_id] = [(ev, rec, wm)]
                else:
                    items.append((ev, rec, wm))
                if marks.advance(rec.topic, p, ev.ts_ms, now_ms):
                    moved[p].add(rec.topic)
                    wm = wms[p] = marks.of(p, now_ms)

        out: dict[str, list[Event]] = {}
        writes = 0
        evicted = 0
        params = self.params
        store = self.store
        stage = self.stage
        for p, users in groups.items():
            first = next(iter(users.values()))[0][1]
            floor = floors[p]
            with store.partition(first):
                if stage is not None:
                    stage.begin_partition(p)
                for user_id, items in users.items():
                    # One user is one unit of work: nothing of it is published, counted or
                    # written before all of it succeeded (the rule in docs/guarantees.md).
                    done: list[tuple[Event, Record]] = []
                    refused: list[tuple[Record, str, str]] = []
                    try:
                        st = self._features_of(user_id)
                        if st is None:
                            st = UserState()
                        scoring = stage.begin_user(user_id) if stage is not None else None
                        for ev, rec, wm in items:
                            if stage is not None and scoring is not None:
                                due = scoring.state.timer_ms
                                if due:
                                    clock = wm if wm >= ev.ts_ms else ev.ts_ms - 1
                                    if due <= clock:  # passed before this event: fire as of then
                                        stage.fire_user(scoring, st, clock)
                            reason = apply(st, ev, params, min_ts_ms=floor)
                            if reason is None:
                                done.append((ev, rec))
                                if stage is not None and scoring is not None:
                                    stage.on_event(scoring, st, ev)
                            else:
                                refused.append((rec, reason, _detail(reason, ev, floor)))
                        if done:
                            self.finalize(st)
                            store.set(user_id, codec.encode(st))
                        if stage is not None and scoring is not None and (done or scoring.fired):
                            stage.end_user(scoring, p)
                    except Exception as exc:  # a bug or a value no check foresaw: this user only
                        store.discard(user_id)
                        self.faults.failed("user", exc, user_id)
                        detail = describe(exc)
                        for rec in dict.fromkeys(r for _, r, _ in items):
                            reject(rec, "processing_error", detail)
                        continue
                    for rec, reason, detail in refused:
                        reject(rec, reason, detail)
                    if done:
                        writes += 1
                        # a producer's own partitioner can send one key to two partitions
                        out.setdefault(user_id, []).extend(ev for ev, _ in done)
                        for ev, rec in done:
                            key = (rec.topic, ev.type)
                            accepted[key] = accepted.get(key, 0) + 1
                            if ev.ts_ms > newest_ts:
                                newest_ts = ev.ts_ms
                evicted += self._end_partition(p, now_ms, moved[p])
        if stage is not None:
            stage.end_batch(t0)
        if evicted:
            self.metrics.evicted.inc(evicted)
        m = self.metrics
        m.record_batch(consumed, accepted, rejected, no_consent, writes, time.perf_counter() - t0)
        if newest_ts:
            m.lag_seconds.observe(max(0.0, now_ms - newest_ts) / 1000.0)
        return out

    def _end_partition(self, p: int, now_ms: int, moved: set[str]) -> int:
        """Timers and horizons the partition's clock passed, retention, watermarks; inside its context."""
        self.last_seen[p] = now_ms
        stage = self.stage
        if stage is not None:
            clock = self.watermarks.of(p, now_ms)
            budget = self.fire_budget
            fired = stage.fire_partition(p, clock, self._features_of, budget)
            if budget is not None:
                self.fire_budget = budget - fired
            # labels can be final only below the lateness floor: no accepted event is older
            stage.expire_partition(p, clock - self.lateness_ms)
        evicted = self._maybe_sweep(p, now_ms)
        for topic in moved:
            self._save_mark(topic, p)
        return evicted

    def _maybe_sweep(self, p: int, now_ms: int) -> int:
        """The partition's retention sweep if one is due (``retention_sweep_every_s``); one a batch
        came too soon for, or a pass not done, is left to an idle tick (``sweep_pending``)."""
        if not self.ttl_ms:
            return 0
        evicted = 0
        last = self.swept_ms.get(p)
        if last is None or now_ms - last >= self.sweep_every_ms:
            self.swept_ms[p] = now_ms
            evicted = self._sweep(p)
        if self.swept_ms[p] != now_ms or self.sweep_after.get(p) is not None:
            self.sweep_pending.add(p)
        else:
            self.sweep_pending.discard(p)
        return evicted

    def tick(self) -> int:
        """Live workers: a partition with no events for ``idle_advance_s`` moves its clock on.

        Its event-time clock becomes wall-clock time minus the allowed lateness (never backwards),
        and the timers and horizons that passes fire, so a quiet night still gets its churn and
        cart triggers. A partition whose due timers a fire limit left waiting fires the next of
        them, clock moved or not, and one whose retention sweep a batch left (too soon after the
        last, or a pass not done) is swept. Returns the partitions worked on. Replay and eval never
        call this.
        """
        now_ms = int(self.clock() * 1000)
        self.fire_budget = self.fires_per_batch
        stage = self.stage
        moved = evicted = 0
        for p, rec in list(self.last_record.items()):
            idle_ms = now_ms - self.last_seen.get(p, now_ms)
            quiet = bool(self.idle_advance_ms) and idle_ms >= self.idle_advance_ms
            moves = quiet and self.watermarks.advance_wall(p, now_ms - self.lateness_ms)
            if not moves and (stage is None or not stage.backlog(p, self.watermarks.of(p, now_ms))):
                # the clock did not move and no timer a fire limit left waits: at most a sweep,
                # never the partition's timers (what they output must not depend on a tick's time)
                if p in self.sweep_pending:
                    with self.store.partition(rec):
                        evicted += self._maybe_sweep(p, now_ms)
                continue
            t0 = time.perf_counter()
            with self.store.partition(rec):
                evicted += self._end_partition(p, now_ms, set())
            if self.stage is not None:
                self.stage.end_batch(t0)
            moved += 1
        if evicted:
            self.metrics.evicted.inc(evicted)
        return moved

    def _features_of(self, user_id: str) -> UserState | None:
        """The user's stored feature state (None: none); unreadable state is counted and None."""
        try:
            raw = self.store.get(user_id)
            return codec.decode(raw) if raw else None
        except Corrupt as exc:
            self.faults.corrupt(exc, user_id)
            return None

    def forget_partitions(self, partitions: set[int]) -> None:
        """Partitions revoked from this process: drop their in-memory watermarks and sweep positions.

        Whoever owns a partition next moves its watermark on; when it comes back, the persisted
        marks are read again (:meth:`_load_marks`), so an older copy here can never make an event
        that the other owner refused as late look on time.
        """
        for p in partitions:
            self.loaded.discard(p)
            self.watermarks.forget(p)
            self.sweep_after.pop(p, None)
            self.swept_ms.pop(p, None)
            self.sweep_pending.discard(p)
            self.last_record.pop(p, None)
            self.last_seen.pop(p, None)

    def _sweep(self, p: int) -> int:
        """Evict a few users of partition ``p`` inactive for longer than the TTL, in event time.

        A bounded slice per sweep (``retention_sweep_batch`` users, resuming where the last one
        stopped, wrapping around; at most one sweep per ``retention_sweep_every_s``), so retention
        costs the same whatever the number of users and however small the batches. The
        caller holds the partition context: deletes write tombstones to the partition's changelogs.
        """
        cutoff = self.watermarks.clock(p) - self.ttl_ms
        if cutoff <= 0:
            return 0
        users = self.store.scan_users(p, self.sweep_after.get(p), self.sweep_batch)
        self.sweep_after[p] = users[-1][0] if len(users) == self.sweep_batch else None
        evicted = 0
        for user_id, raw in users:
            try:
                if codec.last_ms_of(raw) >= cutoff:  # most users: their head says so, no full decode
                    continue
                codec.decode(raw)
            except Corrupt:
                continue  # counted when the user's next event reads it; retention judges readable state
            self.store.delete(user_id)
            if self.stage is not None:
                self.stage.forget_user(user_id, p, "retention", self.watermarks.clock(p))
            evicted += 1
        return evicted

    def _withhold(self, rec: Record) -> Record:
        """The dead-letter form of ``rec`` under pseudonymisation: its source coordinates tell an
        operator where the original is; the payload, which holds the raw id, is not copied."""
        key = self.pseudonym(rec.key.decode("utf-8", "replace")).encode() if rec.key else None
        return Record(rec.topic, rec.partition, rec.offset, key, b"", rec.ctx)

    def _load_marks(self, rec: Record) -> None:
        p = rec.partition
        now_ms = int(self.clock() * 1000)
        with self.store.partition(rec):
            for topic in self.watermarks.topics:
                ts = self._stored_mark(topic, p)
                if ts is not None:
                    self.watermarks.advance(topic, p, ts, now_ms)
        self.loaded.add(p)

    def _stored_mark(self, topic: str, p: int) -> int | None:
        try:
            return self.store.get_mark(topic, p)
        except Corrupt as exc:
            self.faults.corrupt(exc, f"{topic}|{p}")
            return None  # rewritten with the next event's time

    def _save_mark(self, topic: str, p: int) -> None:
        """Persist the partition's watermark of ``topic``, never lower than what is stored."""
        ts = self.watermarks.newest[(topic, p)]
        try:
            stored = self.store.get_mark(topic, p)
        except Corrupt:
            stored = None  # counted when loaded; replaced now
        if stored is None or ts > stored:
            self.store.set_mark(topic, p, ts)


def _detail(reason: str, ev: Event, floor: int) -> str:
    if reason == "duplicate":
        return f"event_id {ev.event_id!r} already processed for this user"
    if reason == "late":
        return f"ts_ms={ev.ts_ms} is before the floor {floor} (watermark - allowed lateness, or dedup memory)"
    return REASONS.get(reason, reason)
