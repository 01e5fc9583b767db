"""The worker's own checkpoint producer and transactional changelogs, on a real broker.

- Faust's recovery waits for a record at a changelog partition's last offset, which under
  transactions is a commit marker (or an aborted transaction) that no consumer receives; the worker
  corrects the highwater with ``streams.faust_fixes.last_records``. The expected offsets come from
  the producer's own acknowledgements, not from that function.
- A checkpoint's rows go as record batches; the last offset per partition it returns is what the
  stores record as persisted, checked against the records read back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from faust.types import TP
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from streams.faust_fixes import last_records

pytestmark = pytest.mark.integration


async def write(bootstrap: str, topic: str, txns: list[tuple[int, int, bool]]) -> dict[int, int]:
    """Transactions of (partition, records, commit?) in order; the last committed offset per partition."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"t-{uuid.uuid4().hex[:6]}")
    await p.start()
    last: dict[int, int] = {}
    try:
        for partition, n, commit in txns:
            await p.begin_transaction()
            metas = [await (await p.send(topic, b"v", key=b"k", partition=partition)) for _ in range(n)]
            if commit:
                await p.commit_transaction()
                last[partition] = metas[-1].offset
            else:
                await p.abort_transaction()
    finally:
        await p.stop()
    return last


def test_last_committed_record_behind_markers_and_aborted_transactions(kafka: str) -> None:
    topic = f"txn-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    admin.close()
    committed = asyncio.run(
        write(
            kafka,
            topic,
            [
                (0, 3, True),  # ends in a commit marker
                (1, 5, True),
                (1, 2, False),  # a short aborted transaction after the last commit
                (2, 4, True),
                (2, 300, False),  # an aborted tail longer than the first window read
                (3, 2, False),  # nothing ever committed
            ],
        )
    )
    c = KafkaConsumer(bootstrap_servers=kafka)
    raw = c.end_offsets([TopicPartition(topic, p) for p in range(4)])
    c.close()
    ends = {TP(topic, tp.partition): off for tp, off in raw.items()}
    assert all(ends[TP(topic, p)] > committed.get(p, -1) + 1 for p in range(4)), "every log ends in a marker"

    found = asyncio.run(last_records(kafka, ends))
    assert found == {TP(topic, p): committed.get(p, -1) for p in range(4)}


@pytest.mark.parametrize("transactional", [False, True])
def test_the_checkpoint_producer_writes_every_message_in_order_and_returns_each_partitions_last_offset(
    kafka: str, transactional: bool
) -> None:
    """Rows go as record batches (several per partition when they do not fit in one), keyed
    messages one by one; the offsets it returns are what the stores record as persisted, so they
    are checked against the broker's own end offsets and the records read back."""
    from streams.checkpoint_producer import CheckpointProducer

    topic = f"ckpt-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    big = b"x" * 300_000  # four of these overflow a 1 MB record batch
    messages: list[Any] = [(topic, 0, f"r{i}".encode(), big, None) for i in range(7)]
    messages += [(topic, 1, f"s{i}".encode(), f"v{i}".encode(), None) for i in range(50)]
    messages += [(topic, 1, b"gone", None, None)]  # a tombstone
    messages += [(topic, None, b"keyed", b"k", [("h", b"1")])]  # the key's partition

    async def run() -> Any:
        producer = CheckpointProducer(
            kafka, "ckpt-group", f"ckpt-{uuid.uuid4().hex[:6]}" if transactional else None
        )
        try:
            if transactional:
                return await producer.commit(messages, {})
            return await producer.send(messages)
        finally:
            await producer.stop()

    written = asyncio.run(run())
    consumer = KafkaConsumer(
        bootstrap_servers=kafka, isolation_level="read_committed", enable_auto_commit=False
    )
    tps = [TopicPartition(topic, p) for p in range(3)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    got: dict[int, list[tuple[bytes, bytes | None, int]]] = {0: [], 1: [], 2: []}
    deadline = time.monotonic() + 30
    while sum(map(len, got.values())) < len(messages) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500).items():
            got[tp.partition].extend((r.key, r.value, r.offset) for r in records)
    consumer.close()
    keyed = next(p for p, recs in got.items() if any(k == b"keyed" for k, _, _ in recs))
    assert [(k, v) for k, v, _ in got[0]] == [(m[2], m[3]) for m in messages[:7]]
    assert [(k, v) for k, v, _ in got[1] if k != b"keyed"] == [(m[2], m[3]) for m in messages[7:58]]
    # the last offset of each partition written, as the broker numbered the records
    assert written == {(topic, p): recs[-1][2] for p, recs in got.items() if recs}
    assert keyed in {p for (_, p) in written}
