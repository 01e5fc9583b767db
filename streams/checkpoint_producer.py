"""The worker's own producer for checkpoints: changelog rows, watermarks and training examples.

A checkpoint (``streams/outbox.py``) writes the rows of every batch since the last one. Faust's
table writes would send each row through Faust's producer, one ``FutureMessage`` per row, into the
queue the next batches' change events also wait in, and write the local RocksDB before the broker
has the row. Here a checkpoint's messages go straight to an aiokafka producer of the worker's own
(about a third of the CPU per message), the outbox writes the local RocksDB only once the broker
has acknowledged them, and the change events never queue behind them.

- **At-least-once:** :meth:`CheckpointProducer.send` sends and waits for every acknowledgement; an
  idempotent producer, so a retried request does not write a row twice.
- **Exactly-once** (``PROPSTREAM_PROCESSING_GUARANTEE=exactly_once``): :meth:`CheckpointProducer.
  commit` sends the outputs, changelog messages, training examples and the source offsets of the
  batches as one transaction: a ``read_committed`` consumer sees all of it or none. Faust has an
  exactly-once mode of its own, with a transactional producer per source partition; it works on
  Faust's per-message stream, which direct consume skips. The transactional id belongs to the
  worker (``Settings.worker_transactional_id``): a worker that restarts fences its predecessor's
  open transaction. A worker that was expelled from the group without noticing (a pause longer
  than the session timeout) is not fenced: aiokafka commits offsets in a transaction with the
  group id only (no generation, KIP-447), so it could commit one checkpoint more for a partition
  that moved; docs/guarantees.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

# (topic, partition or None for the key's, key, value or None for a tombstone, headers)
Message = tuple[str, int | None, bytes | None, bytes | None, Sequence[tuple[str, bytes]] | None]
Written = dict[tuple[str, int], int]  # (topic, partition) -> offset of the last message written there


class CheckpointProducer:
    """Writes checkpoints; started on first use, stopped with the worker. ``transactional_id``
    None: at-least-once (:meth:`send`); else exactly-once (:meth:`commit`)."""

    def __init__(self, bootstrap: str, group_id: str, transactional_id: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.transactional_id = transactional_id
        self.producer: AIOKafkaProducer | None = None

    @property
    def transactional(self) -> bool:
        return self.transactional_id is not None

    async def start(self) -> AIOKafkaProducer:
        if self.producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                transactional_id=self.transactional_id,
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                max_batch_size=1024 * 1024,
                max_request_size=8 * 1024 * 1024,
            )
            await producer.start()  # transactional: registers the id, fencing its predecessor
            self.producer = producer
        return self.producer

    async def stop(self) -> None:
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await producer.stop()

    async def send(self, messages: Sequence[Message]) -> Written:
        """At-least-once: send ``messages`` and wait until the broker has every one; raises if any
        could not be written."""
        producer = await self.start()
        sent = await _send_all(producer, messages)
        return _last(sent, await asyncio.gather(*(fut for fut, _ in sent)))

    async def commit(self, messages: Sequence[Message], offsets: dict[Any, int]) -> Written:
        """Exactly-once: send ``messages`` and commit them with ``offsets`` (topic partition -> next
        offset to read) for the worker's group, in one transaction. Raises if the transaction could
        not be committed (it is aborted where it still can be: none of it becomes visible)."""
        producer = await self.start()
        await producer.begin_transaction()
        try:
            sent = await _send_all(producer, messages)
            if offsets:
                await producer.send_offsets_to_transaction(
                    {TopicPartition(tp.topic, tp.partition): offset for tp, offset in offsets.items()},
                    self.group_id,
                )
            results = await asyncio.gather(*(fut for fut, _ in sent))
            await producer.commit_transaction()
        except BaseException:
            if producer._txn_manager is not None and producer._txn_manager.is_in_transaction():
                with contextlib.suppress(Exception):  # fenced or unreachable: the broker aborts it in time
                    await producer.abort_transaction()
            raise
        return _last(sent, results)


async def _send_all(
    producer: AIOKafkaProducer, messages: Sequence[Message]
) -> list[tuple[asyncio.Future[Any], int]]:
    """Send ``messages``: (future of the metadata, records it covers) of each message with a key's
    partition, and of each record batch of an explicit partition (its metadata is its first's).

    The rows of a checkpoint (thousands, each to an explicit changelog partition) go as record
    batches built in one pass: ``send`` per message is a coroutine, a future and an accumulator
    lookup each, and a checkpoint of 1,500 rows held the event loop for tens of milliseconds."""
    sent: list[tuple[asyncio.Future[Any], int]] = []
    batches: dict[tuple[str, int], tuple[Any, int]] = {}  # (topic, partition) -> (builder, records)
    for topic, partition, key, value, headers in messages:
        if partition is None:
            sent.append((await producer.send(topic, value=value, key=key, headers=list(headers or ())), 1))
            continue
        builder, n = batches.get((topic, partition)) or (producer.create_batch(), 0)
        if builder.append(timestamp=None, key=key, value=value, headers=list(headers or ())) is None:
            sent.append((await producer.send_batch(builder, topic, partition=partition), n))
            builder, n = producer.create_batch(), 0
            if builder.append(timestamp=None, key=key, value=value, headers=list(headers or ())) is None:
                msg = f"a message of {len(value or b'')} bytes does not fit in a record batch"
                raise ValueError(msg)
        batches[(topic, partition)] = (builder, n + 1)
    for (topic, partition), (builder, n) in batches.items():
        sent.append((await producer.send_batch(builder, topic, partition=partition), n))
    return sent


def _last(sent: Sequence[tuple[Any, int]], results: Sequence[Any]) -> Written:
    """The offset of the last record written to each topic partition."""
    last: Written = {}
    for (_, records), meta in zip(sent, results, strict=True):
        key = (meta.topic, meta.partition)
        last[key] = max(last.get(key, -1), meta.offset + records - 1)
    return last
