"""The peer baseline: the same per-user rolling counts, written with Quix Streams as its docs recommend.

It is what a user would pick instead of us, so the bench runs it on the same preloaded topics
(``python -m streams.bench.quix_peer BOOTSTRAP TOPICS GROUP STATE_DIR EXPECT``; JSON on stdout).
One ``StreamingDataFrame`` per source topic, keyed by user, and ``update(..., stateful=True)``:
per user and event type, counts per minute, hour and day bucket in Quix's RocksDB-backed state
(with its changelog topics, as by default), pruned to the windows our features keep (1 h, 48 h,
30 days), and the window sums computed per event as ours are. No validation, no scoring, no
outputs: a lower bound on what a Quix application doing our job would cost.

Needs ``pip install 'quixstreams>=3.28,<4'`` beside propstream, and the bench skips it when absent. It
is not an extra of ours: it pins pydantic below 2.14 and pydantic-settings below 2.16, and an extra
is locked with everything else (``constraints.txt``), so it would hold the product's own
dependencies back for a benchmark.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

WINDOWS = (("m", 60_000, 60), ("h", 3_600_000, 48), ("d", 86_400_000, 30))  # bucket, ms, buckets kept


def fold(counts: dict[str, dict[str, int]], ts_ms: int) -> dict[str, int]:
    """Count one event into ``counts`` (bucket kind -> bucket -> n), prune, and return the window sums.

    >>> c = {}
    >>> fold(c, 0)["m"], fold(c, 61_000)["m"], fold(c, 3_600_000)["h"]
    (1, 2, 3)
    """
    out: dict[str, int] = {}
    for kind, size, keep in WINDOWS:
        now = ts_ms // size
        buckets = counts.setdefault(kind, {})
        key = str(now)
        buckets[key] = buckets.get(key, 0) + 1
        for old in [k for k in buckets if int(k) <= now - keep]:
            del buckets[old]
        out[kind] = sum(buckets.values())
    return out


def main(bootstrap: str, topics: list[str], group: str, state_dir: str, expect: int) -> dict[str, Any]:
    from quixstreams import Application

    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    seen = {"n": 0, "t0": 0.0, "cpu0": 0.0}

    def count(value: dict[str, Any], state: Any) -> None:
        if seen["n"] == 0:
            seen["t0"], seen["cpu0"] = time.perf_counter(), time.process_time()
        key = str(value.get("type"))
        counts = state.get(key, None) or {}
        fold(counts, int(value["ts"]))
        state.set(key, counts)
        seen["n"] += 1
        if seen["n"] >= expect:
            app.stop()

    for name in topics:
        topic = app.topic(name, value_deserializer="json", key_deserializer="str")
        app.dataframe(topic).update(count, stateful=True)
    app.run()
    seconds = time.perf_counter() - seen["t0"]
    cpu = time.process_time() - seen["cpu0"]
    return {"events": seen["n"], "events_per_s": seen["n"] / seconds, "events_per_cpu_s": seen["n"] / cpu}


if __name__ == "__main__":
    bootstrap, topics, group, state_dir, expect = sys.argv[1:6]
    print(json.dumps(main(bootstrap, topics.split(","), group, state_dir, int(expect))))
