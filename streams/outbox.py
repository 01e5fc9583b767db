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

Steps 2 and 3 each wait for a broker round trip, and step 1 in a batch with outputs. The ingest
loop does not wait for them: it seals the batch (:meth:`Outbox.release_behind`) and processes the
next one meanwhile, which reads the rows the sealed batches still hold (:meth:`Outbox.get`). Sealed
batches are released one after another in order, and each one's offsets are committed only once
its own release is done. The ingest loop, the idle clock and the erasure agent hold
:attr:`Outbox.lock` while they work, and the last two, like a revocation, wait for every sealed
batch first (:meth:`Outbox.drain`), so no other writer sees or overwrites a row that is held here.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from faust.streams import _current_event

DELETE = object()  # a held write that removes the key


BATCH_HEADER = "propstream.batch_ms"  # wall ms the worker began the batch that made the output
SENT_HEADER = "propstream.sent_ms"  # wall ms the worker handed it to its producer


def timing_headers(started_ms: int) -> list[tuple[str, bytes]]:
    """Headers of a change or trigger event that split its latency: batch start, then send."""
    return [(BATCH_HEADER, str(started_ms).encode()), (SENT_HEADER, str(int(time.time() * 1000)).encode())]


class _Sealed:
    """One batch's held writes and outputs, waiting for (or in) its release."""

    __slots__ = ("early", "last", "late", "on_done", "started_ms", "writes")

    def __init__(self, outbox: Outbox, on_done: Callable[[], None] | None) -> None:
        self.early = outbox.early
        self.late = outbox.late
        self.writes = outbox.writes
        self.last = outbox.last
        self.started_ms = outbox.started_ms
        self.on_done = on_done


class Outbox:
    """Held writes (read through by :meth:`get`) and outputs of the batch being processed, and of
    the batches processed before it whose release is still under way (:meth:`release_behind`)."""

    def __init__(self, behind: int = 1) -> None:
        self.lock = asyncio.Lock()
        # (topic, key, value, headers): before the rows; headers None: the timing headers
        self.early: list[tuple[Any, bytes | None, bytes, list[tuple[str, bytes]] | None]] = []
        self.late: list[tuple[Any, bytes, bytes]] = []  # after the rows
        self.writes: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}  # (table, key) -> (table, event, value)
        self.last: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}  # written once the writes are durable
        self.inflight: list[asyncio.Future[Any]] = []  # sent by a release, not yet known delivered
        self.started_ms = 0  # wall ms the batch began (headers of its outputs: where latency went)
        self.sealed: deque[_Sealed] = deque()  # processed batches, released oldest first
        self.behind = behind  # sealed batches a new batch may be processed beside
        self.failed: Callable[[BaseException], None] | None = None  # a background release failed
        self._releasing: asyncio.Future[None] | None = None
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
        (self.last if last else self.writes)[(id(table), key)] = (table, event, value)

    def get(self, table: Any, key: Any) -> tuple[bool, Any]:
        """(held, value) of a held write to ``table[key]``, the newest batch's first; value None for
        a held delete. A sealed batch's writes leave it only once they are in the table."""
        k = (id(table), key)
        held = self.writes.get(k) or self.last.get(k)
        if held is None and self.sealed:
            for b in reversed(tuple(self.sealed)):  # a copy: a batch may be processed in a thread
                held = b.writes.get(k) or b.last.get(k)
                if held is not None:
                    break
        if held is None:
            return False, None
        value = held[2]
        return True, (None if value is DELETE else value)

    def send_early(
        self, topic: Any, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        self.early.append((topic, key, value, headers))

    def send_late(self, topic: Any, key: bytes, value: bytes) -> None:
        self.late.append((topic, key, value))

    def _seal(self, on_done: Callable[[], None] | None = None) -> None:
        """The batch's writes and outputs join the release queue; the next batch starts empty."""
        if self.early or self.late or self.writes or self.last or on_done is not None:
            self.sealed.append(_Sealed(self, on_done))
            self.early, self.late, self.writes, self.last = [], [], {}, {}

    async def release(self) -> None:
        """Release the batch in hand and every one before it, in order; returns when all are done.
        Each step forgets what it has done, so a release that was interrupted (cancelled while it
        waited) can be called again and finishes the rest."""
        self._seal()
        await self.drain()

    def release_behind(self, on_done: Callable[[], None]) -> None:
        """Release the batch in hand in the background, after those before it, so the next batch
        is processed meanwhile; ``on_done`` once its rows and watermarks are acknowledged (the
        commit of its offsets). A failure goes to :attr:`failed` (the worker stops unacknowledged)."""
        self._seal(on_done)
        if self._releasing is None or self._releasing.done():
            self._releasing = asyncio.ensure_future(self._release_all(background=True))

    async def room(self) -> None:
        """Until at most :attr:`behind` batches wait for their release (a bound on held state)."""
        while len(self.sealed) > self.behind and self._releasing is not None and not self._releasing.done():
            await asyncio.wait([self._releasing], timeout=0.05)

    async def drain(self) -> None:
        """Until every sealed batch is released (a revocation, an erasure, a tick)."""
        if self._releasing is not None and not self._releasing.done():
            await asyncio.wait([self._releasing])  # not cancelled with a cancelled caller
        await self._release_all()

    async def _release_all(self, background: bool = False) -> None:
        try:
            while self.sealed:
                b = self.sealed[0]
                await self._release(b)
                self.sealed.popleft()
                if b.on_done is not None:
                    b.on_done()
        except Exception as exc:
            if not background or self.failed is None:
                raise
            self.failed(exc)

    async def _release(self, b: _Sealed) -> None:
        """Outputs and writes in the order above."""
        if b.early:
            timing = timing_headers(b.started_ms)
            self.inflight += [
                topic.send_soon(key=k, value=v, headers=timing if h is None else h)
                for topic, k, v, h in b.early
            ]
            b.early.clear()
        await self._delivered()
        self._write(b.writes)
        if b.last:
            await self._delivered()  # the rows first: see the module docstring
            self._write(b.last)
        await self._delivered()  # the batch is acknowledged (and committed) only after its rows
        if b.late:
            for topic, key, value in b.late:
                topic.send_soon(key=key, value=value)
            b.late.clear()

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
