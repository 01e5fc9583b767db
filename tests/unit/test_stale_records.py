"""A batch's records from before a rebalance are dropped, and Faust's consumer never counts them.

Faust's ``take_events`` buffer keeps records across a rebalance. ``current_records`` keeps only
those of the current consumer generation and marks the others so that Faust's own acknowledgement
(``Message.ack``, the real class here) never hands their offsets to the consumer's commit.
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


def test_a_fetch_that_a_seek_overtook_is_left_out_and_its_partition_sought_again() -> None:
    """Faust's own ``_wait_next_records``, ``perform_seek`` and ``seek`` run underneath, over a fake
    client: a partition whose records start past the sought offset is fetched again from there."""
    import asyncio
    from collections import defaultdict

    from faust.transport.consumer import Consumer as FaustConsumer

    from streams.faust_fixes import install

    install()
    early, fine = TP("src", 0), TP("src", 1)
    sought: list[tuple[TP, int]] = []
    stale = SimpleNamespace(n=0, inc=lambda k=1: setattr(stale, "n", stale.n + k))

    async def seek_to_committed() -> dict[TP, int]:
        return {early: 5, fine: 9}

    async def _seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))

    consumer: Any = SimpleNamespace(
        flow_active=True,
        not_waiting_next_records=asyncio.Event(),
        app=SimpleNamespace(client_only=False, propstream_metrics=SimpleNamespace(stale_records=stale)),
        _get_active_partitions=lambda: {early, fine},
        seek_to_committed=seek_to_committed,
        _seek=_seek,
        _read_offset=defaultdict(lambda: None),
        _committed_offset=defaultdict(lambda: None),
        log=SimpleNamespace(dev=lambda *args: None),
    )
    consumer.seek = lambda tp, offset: FaustConsumer.seek(consumer, tp, offset)
    rec = [SimpleNamespace(offset=o) for o in range(12)]
    fetches = [
        {early: rec[6:8], fine: rec[9:11]},  # in flight while the seek ran: 6 and 7 are ahead of 5
        {early: rec[5:8]},
    ]

    async def getmany(active_partitions: Any, timeout: float) -> dict[TP, list[Any]]:
        if len(fetches) == 2:  # a rebalance's seek runs while this fetch waits for the broker
            await FaustConsumer.perform_seek(consumer)
        return fetches.pop(0)

    consumer._getmany = getmany

    async def run() -> None:
        first, _ = await FaustConsumer._wait_next_records(consumer, 1.0)
        assert first == {fine: rec[9:11]}, "records ahead of the sought offset were delivered"
        assert sought == [(early, 5)] and stale.n == 2
        assert consumer._read_offset[early] == 5
        second, _ = await FaustConsumer._wait_next_records(consumer, 1.0)
        assert second == {early: rec[5:8]}, "a fetch no seek overtook is delivered as it is"

    asyncio.run(run())
