"""A worker whose handler only counts: Faust's own per-event ceiling on this machine (BENCH_NOOP=1)."""

from __future__ import annotations

from faust.worker import Worker

from streams.app import create_app
from streams.ingest import Record
from streams.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    app = create_app(settings)
    handler = app.propstream_handler  # type: ignore[attr-defined]

    def count_only(batch: list[Record]) -> dict[str, list[object]]:
        handler.metrics.consumed.labels("all").inc(len(batch))
        return {}

    handler.process = count_only
    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
