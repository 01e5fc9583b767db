"""Throughput of the hot path without Kafka or Faust: decode, validate, fold, encode, per batch.

Run: ``.venv/bin/python -m bench.handler_core``. An upper bound for the worker; the Faust/Kafka
overhead comes on top (measured by the benchmarks issue).
"""

from __future__ import annotations

import json
import time
import zlib

from streams.ingest import IngestHandler, MemoryStore, Record
from streams.settings import Settings
from tests.reference import DAY, HOUR, random_events


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
    handler = IngestHandler(Settings(), MemoryStore(), dead.append)
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
