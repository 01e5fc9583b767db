"""Growth: memory, RocksDB bytes and per-event cost with 10k, 100k, 1M users in the store.

Each size runs in its own process (``python -m streams.bench.growth USERS EVENTS DIR``, JSON on
stdout) so its peak RSS is its own: the handler and score stage as the worker wires them, over
RocksDB (rocksdict, as Faust's store uses) without Kafka, so the figure is our cost alone. First
every user gets one event (the fill), then ``EVENTS`` events for users drawn at random are timed,
all within the hour after the fill, so no filled user's first silence point passes meanwhile and
the figure is the cost of an event. Then the clock moves past every filled user's first silence
point, and the timers that fire are timed apart (``us_per_fire``): quiet users cost fires, not
events, and mixing both made the per-event figure a count of filled users.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rocksdict import Rdict

from streams.bench.core import build, records_of
from streams.ingest import IngestHandler, Record, decode_mark, encode_mark
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


MINUTE = 60_000


CLOCK_TYPES: tuple[dict[str, object], ...] = (
    {"type": "page_view"},
    {"type": "add_to_cart", "product_id": "p-clock", "price": 1.0},
    {"type": "purchase", "product_id": "p-clock", "price": 1.0},
)  # one per source topic: a partition's clock is the slowest of its topics


def clock_records(settings: Settings, ts_ms: int, round_no: int) -> list[Record]:
    """An event of every source topic per partition at ``ts_ms``, of a user of its own
    (``clock-<k>``), to move every partition's event-time clock."""
    out: list[dict[str, object]] = []
    seen: set[int] = set()
    k = 0
    while len(seen) < settings.partitions:
        user = f"clock-{k}"
        p = zlib.crc32(user.encode()) % settings.partitions
        if p not in seen:
            seen.add(p)
            for j, kind in enumerate(CLOCK_TYPES):
                ev: dict[str, object] = {"event_id": f"c{round_no}-{k}-{j}", "user_id": user, "ts": ts_ms}
                ev.update(kind)
                if kind["type"] == "purchase":
                    ev["order_id"] = f"oc{round_no}-{k}"
                out.append(ev)
        k += 1
    return records_of(out, settings)


def measure(users: int, n_events: int, folder: Path) -> dict[str, float]:
    settings = Settings()
    folder.mkdir(parents=True, exist_ok=True)
    stores = [RocksStore(folder / name) for name in ("features", "scores", "ledger")]
    handler = build(settings, stores[0], stores[1], stores[2])
    base = int(time.time() * 1000) - 180 * MINUTE
    batch = settings.batch_size
    t0 = time.perf_counter()
    fill = records_of(events(users, 0, base, 10 * MINUTE, 1, True), settings)
    for i in range(0, len(fill), batch):
        handler.process(fill[i : i + batch])
    fill_s = time.perf_counter() - t0
    # within the hour after the fill: no filled user's first silence point (1 h) passes
    timed = records_of(events(users, n_events, base + 10 * MINUTE, 45 * MINUTE, 2, False), settings)
    t0 = time.perf_counter()
    for i in range(0, len(timed), batch):
        handler.process(timed[i : i + batch])
    dt = time.perf_counter() - t0
    fired = fire_all(handler, settings, base + 120 * MINUTE)
    for s in stores:
        s.db.flush()
        s.db.close()
    size = sum(dir_bytes(folder / name) for name in ("features", "scores", "ledger"))
    return {
        "users": users,
        "fill_events_per_s": users / fill_s,
        "events_per_s": n_events / dt,
        "us_per_event": dt / n_events * 1e6,
        "fires": fired[0],
        "us_per_fire": fired[1] / max(fired[0], 1) * 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rocksdb_bytes_per_user": size / users,
    }


def fire_all(handler: IngestHandler, settings: Settings, clock_ms: int) -> tuple[int, float]:
    """Move every partition's clock to ``clock_ms`` and process clock events until no timer due by
    then waits (each batch fires at most ``timer_fires_per_batch``); returns (fires, seconds)."""
    stage = handler.stage
    assert stage is not None
    registry = handler.metrics.registry

    def fires() -> float:
        return registry.get_sample_value("propstream_timer_users_fired_total") or 0.0

    before, t0, n = fires(), time.perf_counter(), 0
    while True:
        handler.process(clock_records(settings, clock_ms, n))
        n += 1
        now = int(time.time() * 1000)
        if not any(stage.backlog(p, handler.watermarks.of(p, now)) for p in range(settings.partitions)):
            break
    return int(fires() - before), time.perf_counter() - t0


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))))
