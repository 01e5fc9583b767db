"""No record is lost or reordered around a rebalance: the batch filter and Faust's patched consumer.

Faust's ``take_events`` buffer keeps records across a rebalance. ``current_records`` keeps only
those of the current consumer generation and marks the others so that Faust's own acknowledgement
(``Message.ack``, the real class here) never hands their offsets to the consumer's commit. The
tests after ``Client`` run Faust's own consumer methods, patched by ``streams.faust_fixes``, over a
fake broker client: each source partition's records reach the stream in offset order from the
sought offset, whatever a seek interrupts.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from faust.types import TP
from faust.types.tuples import ConsumerMessage, Message

from streams.app import current_records


class Consumer:
    """Stands in for Faust's consumer: records the offsets a final ack hands it."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, message: Message) -> bool:
        self.acked.append(message.offset)
        return True


def message(offset: int, generation: int) -> Message:
    m = ConsumerMessage(
        "src", 0, offset, 0.0, 0, [], b"u1", b"{}", None, tp=TP("src", 0), generation_id=generation
    )
    m.incref()  # one stream holds it, as when the stream pulled it from the channel
    return m


def test_records_of_an_older_generation_are_dropped_and_never_acknowledged() -> None:
    batch: list[Any] = [SimpleNamespace(message=message(o, g)) for o, g in ((5, 2), (6, 2), (3, 3), (4, 3))]
    records, stale = current_records(batch, generation=3)
    assert stale == 2
    assert [(r.offset, r.ctx) for r in records] == [(3, batch[2]), (4, batch[3])]  # in batch order
    consumer = Consumer()
    for ev in batch:  # what take_events does once the batch body is done
        ev.message.ack(consumer)
    assert consumer.acked == [3, 4], "a dropped record's offset reached the commit"


def test_the_trainer_filter_keeps_the_events_themselves_and_drops_the_older_generation() -> None:
    """``current_events`` (what the trainer agent uses) hands back the batch's own event objects."""
    from streams.faust_fixes import current_events

    batch: list[Any] = [SimpleNamespace(message=message(o, g)) for o, g in ((8, 4), (9, 5), (10, 5))]
    events, stale = current_events(batch, generation=5)
    assert stale == 1 and events == batch[1:]
    consumer = Consumer()
    for ev in batch:
        ev.message.ack(consumer)
    assert consumer.acked == [9, 10], "a dropped training message's offset reached the commit"


def test_a_batch_of_one_generation_is_kept_whole() -> None:
    batch: list[Any] = [SimpleNamespace(message=message(o, 7)) for o in range(4)]
    records, stale = current_records(batch, generation=7)
    assert stale == 0 and [r.offset for r in records] == [0, 1, 2, 3]


def test_a_message_skipped_during_a_rebalance_is_not_committed_but_a_processed_one_is() -> None:
    """Faust's stream acks the message it skips while a rebalance suspends the flow; the patched
    consumer (``streams.faust_fixes``, Faust's own ``Consumer.ack`` underneath) must not count it."""
    from collections import defaultdict

    from faust.transport.consumer import Consumer as FaustConsumer

    from streams.faust_fixes import install

    install()
    counted: list[int] = []
    stale = SimpleNamespace(n=0, inc=lambda k=1: setattr(stale, "n", stale.n + k))
    app = SimpleNamespace(
        topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
        propstream_metrics=SimpleNamespace(stale_records=stale),
    )
    acked_for: defaultdict[TP, list[int]] = defaultdict(list)
    consumer = SimpleNamespace(
        app=app,
        _committed_offset=defaultdict(lambda: None),
        _acked_index=defaultdict(set),
        _acked=acked_for,
        _unacked_messages=set(),
        _n_acked=0,
        _waiting_for_ack=None,
    )
    skipped, processed = message(17, 3), message(18, 3)
    processed.tracked = True  # what the stream does before it yields a message
    for m in (skipped, processed):
        counted.append(int(FaustConsumer.ack(consumer, m)))  # type: ignore[arg-type]
    assert acked_for[TP("src", 0)] == [18], "the skipped offset would be committed"
    assert counted == [0, 1] and stale.n == 1
    assert skipped.acked, "marked done, so no wait for it hangs a later rebalance"


class Client:
    """Faust's real consumer methods (patched by ``streams.faust_fixes``) over a fake broker client.

    ``fetches`` are what the client returns, one list of records per fetch and partition; the
    drain below does what Faust's ``_drain_messages`` does with each record handed out: its
    read-offset rule, the stream's delivery (``on_record``, which may await a rebalance's seek),
    then the record's offset as read.
    """

    def __init__(self, committed: dict[TP, int | None], fetches: list[dict[TP, list[int]]]) -> None:
        import asyncio
        from collections import defaultdict

        from faust.transport.consumer import Consumer as FaustConsumer
        from faust.transport.utils import DefaultSchedulingStrategy

        from streams.faust_fixes import install

        install()
        self.Faust = FaustConsumer
        self.committed = committed
        self.fetches = fetches
        self.sought: list[tuple[TP, int]] = []
        self.delivered: dict[TP, list[int]] = defaultdict(list)
        self.stale = SimpleNamespace(n=0)
        stale = self.stale

        async def seek_to_committed() -> dict[TP, int | None]:
            return dict(committed)

        async def earliest_offsets(*tps: TP) -> dict[TP, int]:
            return dict.fromkeys(tps, 0)  # every log starts at 0 here

        async def _seek(tp: TP, offset: int) -> None:
            self.sought.append((tp, offset))

        async def getmany(active_partitions: Any, timeout: float) -> dict[TP, list[Any]]:
            batch = self.fetches.pop(0) if self.fetches else {}
            return {tp: [SimpleNamespace(offset=o, tp=tp) for o in offsets] for tp, offsets in batch.items()}

        c: Any = SimpleNamespace(
            flow_active=True,
            should_stop=False,
            not_waiting_next_records=asyncio.Event(),
            app=SimpleNamespace(
                client_only=False,
                consumer_generation_id=1,
                propstream_metrics=SimpleNamespace(
                    stale_records=SimpleNamespace(inc=lambda k=1: setattr(stale, "n", stale.n + k))
                ),
                monitor=SimpleNamespace(track_tp_end_offset=lambda tp, offset: None),
                topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
            ),
            scheduler=DefaultSchedulingStrategy(),
            _get_active_partitions=lambda: set(committed),
            _buffered_partitions=set(),
            _is_changelog_tp=lambda tp: False,
            highwater=lambda tp: 1000,
            _to_message=lambda tp, record: record,
            seek_to_committed=seek_to_committed,
            earliest_offsets=earliest_offsets,
            _seek=_seek,
            _getmany=getmany,
            _read_offset=defaultdict(lambda: None),
            _committed_offset=defaultdict(lambda: None),
            log=SimpleNamespace(dev=lambda *args: None),
        )
        c._wait_next_records = lambda timeout: FaustConsumer._wait_next_records(c, timeout)
        self.consumer = c

    async def seek(self) -> None:
        """A rebalance's seek of every partition to its committed offset."""
        await self.Faust.perform_seek(self.consumer)

    async def drain(self, on_record: Any = None) -> None:
        c = self.consumer
        while self.fetches:
            async for tp, message in self.Faust.getmany(c, 1.0):
                r_offset = c._read_offset[tp]
                if r_offset is None or message.offset >= r_offset:  # else: DROPPED MESSAGE ROFF
                    self.delivered[tp].append(message.offset)
                    if on_record is not None:
                        await on_record(tp, message.offset)
                    c._read_offset[tp] = message.offset


def test_a_fetch_that_a_seek_overtook_is_left_out_and_its_partition_sought_again() -> None:
    import asyncio

    early, fine = TP("src", 0), TP("src", 1)
    client = Client(
        {early: 5, fine: 9},
        [
            {early: [6, 7], fine: [9, 10]},  # in flight while the seek ran: 6 and 7 are ahead of 5
            {early: [5, 6, 7]},  # from the offset sought again
        ],
    )
    asyncio.run(client.seek())
    asyncio.run(client.drain())
    assert client.delivered == {early: [5, 6, 7], fine: [9, 10]}, "a record was skipped or reordered"
    assert client.sought == [(early, 5)] and client.stale.n == 2


def test_a_fetch_handed_out_across_a_seek_stops_there_and_the_sought_offset_stands() -> None:
    """The rebalance's seek (to 5) lands while the third record of a fetch is handed to the stream:
    every record from the sought offset on must reach the stream again, in order, none dropped."""
    import asyncio

    tp = TP("src", 0)
    client = Client({tp: 5}, [{tp: [5, 6, 7, 8, 9]}, {tp: [5, 6, 7, 8, 9, 10, 11]}])

    async def on_record(tp_: TP, offset: int) -> None:
        if offset == 7 and len(client.fetches) == 1:
            await client.seek()

    asyncio.run(client.drain(on_record))
    assert client.delivered[tp] == [5, 6, 7, *range(5, 12)], client.delivered[tp]


def test_a_real_gap_at_the_expected_offset_is_read_past_after_one_seek() -> None:
    """Nothing is readable at the committed offset (a transaction marker): the fetch from there
    starts beyond it, so the guard goes on instead of seeking forever."""
    import asyncio

    tp = TP("src", 0)
    client = Client({tp: 5}, [{tp: [6, 7]}, {tp: [6, 7, 8]}])
    asyncio.run(client.seek())
    asyncio.run(client.drain())
    assert client.delivered[tp] == [6, 7, 8]
    assert client.sought == [(tp, 5)]


def test_a_record_skipped_by_the_stream_is_read_again() -> None:
    """The stream skips 6 (the flow is suspended) after it was handed out; the next record handed
    out, 7, sends the partition back to 6."""
    import asyncio

    tp = TP("src", 0)
    client = Client({tp: 5}, [{tp: [5, 6, 7]}, {tp: [6, 7]}])
    skipped = message(6, 1)

    async def on_record(tp_: TP, offset: int) -> None:
        if offset == 6 and len(client.fetches) == 1:
            client.Faust.ack(client.consumer, skipped)  # untracked: what _py_aiter acks on a skip

    asyncio.run(client.seek())
    asyncio.run(client.drain(on_record))
    assert client.delivered[tp] == [5, 6, 6, 7]
    assert client.sought == [(tp, 6)]


def test_a_skipped_record_that_was_its_partitions_last_is_read_again_without_a_later_one() -> None:
    """The stream skips 6, the newest record of a quiet partition (an erasure request during a
    recovery): no later record arrives to send the partition back, so the next fetch must."""
    import asyncio

    tp = TP("src", 0)
    client = Client({tp: 5}, [{tp: [5, 6]}, {tp: [6]}])
    skipped = message(6, 1)

    async def on_record(tp_: TP, offset: int) -> None:
        if offset == 6 and len(client.fetches) == 1:
            client.Faust.ack(client.consumer, skipped)

    asyncio.run(client.seek())
    asyncio.run(client.drain(on_record))
    assert client.sought == [(tp, 6)], "the partition was not sought back to the skipped record"
    assert client.delivered[tp] == [5, 6, 6]


def test_a_partition_nothing_was_committed_on_is_read_from_its_start_after_the_seek() -> None:
    """Recovery's fetch can drop a buffered record of a paused partition with its position moved
    on; the seek puts committed partitions back, and one never committed on goes to its log start
    (the reset policy) instead of staying past the dropped record: the erasure request in CI."""
    import asyncio

    fresh, done = TP("src", 0), TP("src", 1)
    client = Client({fresh: None, done: 4}, [{fresh: [0], done: [4]}])
    asyncio.run(client.seek())
    asyncio.run(client.drain())
    assert client.sought == [(fresh, 0)], "the uncommitted partition was not sought to its start"
    assert client.delivered == {fresh: [0], done: [4]}
