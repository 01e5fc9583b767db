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
