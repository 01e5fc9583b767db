"""Exactly-once checkpoints: one Kafka transaction per checkpoint, on a producer of the worker's own.

With ``PROPSTREAM_PROCESSING_GUARANTEE=exactly_once`` a checkpoint (``streams/outbox.py``) sends the
outputs of every batch since the last one, the changelog messages of their rows and watermarks, the
training examples and the source offsets those batches read, and commits them as one transaction:
a ``read_committed`` consumer sees all of it or none. The local RocksDB is written only after the
commit, so a restart on the same disk never holds a row its changelog lacks.

Faust has an exactly-once mode of its own, with a transactional producer per source partition; it
works on Faust's per-message stream, which direct consume skips, so this is a separate producer.
Its transactional id belongs to the worker (``Settings.worker_transactional_id``): a worker that
restarts fences its predecessor's open transaction. A worker that was expelled from the group
without noticing (a pause longer than the session timeout) is not fenced: aiokafka commits offsets
in a transaction with the group id only (no generation, KIP-447), so it could commit one
checkpoint more for a partition that moved; docs/guarantees.md.
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


class Transactions:
    """Commits checkpoints as transactions; started on first use, stopped with the worker."""

    def __init__(self, bootstrap: str, transactional_id: str, group_id: str) -> None:
        self.bootstrap = bootstrap
        self.transactional_id = transactional_id
        self.group_id = group_id
        self.producer: AIOKafkaProducer | None = None

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
            await producer.start()  # registers the id with the coordinator: fences its predecessor
            self.producer = producer
        return self.producer

    async def stop(self) -> None:
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await producer.stop()

    async def commit(
        self, messages: Sequence[Message], offsets: dict[Any, int]
    ) -> dict[tuple[str, int], int]:
        """Send ``messages`` and commit them with ``offsets`` (topic partition -> next offset to read)
        for the worker's group, in one transaction; returns the offset of the last message
        written to each topic partition. Raises if the transaction could not be committed (it is
        aborted where it still can be: none of it becomes visible)."""
        producer = await self.start()
        await producer.begin_transaction()
        try:
            futures = [
                await producer.send(t, value=v, key=k, partition=p, headers=list(h or ()))
                for t, p, k, v, h in messages
            ]
            if offsets:
                await producer.send_offsets_to_transaction(
                    {TopicPartition(tp.topic, tp.partition): offset for tp, offset in offsets.items()},
                    self.group_id,
                )
            results = await asyncio.gather(*futures) if futures else []
            await producer.commit_transaction()
        except BaseException:
            if producer._txn_manager is not None and producer._txn_manager.is_in_transaction():
                with contextlib.suppress(Exception):  # fenced or unreachable: the broker aborts it in time
                    await producer.abort_transaction()
            raise
        last: dict[tuple[str, int], int] = {}
        for meta in results:
            key = (meta.topic, meta.partition)
            last[key] = max(last.get(key, -1), meta.offset)
        return last
