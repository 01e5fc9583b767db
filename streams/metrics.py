"""Prometheus metrics on a registry the app owns (never the import-time global one).

The hot path never touches these objects per event: the ingest handler tallies a batch in
plain dicts and :meth:`Metrics.record_batch` adds the totals once per batch.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "propstream_events_consumed_total",
            "Kafka messages read from event topics.",
            ["topic"],
            registry=r,
        )
        self.accepted = Counter(
            "propstream_events_accepted_total",
            "Events folded into features, by source topic and canonical type.",
            ["topic", "type"],
            registry=r,
        )
        self.rejected = Counter(
            "propstream_events_rejected_total",
            "Messages sent to the dead-letter topic, by source topic and reason.",
            ["topic", "reason"],
            registry=r,
        )
        self.no_consent = Counter(
            "propstream_events_without_consent_total",
            "Valid events not used because consent.personalization is false.",
            ["topic"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "propstream_batch_processing_seconds",
            "Wall time to process one batch of events.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.lag_seconds = Histogram(
            "propstream_processing_delay_seconds",
            "Event time to processing time, per batch (newest event of the batch).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self.users_written = Counter(
            "propstream_state_writes_total",
            "Coalesced per-user state writes (one per user per batch).",
            registry=r,
        )
        self.watermark = Gauge(
            "propstream_watermark_seconds",
            "Event-time watermark per partition, epoch seconds.",
            ["partition"],
            registry=r,
        )

    def record_batch(
        self,
        consumed: dict[str, int],
        accepted: dict[tuple[str, str], int],
        rejected: dict[tuple[str, str], int],
        no_consent: dict[str, int],
        writes: int,
        seconds: float,
    ) -> None:
        for topic, n in consumed.items():
            self.consumed.labels(topic).inc(n)
        for (topic, etype), n in accepted.items():
            self.accepted.labels(topic, etype).inc(n)
        for (topic, reason), n in rejected.items():
            self.rejected.labels(topic, reason).inc(n)
        for topic, n in no_consent.items():
            self.no_consent.labels(topic).inc(n)
        self.users_written.inc(writes)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
