"""A batch's table writes and outputs, released in the one order a SIGKILL cannot turn into a loss
of a trigger, a second copy of a training example or a valid event refused as late.

Faust writes a table value to the local RocksDB at once and to its changelog a little later, and a
same-disk restart trusts the disk. So whatever a row records as done (a trigger fired, a snapshot
matured) must not be durable before, respectively must be durable before, the output that does it:

1. **triggers and change events** are sent and flushed first: a kill before the rows land redoes
   them from the old rows (at-least-once, the same ids);
2. **the rows** are written (local RocksDB and changelog) and flushed: nothing of the batch can be
   replayed over them from an older changelog message any more;
3. **the watermarks** are written only then (``write(..., last=True)``) and flushed: they judge
   whether an event is late, and a watermark that is durable while a row of the same batch is not
   would, after a takeover, refuse that user's redelivered events as late;
4. **training examples** are sent last: a kill before they leave loses them (at-most-once), but
   no restart can mature them a second time, so the trainer never learns one twice.

"Flushed" means every message of the step is acknowledged by the broker: the outbox awaits the
futures of its own sends and of the changelog messages its writes cause (:meth:`watch`), not
Faust's ``producer.flush()``, which returns once its buffer has been idle for 0.1 s.

A release returns, and so lets Faust acknowledge and later commit the batch's source offsets,
only once the rows' and watermarks' changelog messages are acknowledged: Faust's own flush before
a commit returns after 0.1 s of idleness, so a commit could cover events whose rows a SIGKILL then
lost, and a worker taking the partition over from the changelog never saw them again. It also
means a restart on the same disk, which replays unacknowledged changelog messages over the local
RocksDB, can only replay values the disk already has.

Steps 1 to 3 each wait for a broker round trip. With direct consume, step 1's sends leave after
every batch without waiting, and steps 1-4 run at a checkpoint for every batch since the last one
(:class:`Outbox`): a batch waits for no round trip, a checkpoint for three, and a user's row is
written once per checkpoint, not per batch; the offsets of the batches a checkpoint covers are
committed only after it. The ingest loop, the idle clock and the erasure agent hold
:attr:`Outbox.lock` while they work, and the last two, like a revocation, release (checkpoint)
first, so no other writer sees or overwrites a row held here.

A checkpoint that settled in the background while the next batches ran was built and measured
(2026-12-07) and dropped: its thousands of changelog messages share Faust's one producer queue
with the next batches' change events, which then waited behind them (e2e p50 1.6 s against 0.3 s).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from faust.streams import _current_event
from faust.types import TP

if TYPE_CHECKING:
    from streams.transactions import Message, Transactions

DELETE = object()  # a held write that removes the key
Output = tuple[Any, bytes | None, bytes, list[tuple[str, bytes]] | None]  # (topic, key, value, headers)


BATCH_HEADER = "propstream.batch_ms"  # wall ms the worker began the batch that made the output
SENT_HEADER = "propstream.sent_ms"  # wall ms the worker handed it to its producer


def timing_headers(started_ms: int) -> list[tuple[str, bytes]]:
    """Headers of a change or trigger event that split its latency: batch start, then send."""
    return [(BATCH_HEADER, str(started_ms).encode()), (SENT_HEADER, str(int(time.time() * 1000)).encode())]


class Outbox:
    """Held writes (read through by :meth:`get`) and outputs, released in the order above.

    The ingest loop of direct consume releases in two parts: each batch's outputs go to the
    producer as soon as the batch ends (:meth:`send_outputs`, step 1, not waited for), and the
    held writes of every batch since the last one at a *checkpoint* (:meth:`release`: the outputs'
    acknowledgement, then steps 2-4), when :meth:`due`. The rows of a user who is in several
    batches meanwhile are written once. What runs after a checkpoint (:meth:`after`: the commit of
    the batches' offsets) runs only once its rows and watermarks are acknowledged.
    """

    def __init__(
        self,
        interval_s: float = 0.0,
        max_rows: int = 0,
        push: Callable[[], Awaitable[None]] | None = None,
        observe: Callable[[float, int], None] | None = None,
        txn: Transactions | None = None,
    ) -> None:
        self.lock = asyncio.Lock()
        self.txn = txn  # exactly-once: a checkpoint is one transaction (:meth:`_release_in_transaction`)
        self.offsets: dict[Any, int] = {}  # exactly-once: source offsets the next transaction commits
        self._commit: asyncio.Future[dict[tuple[str, int], int]] | None = None
        self.broken: str | None = None  # exactly-once: why no checkpoint may be written any more
        self.stamped: list[Output] = []  # exactly-once: outputs with their timing headers, held
        self.push = push or _nothing  # has the producer hand what was sent to the Kafka client now
        self.observe = observe  # (seconds, rows) of each checkpoint that wrote rows, for the metrics
        # (topic, key, value, headers): before the rows; headers None: the timing headers
        self.early: list[Output] = []
        self.late: list[tuple[Any, bytes, bytes]] = []  # after the rows
        self.writes: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}  # (table, key) -> (table, event, value)
        self.last: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}  # written once the writes are durable
        self.inflight: list[asyncio.Future[Any]] = []  # sent by a release, not yet known delivered
        self.started_ms = 0  # wall ms the batch began (headers of its outputs: where latency went)
        self.interval_s = interval_s  # a checkpoint at least this often (0: after every batch)
        self.max_rows = max_rows  # and whenever this many rows are held (0: no bound)
        self.checkpoint_at = time.monotonic()
        self._after: list[Callable[[], None]] = []
        self._keys: dict[tuple[int, int], list[Any]] = {}  # (table, partition) -> held keys, sorted
        self._watching = False

    def watch(self, table: Any) -> None:
        """Keep the future of every changelog message ``table`` sends while a release writes."""
        send = table.send_changelog

        def send_changelog(*args: Any, **kwargs: Any) -> Any:
            fut = send(*args, **kwargs)
            if self._watching:
                self.inflight.append(fut)
            return fut

        table.send_changelog = send_changelog

    def write(self, table: Any, key: Any, value: Any, *, last: bool = False) -> None:
        """Hold ``table[key] = value`` (or :data:`DELETE`) with the current event, which routes it to
        its partition's RocksDB file and changelog partition when it is released; ``last``: only
        once every other write of the release is acknowledged (the watermarks)."""
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
        """(held, value) of a held write to ``table[key]``; value None for a held delete."""
        held = self.writes.get((id(table), key)) or self.last.get((id(table), key))
        if held is None:
            return False, None
        value = held[2]
        return True, (None if value is DELETE else value)

    def held_keys(self, table: Any, partition: int, after: Any = None) -> list[tuple[Any, Any]]:
        """(key, value or :data:`DELETE`) of every write to ``table`` held for ``partition``, in key
        order, keys after ``after`` only: a scan of the stored rows merges these in."""
        tid = id(table)
        keys = self._keys.get((tid, partition))
        if not keys:
            return []
        start = 0 if after is None else bisect.bisect_right(keys, after)
        writes = self.writes
        return [(k, writes[(tid, k)][2]) for k in keys[start:]]

    def send_early(
        self, topic: Any, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        self.early.append((topic, key, value, headers))

    def send_late(self, topic: Any, key: bytes, value: bytes) -> None:
        self.late.append((topic, key, value))

    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the next checkpoint's rows and watermarks are acknowledged."""
        self._after.append(fn)

    @property
    def transactional(self) -> bool:
        return self.txn is not None

    def cover(self, offsets: dict[Any, int]) -> None:
        """Exactly-once: commit these source offsets (next to read) in the next checkpoint's transaction."""
        self.offsets.update(offsets)

    def due(self) -> bool:
        """Is a checkpoint due (the interval passed, or the rows held reached the bound)?"""
        return time.monotonic() - self.checkpoint_at >= self.interval_s or (
            self.max_rows > 0 and len(self.writes) >= self.max_rows
        )

    def send_outputs_soon(self) -> None:
        """Hand the outputs held so far to the producer; :meth:`send_outputs` waits for them.
        Exactly-once: they are only stamped with the batch's timing headers (the send stage then
        shows the wait for the checkpoint); they leave in the checkpoint's transaction."""
        if not self.early:
            return
        timing = timing_headers(self.started_ms)
        if self.txn is not None:
            self.stamped.extend((t, k, v, timing if h is None else h) for t, k, v, h in self.early)
        else:
            for topic, k, v, h in self.early:
                self.inflight.append(topic.send_soon(key=k, value=v, headers=timing if h is None else h))
        self.early.clear()

    async def send_outputs(self) -> None:
        """Step 1 for the batch just processed: its outputs leave now; the next checkpoint waits
        for their acknowledgement before it writes any row that records them as done."""
        self.send_outputs_soon()
        await self.push()

    async def release(self) -> None:
        """A checkpoint: outputs, rows, watermarks and examples in the order above, then what waits
        for it. Each step forgets what it has done, so a release that was interrupted (cancelled
        while it waited) can be called again and finishes the rest."""
        if self.txn is not None:
            await self._release_in_transaction()
            return
        started, rows = time.perf_counter(), len(self.writes)
        await self.send_outputs()
        await self._delivered()  # every output of the batches the rows cover
        self._write(self.writes)  # no push: waiting for the acknowledgements turns the loop
        self._keys.clear()
        if self.last:
            await self._delivered()  # the rows first: see the module docstring
            self._write(self.last)
        await self._delivered()  # the batch is acknowledged (and committed) only after its rows
        if self.late:
            for topic, key, value in self.late:
                topic.send_soon(key=key, value=value)
            self.late.clear()
        self._checkpointed(started, rows)

    async def _release_in_transaction(self) -> None:
        """An exactly-once checkpoint: outputs, changelog messages of the rows and watermarks,
        training examples and source offsets in one transaction; the local RocksDB only once it is
        committed (its persisted changelog offsets with it), so the disk is never ahead of Kafka.

        The commit is shielded: a release cancelled while it waits leaves the transaction to
        finish or fail on its own, and this outbox refuses every later checkpoint (the worker is
        stopping; what the transaction did not commit is read again by the partitions' next owner,
        and a same-disk restart restores what it did commit from the changelog)."""
        assert self.txn is not None
        if self.broken is not None:
            raise RuntimeError(self.broken)
        started, rows = time.perf_counter(), len(self.writes)
        if self._commit is None:
            self.send_outputs_soon()  # stamps what a tick or a stop left unstamped
            if not (self.stamped or self.writes or self.last or self.late or self.offsets):
                self.checkpoint_at = time.monotonic()
                return
            self._commit = asyncio.ensure_future(self.txn.commit(self._messages(), self.offsets))
        try:
            written = await asyncio.shield(self._commit)
        except asyncio.CancelledError:
            self.broken = "a checkpoint's transaction was interrupted: no later checkpoint is written"
            raise
        except BaseException:
            self.broken = "a checkpoint's transaction failed: no later checkpoint is written"
            raise
        self._commit = None
        self.stamped.clear()
        self.late.clear()
        self.offsets = {}
        self._write_local(self.writes, written)
        self._write_local(self.last, written)
        self._keys.clear()
        self._checkpointed(started, rows)

    def _checkpointed(self, started: float, rows: int) -> None:
        """A checkpoint is written: the interval starts again, the metrics, what waited for it."""
        self.checkpoint_at = time.monotonic()
        if rows and self.observe is not None:
            self.observe(time.perf_counter() - started, rows)
        done, self._after = self._after, []
        for fn in done:
            fn()

    def _messages(self) -> list[Message]:
        """Everything a transaction carries, in the order an at-least-once checkpoint sends it."""
        out: list[Message] = [(topic.get_topic_name(), None, k, v, h) for topic, k, v, h in self.stamped]
        for writes in (self.writes, self.last):
            for (_, key), (table, event, value) in writes.items():
                name = table.changelog_topic.get_topic_name()
                out.append(
                    (name, event.message.partition, _raw(key), None if value is DELETE else _raw(value), None)
                )
        out.extend((topic.get_topic_name(), None, k, v, None) for topic, k, v in self.late)
        return out

    def _write_local(
        self, writes: dict[tuple[int, Any], tuple[Any, Any, Any]], written: dict[tuple[str, int], int]
    ) -> None:
        """Committed writes to each table's local store (no changelog message: the transaction
        carried it), and the changelog offset the store now holds, as Faust records it (its
        recovery is told where a transactional changelog's last record is: ``streams.faust_fixes``)."""
        tables: dict[int, Any] = {}
        for (_, key), (table, event, value) in writes.items():
            tables[id(table)] = table
            token = _current_event.set(weakref.ref(event))
            try:
                if value is DELETE:
                    with contextlib.suppress(KeyError):
                        del table.data[key]
                else:
                    table.data[key] = value
            finally:
                _current_event.reset(token)
        for table in tables.values():
            name = table.changelog_topic.get_topic_name()
            for (topic, partition), offset in written.items():
                if topic == name:
                    table.data.set_persisted_offset(TP(topic, partition), offset)
        writes.clear()

    def _write(self, writes: dict[tuple[int, Any], tuple[Any, Any, Any]]) -> None:
        """Apply held writes, each in its event's partition, keeping their changelog futures."""
        if not writes:
            return
        self._watching = True
        try:
            for (_, key), (table, event, value) in writes.items():
                token = _current_event.set(weakref.ref(event))
                try:
                    if value is DELETE:
                        table.pop(key, None)
                    else:
                        table[key] = value
                finally:
                    _current_event.reset(token)
        finally:
            self._watching = False
        writes.clear()

    async def _delivered(self) -> None:
        """Wait until the broker has every message sent so far; a failed send raises (the caller
        stops the worker unacknowledged). ``asyncio.wait``, not ``gather``: a cancelled release must
        not cancel the sends themselves."""
        if self.inflight:
            await asyncio.wait(self.inflight)
            for fut in self.inflight:
                fut.result()
            self.inflight.clear()


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
