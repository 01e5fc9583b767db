"""A batch's table writes and outputs, released in the one order a SIGKILL cannot turn into a loss
of a trigger, a second copy of a training example or a valid event refused as late.

The handler's table writes are held here (read through by :meth:`Outbox.get`) and written at a
*checkpoint*, for every batch since the last one. Whatever a row records as done (a trigger fired,
a snapshot matured) must not be durable before, respectively must be durable before, the output
that does it. At-least-once, a checkpoint:

1. waits until the broker has the **triggers and change events** of its batches (each batch sent
   its own as it ended): a kill before the rows land redoes them from the old rows (at-least-once,
   the same ids);
2. sends **the rows** to their changelogs and waits for them: nothing of the batches can be
   replayed over them from an older changelog message any more;
3. only then sends **the watermarks** and waits: they judge whether an event is late, and a
   watermark that is durable while a row of the same batch is not would, after a takeover, refuse
   that user's redelivered events as late;
4. sends the **training examples** last and waits: a kill before they leave loses them
   (at-most-once), but no restart can mature them a second time;
5. writes the rows and watermarks to the **local RocksDB**, with the changelog offsets they came
   from, so the disk is never ahead of Kafka (a same-disk restart replays the changelog from there);
6. runs what waited for it: the commit of the source offsets of its batches.

Exactly-once, steps 1-4 and the offsets are one transaction (``streams/checkpoint_producer.py``)
and its outputs are held until it; steps 5 and 6 follow its commit.

The messages go through the worker's own producer, not Faust's table writes. A checkpoint runs in
the background: the next batches are processed while the broker acknowledges it, reading its rows
from :attr:`Outbox.flying` until step 5 has written them. One checkpoint is in flight at a time.
A checkpoint that held the loop (2026-12-07) stalled every second for 140-540 ms on the bench,
and the events behind it waited that long. Whoever must see everything written (a revocation, an
erasure, a stop) calls :meth:`Outbox.release`, which waits for the checkpoint in flight and then
writes and waits for one more. The ingest loop, the idle clock and the erasure agent hold
:attr:`Outbox.lock` while they work, so no other writer sees or overwrites a row held here.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from faust.streams import _current_event
from faust.types import TP
from rocksdict import WriteBatch

if TYPE_CHECKING:
    from streams.checkpoint_producer import CheckpointProducer, Message, Written

DELETE = object()  # a held write that removes the key
# (topic, key, value (None: a tombstone), headers)
Output = tuple[Any, bytes | None, bytes | None, list[tuple[str, bytes]] | None]
Writes = dict[tuple[int, Any], tuple[Any, Any, Any]]  # (table id, key) -> (table, event, value or DELETE)
Keys = dict[tuple[int, int], list[Any]]  # (table id, partition) -> keys written, sorted


BATCH_HEADER = "propstream.batch_ms"  # wall ms the worker began the batch that made the output
SENT_HEADER = "propstream.sent_ms"  # wall ms the worker handed it to its producer


def timing_headers(started_ms: int) -> list[tuple[str, bytes]]:
    """Headers of a change or trigger event that split its latency: batch start, then send."""
    return [(BATCH_HEADER, str(started_ms).encode()), (SENT_HEADER, str(int(time.time() * 1000)).encode())]


class Outbox:
    """Held writes (read through by :meth:`get`) and outputs, released in the order above.

    The ingest loop of direct consume releases in two parts: each batch's outputs go to the
    producer as soon as the batch ends (:meth:`send_outputs`, not waited for), and the held writes
    of every batch since the last one at a checkpoint begun in the background when one is due
    (:meth:`checkpoint`). The rows of a user who is in several batches meanwhile are written once.
    What runs after a checkpoint (:meth:`after`: the commit of the batches' offsets) runs only once
    its rows and watermarks are acknowledged and on the local disk.
    """

    def __init__(
        self,
        producer: CheckpointProducer,
        interval_s: float = 0.0,
        max_rows: int = 0,
        push: Callable[[], Awaitable[None]] | None = None,
        observe: Callable[[float, int], None] | None = None,
    ) -> None:
        self.lock = asyncio.Lock()
        self.producer = producer
        self.transactional = producer.transactional  # exactly-once: each checkpoint a transaction
        self.offsets: dict[Any, int] = {}  # exactly-once: source offsets the next transaction commits
        self.broken: str | None = None  # why no checkpoint may be written any more
        self.stamped: list[Output] = []  # exactly-once: outputs with their timing headers, held
        self.push = push or _nothing  # has the producer hand what was sent to the Kafka client now
        self.observe = observe  # (seconds, rows) of each checkpoint that wrote rows, for the metrics
        # (topic, key, value, headers): before the rows; headers None: the timing headers
        self.early: list[Output] = []
        self.late: list[tuple[Any, bytes, bytes]] = []  # after the rows
        self.writes: Writes = {}  # (table, key) -> (table, event, value)
        self.last: Writes = {}  # written once the writes are durable
        self.flying: Flight | None = None  # the checkpoint in flight, until its rows are on the disk
        self.inflight: list[asyncio.Future[Any]] = []  # outputs sent, not yet known delivered
        self.started_ms = 0  # wall ms the batch began (headers of its outputs: where latency went)
        self.interval_s = interval_s  # a checkpoint at least this often (0: after every batch)
        self.max_rows = max_rows  # and whenever this many rows are held (0: no bound)
        self.checkpoint_at = time.monotonic()
        self._after: list[Callable[[], None]] = []
        self._keys: Keys = {}  # (table, partition) -> held keys, sorted
        self._flight: asyncio.Future[None] | None = None

    def write(self, table: Any, key: Any, value: Any, *, last: bool = False) -> None:
        """Hold ``table[key] = value`` (or :data:`DELETE`) with the current event, which routes it to
        its partition's RocksDB file and changelog partition when it is released; ``last``: only
        once every other write of the checkpoint is acknowledged (the watermarks)."""
        ref = _current_event.get(None)
        event = ref() if ref is not None else None
        if event is None:
            msg = "a table write outside any partition's context"
            raise RuntimeError(msg)
        k = (id(table), key)
        if last:
            self.last[k] = (table, event, value)
            return
        if k not in self.writes:  # kept in key order per partition for scans (held_keys)
            bisect.insort(self._keys.setdefault((k[0], event.message.partition), []), key)
        self.writes[k] = (table, event, value)

    def get(self, table: Any, key: Any) -> tuple[bool, Any]:
        """(held, value) of a held write to ``table[key]``, or one in flight; value None for a delete.

        Read from the lookup thread too: the flight writes the disk before it lets go of a row."""
        k = (id(table), key)
        held = self.writes.get(k) or self.last.get(k)
        if held is None and (flying := self.flying) is not None:
            held = flying.writes.get(k) or flying.last.get(k)
        if held is None:
            return False, None
        value = held[2]
        return True, (None if value is DELETE else value)

    def held_keys(self, table: Any, partition: int, after: Any = None) -> list[tuple[Any, Any]]:
        """(key, value or :data:`DELETE`) of every write to ``table`` held for ``partition`` or in
        flight, in key order, keys after ``after`` only: a scan of the stored rows merges these in."""
        tid = id(table)
        parts = []
        flying = self.flying
        sources = ((flying.writes, flying.keys),) if flying is not None else ()
        for writes, index in (*sources, (self.writes, self._keys)):
            keys = index.get((tid, partition))
            if keys:
                start = 0 if after is None else bisect.bisect_right(keys, after)
                parts.append([(k, writes[(tid, k)][2]) for k in keys[start:]])
        if len(parts) < 2:
            return parts[0] if parts else []
        return sorted(dict(parts[0] + parts[1]).items())  # a key in both: the held value is the newer

    def send_early(
        self,
        topic: Any,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.early.append((topic, key, value, headers))

    def send_late(self, topic: Any, key: bytes, value: bytes) -> None:
        self.late.append((topic, key, value))

    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the next checkpoint is written."""
        self._after.append(fn)

    def cover(self, offsets: dict[Any, int]) -> None:
        """Exactly-once: commit these source offsets (next to read) in the next checkpoint's transaction."""
        self.offsets.update(offsets)

    def due(self) -> bool:
        """Is a checkpoint due (the interval passed, or the rows held reached the bound)?"""
        return time.monotonic() - self.checkpoint_at >= self.interval_s or self._full()

    def _full(self) -> bool:
        return self.max_rows > 0 and len(self.writes) >= self.max_rows

    def send_outputs_soon(self) -> None:
        """Hand the outputs held so far to the producer; :meth:`send_outputs` waits for them.
        Exactly-once: they are only stamped with the batch's timing headers (the send stage then
        shows the wait for the checkpoint); they leave in the checkpoint's transaction."""
        if not self.early:
            return
        timing = timing_headers(self.started_ms)
        if self.transactional:
            self.stamped.extend((t, k, v, timing if h is None else h) for t, k, v, h in self.early)
        else:
            for topic, k, v, h in self.early:
                self.inflight.append(topic.send_soon(key=k, value=v, headers=timing if h is None else h))
        self.early.clear()

    async def send_outputs(self) -> None:
        """The batch just processed: its outputs leave now; the next checkpoint waits for their
        acknowledgement before it writes any row that records them as done."""
        self.send_outputs_soon()
        await self.push()

    async def checkpoint(self) -> None:
        """After a batch or a tick: begin a checkpoint in the background if one is due and none is
        in flight (rows held up to the bound wait for the flight first). Raises what made an
        earlier checkpoint fail."""
        flight = self._flight
        if flight is not None and not flight.done() and not self._full():
            return
        await self._settle()
        if self.due():
            await self._begin()

    async def release(self) -> None:
        """A checkpoint of everything held, waited for, after the one in flight: all the batches so
        far are written and what waited for them has run. A release that was cancelled while it
        waited leaves the checkpoint to finish on its own; called again, it waits for it."""
        await self._settle()
        await self._begin()
        await self._settle()

    async def _settle(self) -> None:
        """Wait for the checkpoint in flight (never cancelling it); raise what made it fail."""
        flight = self._flight
        if flight is not None:
            await asyncio.wait([flight])
            self._flight = None
            flight.result()
        if self.broken is not None:
            raise RuntimeError(self.broken)

    async def _begin(self) -> None:
        """Take everything held into a checkpoint that runs in the background (:meth:`_fly`)."""
        self.checkpoint_at = time.monotonic()
        self.send_outputs_soon()
        if not (self.inflight or self.stamped or self.writes or self.last or self.late or self.offsets):
            self._run_after()  # nothing to write: what waits for a checkpoint need not
            return
        if not self.transactional:
            await self.push()  # the outputs the checkpoint waits for leave now
        self.flying = Flight(
            self.inflight,
            self.stamped,
            self.writes,
            self._keys,
            self.last,
            self.late,
            self.offsets,
            self._after,
        )
        self.inflight, self.stamped, self.late, self.offsets, self._after = [], [], [], {}, []
        self.writes, self.last, self._keys = {}, {}, {}
        self._flight = asyncio.ensure_future(self._fly(self.flying))

    async def _fly(self, f: Flight) -> None:
        started = time.perf_counter()
        try:
            if self.transactional:
                written = await self.producer.commit(f.messages(), f.offsets)
            else:
                written = await self._send(f)
        except BaseException as exc:
            # nothing of it is on the disk and its offsets are not committed: the worker stops,
            # and whoever reads the partitions next gets the batches again
            self.broken = f"a checkpoint could not be written ({exc!r}): no later checkpoint is written"
            raise
        _write_local(f.writes, written)
        _write_local(f.last, written)
        self.flying = None  # read from the disk from now on
        if f.writes and self.observe is not None:
            self.observe(time.perf_counter() - started, len(f.writes))
        for fn in f.after:
            fn()

    async def _send(self, f: Flight) -> Written:
        """At-least-once: steps 1-4 of the module docstring, each acknowledged before the next."""
        if f.outputs:
            await asyncio.wait(f.outputs)
            for fut in f.outputs:
                fut.result()  # a failed output: raise before any row records it as done
        written = await self.producer.send(_changelog(f.writes))
        if f.last:
            written.update(await self.producer.send(_changelog(f.last)))
        if f.late:
            await self.producer.send([(topic.get_topic_name(), None, k, v, None) for topic, k, v in f.late])
        return written

    def _run_after(self) -> None:
        done, self._after = self._after, []
        for fn in done:
            fn()


class Flight:
    """What one checkpoint writes, taken out of the outbox when it begins."""

    __slots__ = ("after", "keys", "last", "late", "offsets", "outputs", "stamped", "writes")

    def __init__(
        self,
        outputs: list[asyncio.Future[Any]],
        stamped: list[Output],
        writes: Writes,
        keys: Keys,
        last: Writes,
        late: list[tuple[Any, bytes, bytes]],
        offsets: dict[Any, int],
        after: list[Callable[[], None]],
    ) -> None:
        self.outputs = outputs
        self.stamped = stamped
        self.writes = writes  # read by the batches meanwhile (Outbox.get, Outbox.held_keys)
        self.keys = keys
        self.last = last
        self.late = late
        self.offsets = offsets
        self.after = after

    def messages(self) -> list[Message]:
        """Everything a transaction carries, in the order an at-least-once checkpoint sends it."""
        out: list[Message] = [(topic.get_topic_name(), None, k, v, h) for topic, k, v, h in self.stamped]
        out.extend(_changelog(self.writes))
        out.extend(_changelog(self.last))
        out.extend((topic.get_topic_name(), None, k, v, None) for topic, k, v in self.late)
        return out


def _changelog(writes: Writes) -> list[Message]:
    """The changelog messages of held writes, each to its event's partition."""
    out: list[Message] = []
    for (_, key), (table, event, value) in writes.items():
        name = table.changelog_topic.get_topic_name()
        out.append((name, event.message.partition, _raw(key), None if value is DELETE else _raw(value), None))
    return out


def _write_local(writes: Writes, written: Written) -> None:
    """Written rows to each table's local store, one RocksDB write batch per partition (the
    checkpoint sent their changelog messages; Faust's own table writes would send them again and
    cost about ten times as much per row), then the changelog offset each store now holds, as Faust
    records it (a restart on the same disk replays the changelog from there; exactly-once recovery
    is told where a transactional changelog's last record is: ``streams.faust_fixes``)."""
    batches: dict[tuple[int, int], tuple[Any, int, WriteBatch]] = {}
    for (_, key), (table, event, value) in writes.items():
        partition = event.message.partition
        held = batches.get((id(table), partition))
        if held is None:
            held = batches[(id(table), partition)] = (table, partition, WriteBatch(raw_mode=True))
        if value is DELETE:
            held[2].delete(_raw(key))
        else:
            held[2].put(_raw(key), _raw(value))
    for table, partition, batch in batches.values():
        table.data._db_for_partition(partition).write(batch)
    tables = {id(table): table for table, _, _ in batches.values()}
    for table in tables.values():
        name = table.changelog_topic.get_topic_name()
        for (topic, partition), offset in written.items():
            if topic == name:
                table.data.set_persisted_offset(TP(topic, partition), offset)


def _raw(value: Any) -> bytes:
    """A table key or value as Faust's ``raw`` codec puts it on the changelog (text as UTF-8)."""
    return value.encode() if isinstance(value, str) else value


async def _nothing() -> None:
    return None


async def drain_buffer(buffer: Any, spins: int = 64) -> None:
    """Let Faust's producer buffer hand what it holds to the Kafka client now, in order.

    Faust's buffer task (``ProducerBuffer._handle_pending``) sends whatever is queued each time it
    runs, but it runs only when the event loop turns, and a loop that goes from batch to batch
    turns seldom: outputs then waited behind the batches that followed them. So the loop is let go
    until the queue is empty (or ``spins`` times: a full client buffer waits for the broker). The
    buffer's own task does the sending: sending from here as well made the change events read
    back differ between two runs of ``test_timers.py``'s replay."""
    pending = buffer.pending
    for _ in range(spins):
        if pending.empty():
            return
        await asyncio.sleep(0)
