"""The outbox writes a checkpoint in the one order that loses no trigger and doubles no example, in the
background, and the local disk only ever follows what the broker acknowledged.

A fake checkpoint producer records what each checkpoint sends and hands out a future per call that
the test resolves, so the test sees what was sent, written to the local store and run, and when.
The broker is the integration tests' job: ``test_crash_safety.py`` and ``test_timers.py`` kill real
workers around this order, in both guarantees.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.streams import _current_event
from faust.types import TP
from rocksdict import Options, Rdict

from streams.outbox import BATCH_HEADER, DELETE, SENT_HEADER, Outbox, drain_buffer

ROWS, MARKS = "app-features-changelog", "app-watermarks-changelog"


class FakeProducer:
    """A :class:`streams.checkpoint_producer.CheckpointProducer` whose calls wait for the test."""

    def __init__(self, transactional: bool = False) -> None:
        self.transactional = transactional
        self.calls: list[tuple[str, list[Any], dict[Any, int]]] = []
        self.pending: list[asyncio.Future[dict[tuple[str, int], int]]] = []
        self.offsets: dict[tuple[str, int], int] = {}  # the next offset of each topic partition

    async def send(self, messages: list[Any]) -> dict[tuple[str, int], int]:
        return await self._call("send", messages, {})

    async def commit(self, messages: list[Any], offsets: dict[Any, int]) -> dict[tuple[str, int], int]:
        return await self._call("commit", messages, offsets)

    async def _call(self, kind: str, messages: list[Any], offsets: dict[Any, int]) -> Any:
        self.calls.append((kind, list(messages), dict(offsets)))
        fut: asyncio.Future[dict[tuple[str, int], int]] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        return await fut

    def ack(self) -> None:
        """The broker writes the oldest waiting call: offsets as a log would give them."""
        fut = self.pending.pop(0)
        messages = self.calls[len(self.calls) - len(self.pending) - 1][1]
        last: dict[tuple[str, int], int] = {}
        for topic, partition, *_ in messages:
            tp = (topic, partition or 0)
            last[tp] = self.offsets.get(tp, 0)
            self.offsets[tp] = last[tp] + 1
        fut.set_result(last)

    def sent(self) -> list[list[tuple[Any, ...]]]:
        """(topic, partition, key, value) of each call's messages, call by call."""
        return [[m[:4] for m in messages] for _, messages, _ in self.calls]


class Store:
    """A table's local store as the outbox uses Faust's: a real RocksDB per partition, and the
    changelog offset each holds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dbs: dict[int, Rdict] = {}
        self.persisted: dict[TP, int] = {}

    def _db_for_partition(self, partition: int) -> Rdict:
        if partition not in self.dbs:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.dbs[partition] = Rdict(str(self.folder / str(partition)), Options(raw_mode=True))
        return self.dbs[partition]

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        self.persisted[tp] = offset

    def contents(self) -> dict[str, tuple[int, bytes]]:
        """key -> (partition, value) of every row stored."""
        return {k.decode(): (p, v) for p, db in self.dbs.items() for k, v in db.items()}


class Table:
    def __init__(self, changelog: str, folder: Path) -> None:
        self.data = Store(folder / changelog)
        self.changelog_topic = SimpleNamespace(get_topic_name=lambda: changelog)


class Topic:
    """An output topic: at-least-once, its sends are Faust's ``send_soon`` futures."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sends: list[tuple[bytes | None, bytes, Any, asyncio.Future[None]]] = []

    def get_topic_name(self) -> str:
        return self.name

    def send_soon(self, key: bytes | None, value: bytes, headers: Any = None) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sends.append((key, value, headers, fut))
        return fut

    def ack(self, error: BaseException | None = None) -> None:
        for *_, fut in self.sends:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)


class Event:
    """Stands in for the Faust event that routes a write to its partition (``message.partition``)."""

    def __init__(self, partition: int = 0) -> None:
        self.message = SimpleNamespace(partition=partition)


def hold(box: Outbox, table: Table, key: str, value: Any, ev: Event, *, last: bool = False) -> None:
    token = _current_event.set(weakref.ref(ev))  # type: ignore[arg-type]  # faust wants an EventT
    try:
        box.write(table, key, value, last=last)
    finally:
        _current_event.reset(token)


async def until(cond: Any, what: str) -> None:
    for _ in range(100):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


def test_a_checkpoint_waits_for_outputs_then_rows_then_marks_then_examples_and_the_disk_comes_last(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        producer = FakeProducer()
        box = Outbox(producer)  # type: ignore[arg-type]  # the fake has what is used
        rows, marks = Table(ROWS, tmp_path), Table(MARKS, tmp_path)
        p2, p3 = Event(2), Event(3)
        rows.data._db_for_partition(3)[b"gone"] = b"old"  # stored before this checkpoint
        hold(box, rows, "u1", b"row", p2)
        hold(box, rows, "gone", DELETE, p3)
        hold(box, marks, "clickstream|2", b"42", p2, last=True)
        triggers, training = Topic("triggers"), Topic("training")
        box.send_early(triggers, b"u1", b"t")
        box.send_late(training, b"purchase", b"x")
        done: list[str] = []
        box.after(lambda: done.append("commit"))
        assert box.get(rows, "u1") == (True, b"row") and box.get(rows, "gone") == (True, None)
        assert box.get(rows, "u3") == (False, None)

        task = asyncio.ensure_future(box.release())
        await until(lambda: triggers.sends, "the trigger sent")
        await asyncio.sleep(0)
        assert producer.calls == [], "a row sent before the trigger it records was acknowledged"
        triggers.ack()
        await until(lambda: producer.calls, "the rows sent")
        assert producer.sent() == [[(ROWS, 2, b"u1", b"row"), (ROWS, 3, b"gone", None)]]  # a tombstone
        producer.ack()
        await until(lambda: len(producer.calls) == 2, "the watermark sent")
        assert producer.sent()[1] == [(MARKS, 2, b"clickstream|2", b"42")]
        producer.ack()
        await until(lambda: len(producer.calls) == 3, "the example sent")
        assert producer.sent()[2] == [("training", None, b"purchase", b"x")]
        # in flight: the disk holds nothing of it, reads go through the rows in flight
        assert rows.data.contents() == {"gone": (3, b"old")} and marks.data.contents() == {} and done == []
        assert box.get(rows, "u1") == (True, b"row") and box.get(rows, "gone") == (True, None)
        producer.ack()
        await asyncio.wait_for(task, 1.0)
        assert rows.data.contents() == {"u1": (2, b"row")} and marks.data.contents() == {
            "clickstream|2": (2, b"42")
        }
        # the store records the changelog offset it now holds, per partition, as Faust does
        assert rows.data.persisted == {TP(ROWS, 2): 0, TP(ROWS, 3): 0}
        assert marks.data.persisted == {TP(MARKS, 2): 0}
        assert done == ["commit"]
        assert box.get(rows, "u1") == (False, None), "still held after the disk has it"

    asyncio.run(run())


def test_the_next_batches_run_while_a_checkpoint_is_in_flight_and_the_next_checkpoint_waits_for_it(
    tmp_path: Path,
) -> None:
    """A due checkpoint begins in the background; the batches after it read its rows, hold newer
    ones, send their outputs and queue their commits for the next checkpoint, which begins only
    once the one in flight is written (or at once waits for it, when the rows reach the bound)."""

    async def run() -> None:
        producer = FakeProducer()
        box = Outbox(producer, interval_s=0.0, max_rows=3)  # type: ignore[arg-type]
        rows = Table(ROWS, tmp_path)
        changes = Topic("changes")
        ev = Event(0)
        done: list[int] = []

        async def batch(n: int, *users: str) -> None:
            for u in users:
                hold(box, rows, u, f"{u}@{n}".encode(), ev)
            box.send_early(changes, users[0].encode(), f"change {n}".encode())
            box.after(lambda: done.append(n))
            await box.send_outputs()
            await asyncio.wait_for(box.checkpoint(), 1.0)  # never waits for the broker here

        await batch(1, "u1", "u2")
        changes.ack()
        await until(lambda: producer.calls, "checkpoint 1 sent its rows")
        await batch(2, "u1")  # while checkpoint 1 is in flight
        assert len(changes.sends) == 2, "the batch's outputs waited for the checkpoint"
        assert len(producer.calls) == 1, "a second checkpoint began while one was in flight"
        assert box.get(rows, "u1") == (True, b"u1@2") and box.get(rows, "u2") == (True, b"u2@1")
        assert box.held_keys(rows, 0) == [("u1", b"u1@2"), ("u2", b"u2@1")]
        assert box.held_keys(rows, 0, after="u1") == [("u2", b"u2@1")]
        producer.ack()  # checkpoint 1 written
        await until(lambda: done == [1], "checkpoint 1's commit")
        assert rows.data.contents() == {"u1": (0, b"u1@1"), "u2": (0, b"u2@1")}
        assert box.get(rows, "u1") == (True, b"u1@2"), "the held newer row lost to the written older one"

        await batch(3, "u3", "u4")  # three rows held: checkpoint 2 begins now
        await asyncio.sleep(0)
        assert len(producer.calls) == 1, "rows sent before the outputs they record were acknowledged"
        changes.ack()
        await until(lambda: len(producer.calls) == 2, "checkpoint 2 sent its rows")
        assert done == [1]
        assert producer.sent()[1] == [
            (ROWS, 0, b"u1", b"u1@2"),
            (ROWS, 0, b"u3", b"u3@3"),
            (ROWS, 0, b"u4", b"u4@3"),
        ]
        hold(box, rows, "u5", b"u5@4", ev)
        hold(box, rows, "u6", b"u6@4", ev)
        hold(box, rows, "u7", b"u7@4", ev)
        full = asyncio.ensure_future(box.checkpoint())  # at the bound: waits for checkpoint 2
        await asyncio.sleep(0)
        assert not full.done() and len(producer.calls) == 2
        changes.ack()
        producer.ack()
        await asyncio.wait_for(full, 1.0)
        assert done == [1, 2, 3]
        await until(lambda: len(producer.calls) == 3, "checkpoint 3 sent its rows")
        assert [m[2] for m in producer.calls[2][1]] == [b"u5", b"u6", b"u7"]

    asyncio.run(run())


@pytest.mark.parametrize("fails", ["output", "rows", "cancelled release"])
def test_a_checkpoint_that_fails_writes_nothing_to_disk_commits_nothing_and_stops_later_ones(
    fails: str, tmp_path: Path
) -> None:
    async def run() -> None:
        producer = FakeProducer()
        box = Outbox(producer)  # type: ignore[arg-type]
        rows = Table(ROWS, tmp_path)
        hold(box, rows, "u1", b"row", Event(0))
        changes = Topic("changes")
        box.send_early(changes, b"u1", b"x")
        done: list[int] = []
        box.after(lambda: done.append(1))
        task = asyncio.ensure_future(box.release())
        await until(lambda: changes.sends, "the output sent")
        if fails == "output":
            changes.ack(RuntimeError("broker gone"))
            with pytest.raises(RuntimeError, match="broker gone"):
                await task
            assert producer.calls == [], "a row sent after its output was lost"
        elif fails == "rows":
            changes.ack()
            await until(lambda: producer.pending, "the rows sent")
            producer.pending[0].set_exception(RuntimeError("fenced"))
            with pytest.raises(RuntimeError, match="fenced"):
                await task
        else:  # a stop cancels the release: the checkpoint itself runs on and finishes
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not changes.sends[0][3].cancelled(), "a send was cancelled with the release"
            changes.ack()
            await until(lambda: producer.pending, "the rows sent")
            producer.ack()
            await asyncio.wait_for(box.release(), 1.0)  # called again: waits for it, then nothing more
            assert rows.data.contents() == {"u1": (0, b"row")} and done == [1]
            assert len(producer.calls) == 1
            return
        assert rows.data.contents() == {} and done == [], "the disk or the commit ran ahead of the broker"
        with pytest.raises(RuntimeError, match="no later checkpoint"):
            await box.checkpoint()

    asyncio.run(run())


def test_a_write_outside_a_partition_is_refused(tmp_path: Path) -> None:
    box = Outbox(FakeProducer())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="outside any partition"):
        box.write(Table(ROWS, tmp_path), "u1", b"row")


def test_outputs_carry_when_their_batch_began_and_when_they_were_sent() -> None:
    """The timing headers the bench splits latency by: batch start as the caller set it, then a send
    time taken when the batch's outputs were handed over (read against the wall clock around it)."""

    async def run() -> None:
        box = Outbox(FakeProducer(), interval_s=3600.0)  # type: ignore[arg-type]
        topic = Topic("changes")
        box.started_ms = 1_700_000_000_123
        box.send_early(topic, b"u1", b"x")
        box.send_early(topic, b"u1", b"dead letter", [("reason", b"x")])  # headers of its own
        before = int(time.time() * 1000)
        await box.send_outputs()
        after = int(time.time() * 1000)
        headers = dict(topic.sends[0][2] or [])
        assert headers[BATCH_HEADER] == b"1700000000123"
        assert before <= int(headers[SENT_HEADER]) <= after
        assert topic.sends[1][2] == [("reason", b"x")]

    asyncio.run(run())


def test_a_checkpoint_is_due_after_the_interval_or_at_the_row_bound(tmp_path: Path) -> None:
    box = Outbox(FakeProducer(), interval_s=3600.0, max_rows=2)  # type: ignore[arg-type]
    table, ev = Table(ROWS, tmp_path), Event()
    assert not box.due()
    hold(box, table, "u1", b"x", ev)
    assert not box.due()
    hold(box, table, "u2", b"x", ev)
    assert box.due(), "two rows held at a bound of two"
    assert Outbox(FakeProducer()).due(), "no interval: a checkpoint after every batch"  # type: ignore[arg-type]


def test_held_keys_come_in_key_order_per_partition_and_leave_with_the_checkpoint(tmp_path: Path) -> None:
    async def run() -> None:
        producer = FakeProducer()
        box = Outbox(producer, interval_s=3600.0)  # type: ignore[arg-type]
        table = Table(ROWS, tmp_path)
        p0, p1 = Event(0), Event(1)
        for key, ev in (("u5", p0), ("u1", p0), ("u9", p1), ("u3", p0), ("u1", p0)):
            hold(box, table, key, DELETE if key == "u3" else key.encode(), ev)
        assert box.held_keys(table, 0) == [("u1", b"u1"), ("u3", DELETE), ("u5", b"u5")]
        assert box.held_keys(table, 0, after="u1") == [("u3", DELETE), ("u5", b"u5")]
        assert box.held_keys(table, 1) == [("u9", b"u9")] and box.held_keys(table, 2) == []
        task = asyncio.ensure_future(box.release())
        await until(lambda: producer.pending, "the rows sent")
        assert box.held_keys(table, 0) == [("u1", b"u1"), ("u3", DELETE), ("u5", b"u5")], "in flight"
        producer.ack()
        await asyncio.wait_for(task, 1.0)
        assert box.held_keys(table, 0) == [] and box.held_keys(table, 1) == []
        assert table.data.contents() == {"u1": (0, b"u1"), "u5": (0, b"u5"), "u9": (1, b"u9")}

    asyncio.run(run())


def test_a_checkpoint_that_writes_rows_reports_how_long_it_took_and_how_many_rows(tmp_path: Path) -> None:
    async def run() -> None:
        seen: list[tuple[float, int]] = []
        producer = FakeProducer()
        box = Outbox(producer, observe=lambda s, n: seen.append((s, n)))  # type: ignore[arg-type]
        table, ev = Table(ROWS, tmp_path), Event()
        for key in ("u1", "u2", "u1"):  # u1 twice: one row
            hold(box, table, key, b"x", ev)
        started = time.perf_counter()
        task = asyncio.ensure_future(box.release())
        await until(lambda: producer.pending, "the rows sent")
        assert seen == [], "reported before the rows were acknowledged"
        producer.ack()
        await asyncio.wait_for(task, 1.0)
        took = time.perf_counter() - started
        assert len(seen) == 1 and seen[0][1] == 2
        assert 0 < seen[0][0] <= took
        await asyncio.wait_for(box.release(), 1.0)  # nothing held: not a checkpoint worth a sample
        assert len(seen) == 1 and len(producer.calls) == 1

    asyncio.run(run())


def test_exactly_once_one_transaction_carries_outputs_rows_marks_examples_and_offsets(tmp_path: Path) -> None:
    async def run() -> None:
        producer = FakeProducer(transactional=True)
        box = Outbox(producer, interval_s=3600.0)  # type: ignore[arg-type]
        rows, marks = Table(ROWS, tmp_path), Table(MARKS, tmp_path)
        p2, p3 = Event(2), Event(3)
        rows.data._db_for_partition(3)[b"gone"] = b"old"
        hold(box, rows, "u1", b"row1", p2)
        hold(box, rows, "gone", DELETE, p3)
        hold(box, marks, "clickstream", b"mark", p2, last=True)
        deadletter, changes, triggers = Topic("deadletter"), Topic("changes"), Topic("triggers")
        box.send_early(deadletter, b"u1", b"bad", [("reason", b"x")])
        box.send_early(changes, b"u1", b"change")
        box.started_ms = 1_000
        await box.send_outputs()  # a batch's end: in this mode the outputs wait for the checkpoint
        box.send_early(triggers, b"u1", b"cart")  # the next batch's
        box.started_ms = 2_000
        await box.send_outputs()
        assert producer.calls == [] and not (deadletter.sends or changes.sends or triggers.sends)
        box.send_late(Topic("training"), b"purchase", b"example")
        box.cover({TP("clickstream", 2): 41})
        box.cover({TP("clickstream", 2): 57, TP("cart", 3): 9})

        checkpoint = asyncio.ensure_future(box.release())
        await until(lambda: producer.pending, "the transaction sent")
        ((kind, messages, offsets),) = producer.calls
        assert kind == "commit"
        # each batch's outputs carry that batch's start, stamped when it ended, not the checkpoint's
        change, trigger = dict(messages[1][4] or ()), dict(messages[2][4] or ())
        assert (change[BATCH_HEADER], trigger[BATCH_HEADER]) == (b"1000", b"2000")
        assert int(change[SENT_HEADER]) <= int(trigger[SENT_HEADER])
        assert [m[:4] for m in messages] == [
            ("deadletter", None, b"u1", b"bad"),
            ("changes", None, b"u1", b"change"),
            ("triggers", None, b"u1", b"cart"),
            (ROWS, 2, b"u1", b"row1"),
            (ROWS, 3, b"gone", None),
            (MARKS, 2, b"clickstream", b"mark"),
            ("training", None, b"purchase", b"example"),
        ]
        assert messages[0][4] == [("reason", b"x")]
        assert offsets == {TP("clickstream", 2): 57, TP("cart", 3): 9}
        assert "u1" not in rows.data.contents() and box.get(rows, "u1") == (True, b"row1")
        producer.ack()
        await asyncio.wait_for(checkpoint, 1.0)
        assert rows.data.contents() == {"u1": (2, b"row1")} and marks.data.contents() == {
            "clickstream": (2, b"mark")
        }
        assert rows.data.persisted == {TP(ROWS, 2): 0, TP(ROWS, 3): 0}
        await box.release()  # nothing held: no empty transaction
        assert len(producer.calls) == 1

    asyncio.run(run())


def test_drain_buffer_lets_the_buffers_own_task_send_until_its_queue_is_empty() -> None:
    """The outputs leave in the order queued, sent by one task: the drain only lets it run."""

    async def run() -> None:
        sent: list[int] = []
        buffer = SimpleNamespace(pending=asyncio.Queue())

        async def handle_pending() -> None:  # Faust's ProducerBuffer._handle_pending, one per turn
            while True:
                sent.append(await buffer.pending.get())

        task = asyncio.ensure_future(handle_pending())
        for i in range(5):
            buffer.pending.put_nowait(i)
        await asyncio.wait_for(drain_buffer(buffer), 1.0)
        assert sent == [0, 1, 2, 3, 4] and buffer.pending.empty()
        task.cancel()
        stuck = SimpleNamespace(pending=asyncio.Queue())
        stuck.pending.put_nowait(0)  # nobody sends (a full client buffer): the drain gives up
        await asyncio.wait_for(drain_buffer(stuck, spins=3), 1.0)
        assert stuck.pending.qsize() == 1

    asyncio.run(run())
