"""Growth: memory, RocksDB bytes and per-event cost with 10k, 100k, 1M users in the store.

Each size runs in its own process (``python -m streams.bench.growth USERS EVENTS DIR``, JSON on
stdout) so its peak RSS is its own: the handler and score stage as the worker wires them, over
RocksDB (rocksdict, as Faust's store uses) without Kafka, so the figure is our cost alone. First
every user gets one event (the fill), then ``EVENTS`` events for users drawn at random are timed.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rocksdict import Rdict

from streams.bench.core import build, records_of
from streams.ingest import Record, decode_mark, encode_mark
from streams.settings import Settings

TYPES = (("page_view", 50), ("product_view", 30), ("search", 8), ("add_to_cart", 10), ("purchase", 2))


class RocksStore:
    """:class:`streams.ingest.StateStore` and :class:`streams.score_stage.KV` over one rocksdict file."""

    def __init__(self, path: Path) -> None:
        self.db = Rdict(str(path))

    @contextmanager
    def partition(self, record: Record) -> Iterator[None]:
        yield

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.db.get(key.encode())
        return value

    def set(self, key: str, value: bytes) -> None:
        self.db[key.encode()] = value

    def delete(self, key: str) -> None:
        del self.db[key.encode()]

    def discard(self, user_id: str) -> None:
        pass  # writes through, like MemoryStore

    def scan(self, partition: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        start = after.encode() if after is not None else None
        for k, v in self.db.items(from_key=start):
            if isinstance(k, bytes) and k != start:
                yield k.decode(), v

    def scan_users(self, partition: int, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        start = after.encode() if after is not None else None
        out = []
        for key, value in self.db.items(from_key=start):
            if isinstance(key, bytes) and key != start:
                out.append((key.decode(), value))
                if len(out) >= limit:
                    break
        return out

    def get_mark(self, topic: str, partition: int) -> int | None:
        raw = self.db.get(f"|{topic}|{partition}".encode())
        return decode_mark(raw) if raw is not None else None

    def set_mark(self, topic: str, partition: int, ts_ms: int) -> None:
        self.db[f"|{topic}|{partition}".encode()] = encode_mark(ts_ms)


def events(
    users: int, n: int, start_ms: int, span_ms: int, seed: int, fill: bool
) -> Iterator[dict[str, object]]:
    """``fill``: one page view per user, in user order; else ``n`` events of random users and types."""
    rng = random.Random(seed)
    kinds = [t for t, w in TYPES for _ in range(w)]
    for i in range(users if fill else n):
        u = i if fill else rng.randrange(users)
        etype = "page_view" if fill else rng.choice(kinds)
        ev: dict[str, object] = {
            "event_id": f"g{seed}-{i}",
            "user_id": f"u{u:07d}",
            "type": etype,
            "ts": start_ms + span_ms * i // max(1, users if fill else n),
            "session_id": f"s{u}-{i // 50_000}",
        }
        if etype in ("product_view", "add_to_cart", "purchase"):
            ev["product_id"] = f"p{rng.randrange(2000):05d}"
            ev["price"] = 20.0
        if etype == "purchase":
            ev["order_id"] = f"o{i}"
        yield ev


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(users: int, n_events: int, folder: Path) -> dict[str, float]:
    settings = Settings()
    folder.mkdir(parents=True, exist_ok=True)
    stores = [RocksStore(folder / name) for name in ("features", "scores", "ledger")]
    handler = build(settings, stores[0], stores[1], stores[2])
    now = int(time.time() * 1000)
    batch = settings.batch_size
    t0 = time.perf_counter()
    fill = records_of(events(users, 0, now - 2 * 3_600_000, 3_600_000, 1, True), settings)
    for i in range(0, len(fill), batch):
        handler.process(fill[i : i + batch])
    fill_s = time.perf_counter() - t0
    timed = records_of(events(users, n_events, now - 3_600_000, 3_500_000, 2, False), settings)
    t0 = time.perf_counter()
    for i in range(0, len(timed), batch):
        handler.process(timed[i : i + batch])
    dt = time.perf_counter() - t0
    for s in stores:
        s.db.flush()
        s.db.close()
    size = sum(dir_bytes(folder / name) for name in ("features", "scores", "ledger"))
    return {
        "users": users,
        "fill_events_per_s": users / fill_s,
        "events_per_s": n_events / dt,
        "us_per_event": dt / n_events * 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rocksdb_bytes_per_user": size / users,
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))))
