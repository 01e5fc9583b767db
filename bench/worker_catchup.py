"""Catch-up throughput of one real worker process: preload simulated events, start the worker, time it.

Run: ``.venv/bin/python -m bench.worker_catchup [EVENTS]`` (starts a throwaway broker on free ports).
Reports events/s from the worker's first to last accepted event, via its /metrics.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from streams.broker import LocalBroker, free_port
from streams.producer import publish
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.harness import WorkerProc, wait_until
from traffic.simulator import SimConfig, simulate


def main(n_events: int = 200_000) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ps-bench-"))
    broker = LocalBroker(Settings(), port=free_port(), data_dir=tmp / "kafka")
    bootstrap = broker.start().bootstrap
    try:
        uid = uuid.uuid4().hex[:6]
        env = {
            "PROPSTREAM_BOOTSTRAP": bootstrap,
            "PROPSTREAM_APP_ID": f"bench-{uid}",
            "PROPSTREAM_LOG_LEVEL": "warning",
        }
        os.environ.update(env)
        settings = Settings()
        ensure_topics(settings, bootstrap)
        users = max(1000, n_events // 100)
        t0 = time.perf_counter()
        n = publish(
            simulate(SimConfig(users=users, seed=1, max_events=n_events)), settings, bootstrap=bootstrap
        )
        print(
            f"preloaded {n:,} events for {users:,} users in {time.perf_counter() - t0:.1f}s", file=sys.stderr
        )
        argv = (
            ("-m", "bench.noop_worker") if os.environ.get("BENCH_NOOP") else ("-m", "streams.cli", "worker")
        )
        worker = WorkerProc(env, tmp / "worker", tmp / "worker.log", argv)
        worker.start()
        t_start = time.perf_counter()

        def total() -> float:
            return worker.metric("propstream_events_consumed_total")

        wait_until(lambda: total() > 0, 120, every_s=0.05, what="first events")
        t_first, first = time.perf_counter(), total()
        wait_until(lambda: total() >= n, 900, every_s=0.2, what="all events consumed")
        dt = time.perf_counter() - t_first
        print(
            f"worker consumed {n - first:,.0f} events in {dt:.1f}s: {(n - first) / dt:,.0f} events/s "
            f"(ready->first batch {t_first - t_start:.1f}s); rejected "
            f"{worker.metric('propstream_events_rejected_total'):,.0f}"
        )
        worker.stop()
    finally:
        broker.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
