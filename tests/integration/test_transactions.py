"""Where a transactional changelog's last committed record is, on a real broker.

Faust's recovery waits for a record at a changelog partition's last offset, which under
transactions is a commit marker (or an aborted transaction) that no consumer receives; the worker
corrects the highwater with ``streams.faust_fixes.last_records``. The expected offsets here come
from the producer's own acknowledgements, not from that function.
"""

from __future__ import annotations

import asyncio
import uuid

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
