"""Exactly-once checkpoints: one transaction carries everything, and the disk follows only its commit.

A fake ``Transactions`` records what each commit carries and hands out a future the test resolves,
so the test sees what the local store held before and after (``test_crash_safety.py`` kills real
workers in this mode and counts the training log and change events exactly).
"""

from __future__ import annotations

import asyncio
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
from faust.streams import _current_event
from faust.types import TP

from streams.outbox import BATCH_HEADER, DELETE, SENT_HEADER, Outbox


class FakeTransactions:
    def __init__(self) -> None:
        self.commits: list[tuple[list[Any], dict[Any, int]]] = []
        self.result: asyncio.Future[dict[tuple[str, int], int]] | None = None

    async def commit(self, messages: list[Any], offsets: dict[Any, int]) -> dict[tuple[str, int], int]:
        self.commits.append((list(messages), dict(offsets)))
        self.result = asyncio.get_running_loop().create_future()
        return await self.result


class Store(dict[Any, Any]):
    """A table's local store: writes land in the partition of the current event."""

    def __init__(self) -> None:
        super().__init__()
        self.persisted: dict[TP, int] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        ref = _current_event.get(None)  # the outbox sets it: the row's partition
        event = ref() if ref is not None else None
        assert event is not None, "a local write outside its partition's context"
        super().__setitem__(key, (event.message.partition, value))

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        self.persisted[tp] = offset


class Table:
    def __init__(self, changelog: str) -> None:
        self.data = Store()
        self.changelog_topic = SimpleNamespace(get_topic_name=lambda: changelog)


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_topic_name(self) -> str:
        return self.name

    def send_soon(self, **kwargs: Any) -> None:
        raise AssertionError("exactly-once sends nothing outside a transaction")


class Event:
    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


def hold(box: Outbox, table: Table, key: bytes, value: Any, partition: int, *, last: bool = False) -> Event:
    ev = Event(partition)
    token = _current_event.set(weakref.ref(ev))  # type: ignore[arg-type]  # faust wants an EventT
    try:
        box.write(table, key, value, last=last)
    finally:
        _current_event.reset(token)
    return ev


async def until(cond: Any) -> None:
    for _ in range(50):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_one_transaction_carries_outputs_rows_marks_examples_and_offsets_then_the_disk_follows() -> None:
    async def run() -> None:
        txn = FakeTransactions()
        box = Outbox(interval_s=3600.0, txn=txn)  # type: ignore[arg-type]  # the fake has what is used
        rows, marks = Table("app-features-changelog"), Table("app-watermarks-changelog")
        dict.__setitem__(rows.data, b"gone", (3, b"old"))  # stored before this checkpoint
        keep = [
            hold(box, rows, b"u1", b"row1", 2),
            hold(box, rows, b"gone", DELETE, 3),
            hold(box, marks, b"clickstream", b"mark", 2, last=True),
        ]
        box.send_early(Topic("deadletter"), b"u1", b"bad", [("reason", b"x")])  # headers of its own
        box.send_early(Topic("changes"), b"u1", b"change")
        box.started_ms = 1_000
        await box.send_outputs()  # a batch's end: in this mode the outputs wait for the checkpoint
        box.send_early(Topic("triggers"), b"u1", b"cart")  # the next batch's, without headers
        box.started_ms = 2_000
        await box.send_outputs()
        assert txn.commits == []
        box.send_late(Topic("training"), b"purchase", b"example")
        box.cover({TP("clickstream", 2): 41})
        box.cover({TP("clickstream", 2): 57, TP("cart", 3): 9})

        checkpoint = asyncio.ensure_future(box.release())
        await until(lambda: txn.result is not None)
        ((messages, offsets),) = txn.commits
        # each batch's outputs carry that batch's start, stamped when it ended, not the checkpoint's
        change, trigger = dict(messages[1][4] or ()), dict(messages[2][4] or ())
        assert (change[BATCH_HEADER], trigger[BATCH_HEADER]) == (b"1000", b"2000")
        assert int(change[SENT_HEADER]) <= int(trigger[SENT_HEADER])
        assert [m[:4] for m in messages[1:3]] == [
            ("changes", None, b"u1", b"change"),
            ("triggers", None, b"u1", b"cart"),
        ]
        assert messages[:1] + messages[3:] == [
            ("deadletter", None, b"u1", b"bad", [("reason", b"x")]),
            ("app-features-changelog", 2, b"u1", b"row1", None),
            ("app-features-changelog", 3, b"gone", None, None),  # a delete is a tombstone
            ("app-watermarks-changelog", 2, b"clickstream", b"mark", None),
            ("training", None, b"purchase", b"example", None),
        ]
        assert offsets == {TP("clickstream", 2): 57, TP("cart", 3): 9}
        # not committed yet: the disk has nothing of it, reads go through the held rows
        assert b"u1" not in rows.data and rows.data[b"gone"] is not None
        assert box.get(rows, b"u1") == (True, b"row1")

        assert txn.result is not None
        txn.result.set_result(
            {
                ("app-features-changelog", 2): 100,
                ("app-features-changelog", 3): 7,
                ("app-watermarks-changelog", 2): 12,
                ("training", 0): 5,
            }
        )
        await checkpoint
        assert rows.data == {b"u1": (2, b"row1")}
        assert marks.data == {b"clickstream": (2, b"mark")}
        # the store records the changelog offset it now holds, per partition, as Faust does
        assert rows.data.persisted == {
            TP("app-features-changelog", 2): 100,
            TP("app-features-changelog", 3): 7,
        }
        assert marks.data.persisted == {TP("app-watermarks-changelog", 2): 12}
        assert box.get(rows, b"u1") == (False, None)  # no longer held: read from the store

        await box.release()  # nothing held: no empty transaction
        assert len(txn.commits) == 1
        del keep

    asyncio.run(run())


@pytest.mark.parametrize("how", ["fails", "cancelled"])
def test_a_transaction_that_did_not_finish_leaves_the_disk_alone_and_stops_later_checkpoints(
    how: str,
) -> None:
    async def run() -> None:
        txn = FakeTransactions()
        box = Outbox(txn=txn)  # type: ignore[arg-type]
        rows = Table("app-features-changelog")
        ev = hold(box, rows, b"u1", b"row1", 0)
        checkpoint = asyncio.ensure_future(box.release())
        await until(lambda: txn.result is not None)
        assert txn.result is not None
        if how == "fails":
            txn.result.set_exception(RuntimeError("fenced"))
            with pytest.raises(RuntimeError, match="fenced"):
                await checkpoint
        else:
            checkpoint.cancel()
            with pytest.raises(asyncio.CancelledError):
                await checkpoint
            assert not txn.result.cancelled(), "the commit itself runs on: it is shielded"
            txn.result.set_result({("app-features-changelog", 0): 3})
        assert rows.data == {}, "the disk must never hold what Kafka may lack"
        with pytest.raises(RuntimeError, match="no later checkpoint"):
            await box.release()
        del ev

    asyncio.run(run())
