"""The worker's consumer fetches with ``Settings.fetch_wait_s``, not Faust's fixed 1.5 s.

A pure wiring check (no broker: the consumer is built, never started); what the wait does to
latency is the bench's to show (``docs/benchmarks.md``, "Latency: the fetch wait, ...").
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import faust

from streams.app import create_app
from streams.settings import Settings


def fetch_wait_ms(app: faust.App) -> int:
    async def build() -> int:
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
        wait: int = consumer._fetch_max_wait_ms
        await consumer.stop()  # never started: this only closes its client
        return wait

    return asyncio.run(build())


def test_the_worker_consumer_waits_as_configured_and_faust_alone_still_waits_1500_ms(tmp_path: Path) -> None:
    worker = create_app(Settings(data_dir=tmp_path / "w", fetch_wait_s="20ms"), bootstrap="127.0.0.1:9")
    assert fetch_wait_ms(worker) == 20
    # an app the worker did not configure keeps Faust's own value: the patch reads the worker's setting
    plain = faust.App("plain", broker="kafka://127.0.0.1:9", datadir=str(tmp_path / "p"))
    assert fetch_wait_ms(plain) == 1500
