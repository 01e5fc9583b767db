"""Direct consume (``streams/direct.py``): source records taken out of Faust's fetches, none lost or
reordered around a seek, none taken before the generation's seek, and batches that commit exactly
what they hold.

The fetch tests run Faust's own ``_wait_next_records`` and ``perform_seek``, patched by
``streams.faust_fixes``, over the fake broker client of ``test_stale_records``.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from streams.direct import RecordSink, batch_of
from tests.unit.test_stale_records import Client

SRC = "src"


def direct(committed: dict[TP, int | None], fetches: list[dict[TP, list[int]]]) -> tuple[Client, RecordSink]:
    client = Client(committed, fetches)
    sink = RecordSink([SRC], limit=1000)
    client.consumer.app.propstream_sink = sink
    return client, sink


def fetch_all(client: Client, sink: RecordSink) -> dict[TP, list[int]]:
    """Every fetch through Faust's patched ``_wait_next_records``; the offsets the sink got, per
    partition in the order taken. What Faust itself would see of the source topics is checked empty."""

    async def run() -> dict[TP, list[int]]:
        got: dict[TP, list[int]] = {}
        while client.fetches:
            records, _ = await client.consumer._wait_next_records(1.0)
            assert not any(tp.topic == SRC for tp in records or {}), (
                "Faust's stream was handed a source record"
            )
            while sink.size:
                for _, tp, recs in await sink.take(100):
                    got.setdefault(tp, []).extend(r.offset for r in recs)
        return got

    return asyncio.run(run())


def test_a_fetch_that_a_seek_overtook_is_left_out_and_read_again_from_the_sought_offset() -> None:
    early, fine = TP(SRC, 0), TP(SRC, 1)
    client, sink = direct(
        {early: 5, fine: 9},
        [{early: [6, 7], fine: [9, 10]}, {early: [5, 6, 7]}],  # 6, 7 were in flight across the seek
    )
    asyncio.run(client.seek())
    assert fetch_all(client, sink) == {early: [5, 6, 7], fine: [9, 10]}
    assert client.sought == [(early, 5)] and client.stale.n == 2


def test_nothing_is_taken_in_a_generation_before_its_seek() -> None:
    """Between an assignment and recovery's seek the positions are the old ones: records fetched
    then are dropped (counted), and the seek reads them again."""
    tp = TP(SRC, 0)
    client, sink = direct({tp: 3}, [{tp: [7, 8]}])
    assert fetch_all(client, sink) == {}  # no seek yet in this generation
    assert client.stale.n == 2
    asyncio.run(client.seek())
    client.consumer.app.consumer_generation_id = 2  # a rebalance: the seek was for generation 1
    client.fetches.append({tp: [3, 4]})
    assert fetch_all(client, sink) == {}
    asyncio.run(client.seek())
    client.fetches.append({tp: [3, 4]})
    assert fetch_all(client, sink) == {tp: [3, 4]}


def test_records_behind_the_expected_offset_are_dropped_and_the_rest_kept() -> None:
    tp = TP(SRC, 0)
    client, sink = direct({tp: 0}, [{tp: [0, 1, 2]}, {tp: [1, 2, 3, 4]}])  # 1, 2 again: a refetch
    asyncio.run(client.seek())
    assert fetch_all(client, sink) == {tp: [0, 1, 2, 3, 4]}
    assert client.stale.n == 2 and client.sought == []


def test_a_gap_is_read_past_only_after_a_seek_to_it_finds_nothing_there() -> None:
    """A transaction marker at 7: the fetch is handed out up to it; the next fetch, beyond it,
    seeks back to 7; the fetch from there starts at 8, so the partition goes on."""
    tp = TP(SRC, 0)
    client, sink = direct({tp: 5}, [{tp: [5, 6, 8, 9]}, {tp: [10]}, {tp: [8, 9, 10]}])
    asyncio.run(client.seek())
    assert fetch_all(client, sink) == {tp: [5, 6, 8, 9, 10]}
    assert client.sought == [(tp, 7)]


def test_the_sink_hands_out_at_most_the_limit_and_holds_fetches_while_full() -> None:
    sink = RecordSink([SRC], limit=4)
    a, b = TP(SRC, 0), TP(SRC, 1)
    recs = [SimpleNamespace(offset=o) for o in range(3)]

    async def run() -> None:
        sink.put(1, a, recs)
        sink.put(1, b, recs)
        waiting = asyncio.ensure_future(sink.room())
        await asyncio.sleep(0)
        assert not waiting.done(), "a full sink let the fetcher go on"
        first = await sink.take(4)
        assert [(tp, [r.offset for r in rs]) for _, tp, rs in first] == [(a, [0, 1, 2]), (b, [0])]
        await asyncio.wait_for(waiting, 1.0)  # 2 left: room again
        assert [[r.offset for r in rs] for _, _, rs in await sink.take(10)] == [[1, 2]]
        sink.put(1, a, recs)
        sink.open_generation = 1
        assert sink.clear() == 3 and sink.size == 0 and sink.open_generation is None
        late = asyncio.ensure_future(sink.take(10))
        await asyncio.sleep(0)
        assert not late.done(), "a cleared sink handed something out"
        late.cancel()

    asyncio.run(run())


def test_a_batch_keeps_its_generation_and_commits_the_offset_after_each_partitions_last() -> None:
    sink = RecordSink([SRC], limit=100)
    a, b, c = TP(SRC, 0), TP(SRC, 1), TP("other", 0)

    def recs(*offsets: int) -> list[Any]:
        return [SimpleNamespace(offset=o, key=b"u", value=b"{}") for o in offsets]

    chunks = [(2, a, recs(4, 5)), (1, b, recs(9)), (2, b, recs(3)), (2, c, recs(6))]
    parts, offsets, stale = batch_of(sink, chunks, generation=2)
    # one list per partition, each in the order fetched, whatever the topic
    assert [[(r.topic, r.partition, r.offset) for r in part] for part in parts] == [
        [(SRC, 0, 4), (SRC, 0, 5), ("other", 0, 6)],
        [(SRC, 1, 3)],
    ]
    assert offsets == {a: 6, b: 4, c: 7} and stale == 1
    # each record's context routes table writes to its own partition (Faust reads .message.partition)
    assert {r.partition: r.ctx.message.partition for part in parts for r in part} == {0: 0, 1: 1}


def test_commits_go_out_one_at_a_time_merged_and_a_drain_waits_for_the_last() -> None:
    a, b = TP(SRC, 0), TP(SRC, 1)
    sent: list[dict[TP, int]] = []
    gate = asyncio.Event()

    async def commit(offsets: dict[TP, int]) -> None:
        sent.append(dict(offsets))
        await gate.wait()  # the broker has not answered yet

    failures: list[BaseException] = []

    async def run() -> None:
        from streams.direct import Committer

        c = Committer(commit, failures.append)
        c.add({a: 3})
        await asyncio.sleep(0)
        c.add({a: 5, b: 2})  # while the first commit is in flight: held, then merged
        c.add({a: 7})
        await asyncio.sleep(0)
        assert sent == [{a: 3}], "a second commit went out before the first was answered"
        draining = asyncio.ensure_future(c.drain())
        await asyncio.sleep(0)
        assert not draining.done()
        gate.set()
        await asyncio.wait_for(draining, 1.0)
        assert sent == [{a: 3}, {a: 7, b: 2}]

    asyncio.run(run())
    assert failures == []


def test_batches_are_committed_only_by_the_checkpoint_after_them_and_a_failed_one_never() -> None:
    from streams.direct import Committer, DirectIngest
    from streams.ingest import Record
    from streams.outbox import Outbox

    a = TP(SRC, 0)
    log: list[Any] = []

    async def commit(offsets: dict[TP, int]) -> None:
        log.append(("commit", dict(offsets)))

    async def process(records: list[Record]) -> None:
        log.append(("process", [r.offset for r in records]))
        if records[0].offset == 99:
            raise RuntimeError("the store is gone")

    def stop(exc: BaseException, records: list[Record]) -> None:
        log.append(("stop", str(exc)))
        raise SystemExit(70)  # what os._exit does to the batch: nothing after it runs

    def recs(*offsets: int) -> list[Any]:
        return [SimpleNamespace(offset=o, key=b"u", value=b"{}") for o in offsets]

    async def run(interval_s: float) -> None:
        log.clear()
        sink = RecordSink([SRC], limit=100)
        outbox = Outbox(SimpleNamespace(transactional=False), interval_s=interval_s)  # type: ignore[arg-type]  # writes no row
        committer = Committer(commit, lambda exc: log.append(("failed", exc)))
        ingest = DirectIngest(
            sink, outbox, committer, process, lambda: 3, lambda n: log.append(("stale", n)), stop, 10
        )
        await ingest.batch([(2, a, recs(1, 2)), (3, a, recs(3, 4))])
        await ingest.batch([(3, a, recs(5))])
        await committer.drain()
        if interval_s:  # not due yet: nothing committed until the checkpoint
            assert log == [("stale", 2), ("process", [3, 4]), ("process", [5])]
            await outbox.release()
            await committer.drain()
            assert log[3:] == [("commit", {a: 6})]
        else:  # a checkpoint after each batch: each batch's offsets handed to the committer at once
            assert [e for e in log if e[0] != "commit"] == [
                ("stale", 2),
                ("process", [3, 4]),
                ("process", [5]),
            ]
            assert [e for e in log if e[0] == "commit"][-1] == ("commit", {a: 6})
        log.clear()
        with contextlib.suppress(SystemExit):
            await ingest.batch([(3, a, recs(99))])
        await committer.drain()
        assert log == [("process", [99]), ("stop", "the store is gone")], "a failed batch was committed"

    asyncio.run(run(3600.0))
    asyncio.run(run(0.0))
