"""Source records straight from Faust's fetches, in batches: the hot path without Faust's per-message stream.

Faust makes a message, an event and a stream item of every record it fetches and acks each one: a
no-op agent does about 13k events/s on the bench machine, below what the worker must do. With
``direct_consume`` (the default) the worker keeps Faust for what it is good at (group membership,
assignment, recovery, tables and their changelogs) and takes the source partitions' records out of
each fetch as aiokafka returns them (``streams.faust_fixes._divert``), into a :class:`RecordSink`.
:class:`DirectIngest` takes them in batches, sends each batch's outputs when it ends, and commits
the offsets itself, through Faust's group member, after the checkpoint that writes the batch's rows
(``streams/outbox.py``).

Across a rebalance:

- records are taken only in a consumer generation whose seek to the committed offsets is done
  (Faust's recovery seeks after every assignment), and each partition's only in offset order from
  the offset that seek set, as ``streams.faust_fixes`` does for Faust's own stream;
- a revocation waits for the batch in hand, writes a checkpoint and commits it, then drops
  everything buffered: the partition's next owner, maybe this worker again, reads it from the commit;
- a batch keeps only records of the generation it is processed in (:func:`batch_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from faust.types import TP

from streams.ingest import Record
from streams.outbox import Outbox


class Message:
    """What Faust's tables read of the *current event*: its partition picks the RocksDB file and the
    changelog partition of a table write (``FaustMarks.partition``)."""

    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


class PartitionEvent:
    """A stand-in for a Faust event of one source partition (a table write's context)."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = Message(topic, partition)


class RecordSink:
    """Fetched source records waiting for the ingest loop, with the generation they were fetched in.

    Bounded: a fetch that leaves more than ``limit`` records waiting holds Faust's fetcher until the
    loop has taken some (backpressure, as Faust's stream buffer does).
    """

    def __init__(self, topics: Iterable[str], limit: int) -> None:
        self.topics = frozenset(topics)
        self.limit = limit
        self.open_generation: int | None = None  # set by the seek of each generation
        self.chunks: deque[tuple[int, TP, list[Any]]] = deque()
        self.size = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._contexts: dict[tuple[str, int], PartitionEvent] = {}

    def put(self, generation: int, tp: TP, records: list[Any]) -> None:
        self.chunks.append((generation, tp, records))
        self.size += len(records)
        self._ready.set()
        if self.size >= self.limit:
            self._room.clear()

    async def room(self) -> None:
        """Wait until fewer than ``limit`` records are waiting."""
        if not self._room.is_set():
            await self._room.wait()

    def clear(self) -> int:
        """Drop everything waiting and take nothing until the next generation's seek; returns how
        many records were dropped (their partitions' owners read them again from the commit)."""
        dropped = self.size
        self.chunks.clear()
        self.size = 0
        self.open_generation = None
        self._ready.clear()
        self._room.set()
        return dropped

    async def take(self, limit: int) -> list[tuple[int, TP, list[Any]]]:
        """What is waiting, up to ``limit`` records (at least one chunk); waits for the first.

        No wait to fill a batch: records that arrive while a batch is processed make the next one,
        so batches grow with the load and a lone event is processed at once.
        """
        while not self.chunks:
            self._ready.clear()
            await self._ready.wait()
        out = []
        n = 0
        while self.chunks and n < limit:
            generation, tp, records = self.chunks[0]
            room = limit - n
            if len(records) > room:
                out.append((generation, tp, records[:room]))
                self.chunks[0] = (generation, tp, records[room:])
                n += room
                break
            self.chunks.popleft()
            out.append((generation, tp, records))
            n += len(records)
        self.size -= n
        if self.size < self.limit:
            self._room.set()
        return out

    def context(self, topic: str, partition: int) -> PartitionEvent:
        ctx = self._contexts.get((topic, partition))
        if ctx is None:
            ctx = self._contexts[(topic, partition)] = PartitionEvent(topic, partition)
        return ctx


def batch_of(
    sink: RecordSink, chunks: list[tuple[int, TP, list[Any]]], generation: int
) -> tuple[list[list[Record]], dict[TP, int], int]:
    """The records of ``chunks`` fetched in ``generation``, one list per partition (of any topic, in
    the order fetched: partitions share no state, so each is processed on its own), the offsets to
    commit once they are written (per topic partition, the next offset to read), and how many records
    were of another generation (dropped: the partition's owner reads them again)."""
    parts: dict[int, list[Record]] = {}
    offsets: dict[TP, int] = {}
    stale = 0
    for gen, tp, records in chunks:
        if gen != generation:
            stale += len(records)
            continue
        topic, partition = tp.topic, tp.partition
        ctx = sink.context(topic, partition)
        part = parts.get(partition)
        if part is None:
            part = parts[partition] = []
        part.extend(Record(topic, partition, r.offset, r.key, r.value, ctx) for r in records)
        offsets[tp] = records[-1].offset + 1
    return list(parts.values()), offsets, stale


class Committer:
    """Commits offsets in the background, one commit at a time, so the next batch is processed while
    the broker answers; offsets that pile up meanwhile go out merged in the next commit.

    A batch's offsets are handed over only after the checkpoint that writes its rows, outputs and
    watermarks, so any commit covers written events only. A revocation drains it (:meth:`drain`)
    while the old generation can still commit. A commit that fails leaves its offsets to be read
    again: at-least-once, counted.
    """

    def __init__(
        self, commit: Callable[[dict[TP, int]], Awaitable[Any]], failed: Callable[[BaseException], None]
    ) -> None:
        self.commit = commit
        self.failed = failed
        self.pending: dict[TP, int] = {}
        self.task: asyncio.Future[None] | None = None

    def add(self, offsets: dict[TP, int]) -> None:
        self.pending.update(offsets)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self.pending:
            offsets, self.pending = self.pending, {}
            try:
                await self.commit(offsets)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the partitions' next reader gets these records again
                self.failed(exc)

    async def drain(self) -> None:
        """Until every offset handed over is committed (or its commit failed)."""
        while self.task is not None and not self.task.done():
            await asyncio.wait([self.task])


class DirectIngest:
    """The hot path, stage by stage: take what the fetches left in the sink, keep the current
    generation's records, process them (``process``: the ingest handler, maybe in a thread), send
    the batch's outputs, and at a checkpoint write the rows held since the last one
    (``streams/outbox.py``) and then commit the offsets of every batch it covers."""

    def __init__(
        self,
        sink: RecordSink,
        outbox: Outbox,
        committer: Committer,
        process: Callable[[list[Record]], Awaitable[Any]],
        generation: Callable[[], int],
        stale: Callable[[int], None],
        stop: Callable[[BaseException, list[Record]], None],
        batch_size: int,
    ) -> None:
        self.sink = sink
        self.outbox = outbox
        self.committer = committer
        self.process = process
        self.generation = generation
        self.stale = stale
        self.stop = stop  # a batch failed outside any one user: the worker stops uncommitted
        self.batch_size = batch_size

    async def run(self) -> None:
        while True:
            chunks = await self.sink.take(self.batch_size)
            async with self.outbox.lock:  # judged after the wait: a rebalance may have come meanwhile
                await self.batch(chunks)

    async def batch(self, chunks: list[tuple[int, TP, list[Any]]]) -> None:
        outbox = self.outbox
        started_ms = int(time.time() * 1000)
        parts, offsets, stale = batch_of(self.sink, chunks, self.generation())
        if stale:
            self.stale(stale)
        if not parts:
            return
        outbox.started_ms = started_ms
        part: list[Record] = parts[0]  # the partition in hand: a failure names it
        try:
            # one partition at a time, the loop let go between them: its fetcher drains the
            # consumer's buffer (so the next fetch starts), lookups are served, and each
            # partition's outputs leave as it is done
            for i, part in enumerate(parts):
                if i:
                    await asyncio.sleep(0)
                await self.process(part)
                await outbox.send_outputs()
        except asyncio.CancelledError:
            # stopping: finish the writes; nothing is committed, so a restart reads the batch
            # again and per-user dedup recognises what was written
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(outbox.release(), 10.0)
            raise
        except BaseException as exc:
            self.stop(exc, part)
        if outbox.transactional:  # committed in the checkpoint's transaction, with all it wrote
            outbox.cover(offsets)
        else:  # committed once a checkpoint has its rows, outputs and watermarks acknowledged
            outbox.after(functools.partial(self.committer.add, offsets))
        try:  # a checkpoint begins in the background when one is due; the next batch goes on
            await outbox.checkpoint()
        except BaseException as exc:
            self.stop(exc, part)
