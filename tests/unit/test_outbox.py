"""The outbox releases a batch in the order that loses no trigger and doubles no example.

Fake topics and tables record into one log and hand out futures the test resolves itself, so the
test sees what was sent, written and awaited, and when (the broker is the integration tests' job:
``test_timers.py`` and ``test_crash_safety.py`` kill real workers around this order).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
from faust.streams import _current_event

from streams.outbox import DELETE, Outbox, drain_buffer


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []
        self.futures: list[asyncio.Future[None]] = []

    def future(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    def ack_all(self) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_result(None)


class FakeTopic:
    def __init__(self, name: str, log: Log) -> None:
        self.name, self.log = name, log

    def send_soon(
        self, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> asyncio.Future[None]:
        self.log.entries.append((f"send {self.name}", key))
        self.headers = headers
        return self.log.future()


class FakeTable(dict[Any, Any]):
    """A dict whose writes send a 'changelog' message, as a Faust table does."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def send_changelog(self, key: Any) -> asyncio.Future[None]:
        return self.log.future()

    def __setitem__(self, key: Any, value: Any) -> None:
        ref = _current_event.get(None)
        self.log.entries.append(("write", (key, ref() if ref else None)))
        super().__setitem__(key, value)
        self.send_changelog(key)

    def pop(self, key: Any, default: Any = None) -> Any:
        self.log.entries.append(("delete", key))
        self.send_changelog(key)
        return super().pop(key, default)


class Event:
    """Stands in for the Faust event that routes a write to its partition (``message.partition``)."""

    def __init__(self, partition: int = 0) -> None:
        self.message = SimpleNamespace(partition=partition)


def in_partition(event: Event) -> Any:
    return _current_event.set(weakref.ref(event))  # type: ignore[arg-type]  # faust wants an EventT


def one_row(early: str) -> tuple[Log, FakeTable, Outbox, Event]:
    """An outbox holding one row write (u1) and one early output to the topic named ``early``."""
    log = Log()
    table = FakeTable(log)
    box = Outbox()
    box.watch(table)
    ev = Event()  # held: the context keeps a weak reference only
    token = in_partition(ev)
    box.write(table, "u1", b"row")
    _current_event.reset(token)
    box.send_early(FakeTopic(early, log), b"u1", b"x")
    return log, table, box, ev


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_triggers_are_acknowledged_before_rows_and_rows_before_examples() -> None:
    async def run() -> None:
        log = Log()
        table = FakeTable(log)
        box = Outbox()
        box.watch(table)
        triggers, training = FakeTopic("triggers", log), FakeTopic("training", log)
        ev = Event()
        token = in_partition(ev)
        box.write(table, "u1", b"row")
        box.write(table, "u2", DELETE)
        _current_event.reset(token)
        box.send_early(triggers, b"u1", b"t")
        box.send_late(training, b"purchase", b"x")
        assert box.get(table, "u1") == (True, b"row")  # held writes are read through
        assert box.get(table, "u2") == (True, None)
        assert box.get(table, "u3") == (False, None)

        task = asyncio.ensure_future(box.release())
        await settle()
        assert log.entries == [("send triggers", b"u1")], "nothing written before the trigger is acked"
        log.ack_all()
        await settle()
        assert log.entries[1:] == [("write", ("u1", ev)), ("delete", "u2")]  # in the event's partition
        assert not task.done(), "examples wait for the rows' changelog messages"
        log.ack_all()
        await task
        assert log.entries[-1] == ("send training", b"purchase")
        assert table == {"u1": b"row"}
        assert box.get(table, "u1") == (False, None)

    asyncio.run(run())


def test_a_cancelled_release_finishes_when_called_again_and_cancels_no_send() -> None:
    async def run() -> None:
        log, table, box, _ = one_row("changes")
        task = asyncio.ensure_future(box.release())
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not any(f.cancelled() for f in log.futures), "a send was cancelled with the release"
        assert [e for e, _ in log.entries] == ["send changes"]
        again = asyncio.ensure_future(box.release())
        await settle()
        assert [e for e, _ in log.entries] == ["send changes"], "not resent, still awaited"
        log.ack_all()
        await settle()
        log.ack_all()  # the row's changelog message, sent by the second release
        await again
        assert [e for e, _ in log.entries] == ["send changes", "write"]
        assert table == {"u1": b"row"}

    asyncio.run(run())


def test_a_failed_send_raises_and_writes_nothing() -> None:
    async def run() -> None:
        log, table, box, _ = one_row("triggers")
        task = asyncio.ensure_future(box.release())
        await settle()
        log.futures[0].set_exception(OSError("broker gone"))
        with pytest.raises(OSError, match="broker gone"):
            await task
        assert table == {}

    asyncio.run(run())


def test_a_write_outside_a_partition_is_refused() -> None:
    box = Outbox()
    with pytest.raises(RuntimeError, match="outside any partition"):
        box.write(FakeTable(Log()), "u1", b"row")


def with_mark() -> tuple[Log, FakeTable, Outbox, Event, FakeTable]:
    """:func:`one_row` plus a held watermark write (``src|0``) to a second table."""
    log, table, box, ev = one_row("changes")
    marks = FakeTable(log)
    box.watch(marks)
    token = in_partition(ev)
    box.write(marks, "src|0", b"42", last=True)
    _current_event.reset(token)
    return log, table, box, ev, marks


def test_watermarks_are_written_only_once_the_rows_are_acknowledged() -> None:
    async def run() -> None:
        log, table, box, ev, marks = with_mark()
        assert box.get(marks, "src|0") == (True, b"42")
        task = asyncio.ensure_future(box.release())
        await settle()
        log.ack_all()  # the change event
        await settle()
        assert [e for e, _ in log.entries] == ["send changes", "write"], "the mark waits for the row"
        log.ack_all()  # the row's changelog message
        await settle()
        assert log.entries[-1] == ("write", ("src|0", ev))
        log.ack_all()  # the watermark's
        await task
        assert marks == {"src|0": b"42"} and table == {"u1": b"row"}

    asyncio.run(run())


def test_a_release_returns_only_once_its_rows_and_watermarks_are_acknowledged() -> None:
    """Faust acknowledges the batch, and later commits its offsets, when the release returns: a
    commit must never cover events whose rows a SIGKILL could still lose."""

    async def run() -> None:
        log, _table, box, _ev, marks = with_mark()
        task = asyncio.ensure_future(box.release())
        await settle()
        log.futures[0].set_result(None)  # the change event
        await settle()
        log.futures[1].set_result(None)  # the row's changelog message
        await settle()
        assert marks == {"src|0": b"42"}
        assert not task.done(), "returned with the watermark's message unacknowledged"
        log.ack_all()
        await task

    asyncio.run(run())


def test_outputs_carry_when_their_batch_began_and_when_they_were_sent() -> None:
    """The timing headers the bench splits latency by: batch start as the caller set it, then a send
    time taken at the release (read against the wall clock around it)."""

    async def run() -> None:
        log = Log()
        box = Outbox()
        topic = FakeTopic("changes", log)
        box.started_ms = 1_700_000_000_123
        box.send_early(topic, b"u1", b"x")
        before = int(time.time() * 1000)
        task = asyncio.ensure_future(box.release())
        await settle()
        after = int(time.time() * 1000)
        log.ack_all()
        await task
        headers = dict(topic.headers or [])
        assert headers["propstream.batch_ms"] == b"1700000000123"
        assert before <= int(headers["propstream.sent_ms"]) <= after

    asyncio.run(run())


def test_outputs_leave_after_each_batch_and_rows_once_per_checkpoint_before_what_waits_for_it() -> None:
    """Direct consume: a batch's outputs are sent when it ends, without waiting for the broker; its
    rows stay held (read through by the next batch) until the checkpoint writes each row once
    after every output is acknowledged, the watermarks after the rows are, and only then runs what
    waits for it (the commit)."""

    async def run() -> None:
        log = Log()
        table, marks = FakeTable(log), FakeTable(log)
        box = Outbox(interval_s=3600.0)
        box.watch(table)
        box.watch(marks)
        changes = FakeTopic("changes", log)
        done: list[int] = []
        ev = Event()

        async def batch(n: int, value: bytes) -> None:
            token = in_partition(ev)
            box.write(table, "u1", value)
            box.write(marks, "m", n, last=True)
            _current_event.reset(token)
            box.send_early(changes, b"u1", value)
            box.after(lambda: done.append(n))
            await asyncio.wait_for(box.send_outputs(), 1.0)  # not held up by the broker
            assert log.entries[-1] == ("send changes", b"u1")
            assert not box.due()

        await batch(1, b"one")
        assert box.get(table, "u1") == (True, b"one") and "u1" not in table
        await batch(2, b"two")
        assert box.get(table, "u1") == (True, b"two"), "the newer batch's row is not the one held"
        assert done == [] and "u1" not in table and "m" not in marks
        checkpoint = asyncio.ensure_future(box.release())
        await settle()
        assert "u1" not in table, "a row written before the outputs it records were acknowledged"
        log.ack_all()  # the two change events
        await settle()
        assert table.get("u1") == b"two" and "m" not in marks, "a watermark before its rows"
        log.ack_all()
        await settle()
        assert marks.get("m") == 2 and done == [], "the commit ran before the watermarks were acknowledged"
        log.ack_all()
        await asyncio.wait_for(checkpoint, 1.0)
        assert done == [1, 2]
        assert [e for e in log.entries if e[0] == "write"] == [("write", ("u1", ev)), ("write", ("m", ev))]
        assert [e[0] for e in log.entries].count("send changes") == 2

    asyncio.run(run())


def test_a_checkpoint_is_due_after_the_interval_or_at_the_row_bound() -> None:
    box = Outbox(interval_s=3600.0, max_rows=2)
    ev = Event()
    token = in_partition(ev)
    table = FakeTable(Log())
    assert not box.due()
    box.write(table, "u1", b"x")
    assert not box.due()
    box.write(table, "u2", b"x")
    _current_event.reset(token)
    assert box.due(), "two rows held at a bound of two"
    assert Outbox().due(), "no interval: a checkpoint after every batch"


def test_a_failed_output_stops_the_checkpoint_before_any_row_and_commits_nothing() -> None:
    async def run() -> None:
        log, table, box, _ = one_row("changes")
        done: list[int] = []
        box.after(lambda: done.append(1))
        checkpoint = asyncio.ensure_future(box.release())
        await settle()
        for fut in log.futures:
            fut.set_exception(RuntimeError("broker gone"))
        with pytest.raises(RuntimeError, match="broker gone"):
            await checkpoint
        assert done == [] and "u1" not in table, "rows written or offsets committed after a lost output"

    asyncio.run(run())


def test_held_keys_come_in_key_order_per_partition_and_leave_with_the_checkpoint() -> None:
    log = Log()
    table = FakeTable(log)
    box = Outbox(interval_s=3600.0)
    box.watch(table)
    p0, p1 = Event(0), Event(1)
    for key, ev in (("u5", p0), ("u1", p0), ("u9", p1), ("u3", p0), ("u1", p0)):
        token = in_partition(ev)
        box.write(table, key, DELETE if key == "u3" else key.encode())
        _current_event.reset(token)
    assert box.held_keys(table, 0) == [("u1", b"u1"), ("u3", DELETE), ("u5", b"u5")]
    assert box.held_keys(table, 0, after="u1") == [("u3", DELETE), ("u5", b"u5")]
    assert box.held_keys(table, 1) == [("u9", b"u9")] and box.held_keys(table, 2) == []

    async def checkpoint() -> None:
        done = asyncio.ensure_future(box.release())
        await settle()
        log.ack_all()
        await asyncio.wait_for(done, 1.0)

    asyncio.run(checkpoint())
    assert box.held_keys(table, 0) == [] and table == {"u1": b"u1", "u5": b"u5", "u9": b"u9"}


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


def test_a_checkpoint_that_writes_rows_reports_how_long_it_held_the_loop_and_how_many_rows() -> None:
    async def run() -> None:
        seen: list[tuple[float, int]] = []
        log = Log()
        table = FakeTable(log)
        box = Outbox(observe=lambda s, n: seen.append((s, n)))
        box.watch(table)
        ev = Event()
        token = in_partition(ev)
        for key in ("u1", "u2", "u1"):  # u1 twice: one row
            box.write(table, key, b"x")
        _current_event.reset(token)
        started = time.perf_counter()
        task = asyncio.ensure_future(box.release())
        await settle()
        assert seen == [], "reported before the rows were acknowledged"
        log.ack_all()
        await asyncio.wait_for(task, 1.0)
        took = time.perf_counter() - started
        assert len(seen) == 1 and seen[0][1] == 2
        assert 0 < seen[0][0] <= took
        await asyncio.wait_for(box.release(), 1.0)  # nothing held: not a checkpoint worth a sample
        assert len(seen) == 1

    asyncio.run(run())
