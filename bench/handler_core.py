"""Throughput of the hot path without Kafka or Faust: decode, validate, fold, encode, per batch.

Run: ``.venv/bin/python -m bench.handler_core``. An upper bound for the worker; the Faust/Kafka
overhead comes on top (measured by the benchmarks issue).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from streams.ingest import IngestHandler, Record
from streams.settings import Settings
from tests.reference import DAY, HOUR, random_events


class _Dict:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.marks: dict[tuple[str, int], int] = {}

    @contextmanager
    def partition(self, record: Record) -> Iterator[None]:
        yield

    def get(self, user_id: str) -> bytes | None:
        return self.data.get(user_id)

    def set(self, user_id: str, value: bytes) -> None:
        self.data[user_id] = value

    def get_mark(self, topic: str, partition: int) -> int | None:
        return self.marks.get((topic, partition))

    def set_mark(self, topic: str, partition: int, ts_ms: int) -> None:
        self.marks[(topic, partition)] = ts_ms


def main(users: int = 2000, per_user: int = 50, batch: int = 2000) -> None:
    now = int(time.time() * 1000)
    events = random_events(
        1, users=users, per_user=per_user, start_ms=now - 20 * DAY, span_ms=20 * DAY - HOUR
    )
    records = [
        Record(
            "events.clickstream",
            zlib.crc32(e["user_id"].encode()) % 4,
            i,
            e["user_id"].encode(),
            json.dumps(e).encode(),
        )
        for i, e in enumerate(events)
    ]
    dead: list[object] = []
    handler = IngestHandler(Settings(), _Dict(), dead.append)
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        handler.process(records[i : i + batch])
    dt = time.perf_counter() - t0
    print(
        f"{len(records):,} events, {users:,} users, batch {batch}: {len(records) / dt:,.0f} events/s "
        f"({dt / len(records) * 1e6:.1f} us/event), {len(dead)} rejected"
    )


if __name__ == "__main__":
    main()
