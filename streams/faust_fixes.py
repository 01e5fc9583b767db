"""Two fixes to faust-streaming that the delivery guarantees depend on, installed by ``create_app``,
and one that latency depends on (the fetch wait, at the end).

Both close the ways a rebalance made Faust lose a record: one offset of a partition never reached
the stream, and the commit moved past it (``test_scale_out.py`` saw a user's row lacking one event;
the probe that found the paths logged every record handed out, ack, commit and seek).

**A message skipped during a rebalance was committed.** While a rebalance suspends the flow,
Faust's stream iterator skips the message it is holding ("not flow_control.is_active()" or an old
generation) and acks it anyway, so that filtered messages do not add to the lag
(``faust/streams.py``, ``_py_aiter``). The consumer counted its offset as done and the commit
covered it. A message the stream processed, or filtered with ``Skip``, is *tracked* first; a
message skipped for the rebalance never is. So the consumer counts an untracked message of an
acking topic as done no longer: it is marked acked (nothing else waits for it), left uncommitted,
and its partition's next expected offset goes back to it, so the guard below reads it again: the
next fetch seeks the partition back to it. (Waiting for a later record to trigger that seek left a
quiet partition's last record unread: an erasure request sent during a worker's recovery was
never acted on, ``test_bad_bytes.py`` in CI.)

**Records reached the stream out of sequence around a seek.** After a rebalance Faust seeks each
partition to its committed offset c, but records of the old position still arrive afterwards: a
fetch that was in flight across the seek, the rest of a fetch Faust was handing out record by
record while the seek ran (recovery resumes the partitions *before* it seeks them), or a record
Faust's own ``getmany`` dropped when the flow stopped. Faust then delivered c + 1 before c, dropped
c as "already read" when it came (``DROPPED MESSAGE ROFF``), and its commit, which tolerates a gap
of one offset at its head (faust-streaming issue #606) or fills gaps it saw, moved past c.

**A buffered record of a paused partition was dropped during recovery.** Recovery pauses the
source partitions while the fetcher reads the changelogs; the paused set is shared with the
consumer thread, and a fetch that finds it empty returns every buffered record, which Faust drops
for the paused partitions with their position moved on. The seek to the committed offsets repairs
that, except on a partition the group never committed on, so such partitions are sought to their
log start (the reset policy) after every seek.

So each partition of an acking topic has a *next expected offset*, set by every seek to the
committed offsets and moved by every record handed out. A record behind it was handed out since
the seek and is left out; a record beyond it is not handed out, and the partition is sought back
to the expected offset. If the first fetch after that seek still starts beyond it, the log has
nothing there (a transaction marker, compaction), and the record is handed out. A handed-out
record also gets its read offset set, so Faust never drops it as already read. What is left out
is counted in ``propstream_stale_records_total``.

The fetch wait: aiokafka fetches only partitions with nothing buffered, one fetch at a time per
broker, and the broker holds a fetch up to ``fetch.max.wait.ms`` when its partitions have nothing
new. Faust fixes that at 1.5 s, so a fetch that happened to cover only quiet partitions (purchases)
held back the busy partitions' records, just consumed, for 1.5 s. The worker sets
``Settings.fetch_wait_s`` instead (:func:`_create_worker_consumer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

log = logging.getLogger(__name__)
_original_ack = Consumer.ack
_original_perform_seek = Consumer.perform_seek
_original_seek = Consumer.seek
_original_wait = Consumer._wait_next_records
_original_getmany = Consumer.getmany


class _Sequence:
    """Per consumer: the next expected offset of each guarded partition, and the seeks it made."""

    def __init__(self) -> None:
        self.expected: dict[TP, int] = {}
        self.sought: dict[TP, tuple[int, int]] = {}  # tp -> (offset, fetches completed at the seek)
        self.fetches = 0
        self.guarded: dict[TP, bool] = {}
        self.rewind: set[TP] = set()  # partitions a skipped record sends back, sought on the next fetch


def _sequence(self: Any) -> _Sequence:
    seq: _Sequence | None = getattr(self, "_propstream_sequence", None)
    if seq is None:
        seq = self._propstream_sequence = _Sequence()
    return seq


def _guarded(self: Any, seq: _Sequence, tp: TP) -> bool:
    """Source partitions (acking topics); changelogs are read by recovery, which seeks on its own."""
    known = seq.guarded.get(tp)
    if known is None:
        known = seq.guarded[tp] = bool(self.app.topics.acks_enabled_for(tp.topic)) and not (
            self._is_changelog_tp(tp)
        )
    return known


def _count(self: Any, n: int) -> None:
    metrics = getattr(self.app, "propstream_metrics", None)
    if metrics is not None:
        metrics.stale_records.inc(n)


def _ack(self: Any, message: Any) -> bool:
    if not message.tracked and not message.acked and self.app.topics.acks_enabled_for(message.topic):
        message.acked = True
        _count(self, 1)
        seq = _sequence(self)
        tp = message.tp
        expected = seq.expected.get(tp)
        if expected is None or message.offset < expected:
            seq.expected[tp] = message.offset  # read it again: the next record is beyond it
            seq.sought.pop(tp, None)
            seq.rewind.add(tp)  # and if none comes (a quiet partition), the next fetch seeks it
        return False
    result: bool = _original_ack(self, message)
    return result


async def _perform_seek(self: Any) -> None:
    generation = self.app.consumer_generation_id  # the one this seek positions the partitions for
    await _original_perform_seek(self)
    seq = _sequence(self)
    fresh = []
    for tp, offset in self._read_offset.items():
        if not _guarded(self, seq, tp):
            continue
        if offset is None:
            seq.expected.pop(tp, None)
            fresh.append(tp)
        else:
            seq.expected[tp] = offset
        seq.sought.pop(tp, None)
        seq.rewind.discard(tp)
    if fresh:
        await _from_the_start(self, fresh)
    sink = getattr(self.app, "propstream_sink", None)
    if sink is not None:  # streams.direct takes records of this generation from now on
        sink.open_generation = generation


async def _from_the_start(self: Any, tps: list[TP]) -> None:
    """Seek partitions the group never committed on to their log start, as the reset policy would.

    Recovery keeps the source partitions paused while the fetcher reads the changelogs, and the
    paused set is shared with the consumer thread: a fetch that finds it empty there returns every
    buffered record, and Faust drops the ones of paused partitions with their position already
    moved on. The seek to the committed offsets puts the others back; a partition with nothing
    committed (an erasure topic nobody wrote to before) was left past the dropped record for good.
    """
    try:
        starts = await self.earliest_offsets(*tps)
    except Exception as exc:  # the broker went away: the next rebalance's seek tries again
        log.warning("could not read the log start of %d uncommitted partitions: %r", len(tps), exc)
        return
    for tp in tps:
        start = starts.get(tp)
        if start is not None:
            with contextlib.suppress(Exception):  # revoked meanwhile: its next owner reads it
                await _original_seek(self, tp, start)


async def _wait_next_records(self: Any, timeout: float) -> Any:
    result = await _original_wait(self, timeout)
    seq = _sequence(self)
    seq.fetches += 1
    sink = getattr(self.app, "propstream_sink", None)
    records = result[0]
    if sink is not None and records:
        await _divert(self, seq, sink, records)
    return result


async def _divert(self: Any, seq: _Sequence, sink: Any, records: Any) -> None:
    """Take the sink's topics out of a fetch (``streams.direct``), before Faust makes a message of
    each record: in offset order per partition from the last seek, as ``_getmany`` hands them out,
    and only once the current generation's seek is done (records of an older position before it)."""
    generation = self.app.consumer_generation_id
    open_ = sink.open_generation == generation and self.flow_active
    for tp in [tp for tp in records if tp.topic in sink.topics]:
        raw = records.pop(tp)
        if not open_:
            _count(self, len(raw))  # read again from the committed offset, which the seek sets
            continue
        kept = await _in_sequence(self, seq, tp, raw)
        if kept:
            sink.put(generation, tp, kept)
    await sink.room()


async def _in_sequence(self: Any, seq: _Sequence, tp: TP, raw: list[Any]) -> list[Any]:
    """The records of ``raw`` that follow the partition's next expected offset (see ``_getmany``)."""
    want = seq.expected.get(tp)
    if want is not None:
        behind = 0
        while behind < len(raw) and raw[behind].offset < want:
            behind += 1  # handed out since the last seek
        if behind:
            _count(self, behind)
            raw = raw[behind:]
        if not raw:
            return []
        if raw[0].offset != want:
            sought = seq.sought.get(tp)
            if sought is None or sought[0] != want:
                _count(self, len(raw))
                await _seek_expected(self, seq, tp, want)
                return []
            if seq.fetches <= sought[1]:
                _count(self, len(raw))
                return []  # the rest of a fetch from before that seek
            del seq.sought[tp]  # fetched from ``want`` and starts beyond it: nothing is there
    kept = raw
    if kept[-1].offset - kept[0].offset + 1 != len(kept):  # a gap (a transaction marker): up to it
        end = next(i for i in range(1, len(kept)) if kept[i].offset != kept[i - 1].offset + 1)
        kept = kept[:end]  # the rest is beyond the expected offset: the next fetch seeks back
    seq.expected[tp] = kept[-1].offset + 1
    self._read_offset[tp] = kept[-1].offset
    return kept


async def _seek_expected(self: Any, seq: _Sequence, tp: TP, want: int) -> None:
    """Seek ``tp`` back to ``want``; the fetches completed so far are from before the seek."""
    # revoked meanwhile (the seek raises): its next owner reads it from the commit
    with contextlib.suppress(Exception):
        await _original_seek(self, tp, want)
    seq.sought[tp] = (want, seq.fetches)


async def _rewind(self: Any, seq: _Sequence) -> None:
    """Seek each partition whose record the stream skipped back to it, unless a later record did.

    Without this, a skipped record is read again only once a later one arrives on its partition,
    which on a quiet partition (an erasure request, a user's last event) may be never.
    """
    for tp in sorted(seq.rewind):
        want = seq.expected.get(tp)
        sought = seq.sought.get(tp)
        if want is not None and (sought is None or sought[0] != want):
            log.info("seeking %s[%d] back to %d, a record the stream skipped", tp.topic, tp.partition, want)
            await _seek_expected(self, seq, tp, want)
    seq.rewind.clear()


async def _getmany(self: Any, timeout: float) -> Any:
    """Faust's ``getmany``, handing out each guarded partition's records in offset order only."""
    seq = _sequence(self)
    if seq.rewind:
        await _rewind(self, seq)
    inner: Any = _original_getmany(self, timeout)  # an async generator (its stub says iterator)
    fetch: int | None = None
    try:
        async for tp, message in inner:
            if fetch is None:
                fetch = seq.fetches  # this call's fetch has completed by its first record
            if _guarded(self, seq, tp):
                offset = message.offset
                want = seq.expected.get(tp)
                if want is not None and offset != want:
                    if offset < want:
                        continue  # handed out since the last seek
                    sought = seq.sought.get(tp)
                    if sought is None or sought[0] != want:
                        _count(self, 1)
                        await _seek_expected(self, seq, tp, want)
                        continue
                    if fetch <= sought[1]:
                        _count(self, 1)
                        continue  # the rest of a fetch from before that seek
                    del seq.sought[tp]  # fetched from ``want`` and starts beyond it: nothing is there
                elif want is not None:
                    self._read_offset[tp] = offset  # so Faust does not drop it as already read
                seq.expected[tp] = offset + 1
            yield tp, message
    finally:
        await inner.aclose()


def current_events(batch: Any, generation: int) -> tuple[list[Any], int]:
    """The events of a ``take_events`` batch of consumer generation ``generation``, and how many
    were of an older one.

    Faust's ``take_events`` buffer outlives a rebalance, so a batch can hold events fetched before
    it, of partitions this worker may no longer own. They are dropped and marked acknowledged
    without being counted (Faust's consumer records no offset for a message already marked), so no
    commit covers them: whoever owns the partition reads them again from the committed offset.
    """
    out = []
    stale = 0
    for ev in batch:
        m = ev.message
        if m.generation_id != generation:
            m.acked = True
            stale += 1
        else:
            out.append(ev)
    return out, stale


_original_create = AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    """Faust's worker consumer with the app's fetch wait (``Settings.fetch_wait_s``) instead of
    Faust's fixed 1.5 s: aiokafka reads the private attribute when it starts its fetcher."""
    consumer = _original_create(self, transport)
    wait_s = getattr(self.app, "propstream_fetch_wait_s", None)
    if wait_s is not None:
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # an aiokafka that moved it: fail loudly
            msg = "aiokafka's consumer has no _fetch_max_wait_ms: update streams.faust_fixes"
            raise RuntimeError(msg)
        consumer._fetch_max_wait_ms = max(1, round(wait_s * 1000))
    # Exactly-once checkpoints are transactions (streams/checkpoint_producer.py): recovery, the trainer and
    # the sources read committed records only. Without transactions this changes nothing.
    consumer._isolation_level = "read_committed"
    return consumer


class _RecoveryView:
    """The app as Faust's recovery sees it when checkpoints are transactions: ``in_transaction``.

    A changelog partition written by transactions ends in a commit marker, which no consumer ever
    receives, and Faust's recovery waits for a record at the partition's last offset. Its own
    exactly-once mode handles that (after two idle 5 s polls it takes a consumer position past
    the end as done), but it checks ``app.in_transaction``, which would also switch on Faust's
    transactional producers. Everything else goes to the app itself."""

    in_transaction = True

    def __init__(self, app: Any) -> None:
        object.__setattr__(self, "_app", app)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_app"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_app"), name, value)


async def last_records(bootstrap: str, ends: dict[TP, int], timeout_s: float = 10.0) -> dict[TP, int]:
    """The offset of the last committed record below each partition's end offset (-1: none).

    Read ``read_committed`` backwards in growing windows: the tail of a transactional log is a
    commit marker, or an aborted transaction's records and marker, none of which a consumer
    receives. A partition not read to its end within ``timeout_s`` is left out."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    out: dict[TP, int] = {tp: -1 for tp, end in ends.items() if end <= 0}
    window = 64
    todo = {tp: end for tp, end in ends.items() if end > 0}
    if not todo:
        return out
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await c.start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while todo and asyncio.get_running_loop().time() < deadline:
            tps = {TopicPartition(tp.topic, tp.partition): tp for tp in todo}
            c.assign(list(tps))
            starts = {atp: max(0, todo[tp] - window) for atp, tp in tps.items()}
            for atp, start in starts.items():
                c.seek(atp, start)
            last = {atp: -1 for atp in tps}
            while asyncio.get_running_loop().time() < deadline:
                behind = [atp for atp in tps if await c.position(atp) < todo[tps[atp]]]
                if not behind:
                    break
                for atp, records in (await c.getmany(*behind, timeout_ms=200)).items():
                    below = [r.offset for r in records if r.offset < todo[tps[atp]]]
                    if below:
                        last[atp] = max(last[atp], *below)
            else:
                break
            for atp, tp in tps.items():
                if last[atp] >= 0 or starts[atp] == 0:  # found, or read from the log's start
                    out[tp] = last[atp]
                    del todo[tp]
            window *= 16
    finally:
        try:
            await c.stop()
        except asyncio.CancelledError:  # aiokafka's stop can raise its own task's cancellation
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
    return out


def recover_transactions(app: Any, bootstrap: str) -> None:
    """Let Faust's recovery finish changelog partitions that end in a transaction's marker.

    Faust's recovery reads a changelog partition until it has applied the record at the log's last
    offset, and a transaction's commit marker never arrives. So its highwaters are corrected to the
    last committed record (:func:`last_records`), and the table stores record that offset after
    each checkpoint (``streams/outbox.py``). If that read fails, Faust's own rule for its
    exactly-once mode still ends the recovery: two idle 5 s polls, then a consumer position past
    the end counts as done (:class:`_RecoveryView`)."""
    recovery = app.tables.recovery
    recovery.app = _RecoveryView(app)
    build = recovery._build_highwaters

    async def build_highwaters(consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await build(consumer, tps, destination, title)
        ends = {tp: destination[tp] + 1 for tp in tps if destination.get(tp, -1) >= 0}
        try:
            found = await last_records(bootstrap, ends)
        except Exception as exc:  # the idle polls above still end the recovery, 10 s later
            log.warning("could not read the last committed changelog records: %r", exc)
            return
        moved = {tp: off for tp, off in found.items() if off != destination[tp]}
        for tp, off in moved.items():  # a Counter: update() would add
            destination[tp] = off
        if moved:
            log.info("%s changelog highwaters moved to their last committed record: %s", title, moved)

    recovery._build_highwaters = build_highwaters


def install() -> None:
    """Patch Faust's consumer (idempotent): see the module docstring."""
    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
    Consumer.ack = _ack  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]
    Consumer._wait_next_records = _wait_next_records  # type: ignore[method-assign]
    Consumer.getmany = _getmany  # type: ignore[method-assign]
