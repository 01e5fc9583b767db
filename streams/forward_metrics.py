"""The Prometheus metrics of ``propstream forward``, on a registry the process owns (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ForwardMetrics:
    """The forwarder's Prometheus metrics, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sent = Counter(
            "propstream_forward_sent_total",
            "Events the webhook accepted (2xx), by kind: change, trigger, audience, event.",
            ["kind"],
            registry=registry,
        )
        self.failed = Counter(
            "propstream_forward_failed_total",
            "Requests to the webhook that failed, by reason: connect, timeout, disconnected, tls, "
            "http_<status>. Each is retried, split or dead-lettered (docs/activation.md).",
            ["reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "propstream_forward_deadletter_total",
            "Events written to the forwarder's dead-letter topic, by reason (the last failure, or "
            "not_json / not_object / not_utf8 / bad_left for a record that is no event).",
            ["reason"],
            registry=registry,
        )
        self.skipped = Counter(
            "propstream_forward_skipped_total",
            "Records committed without a request: erasure tombstones on the change and trigger "
            "topics, and null values on the audience topic without a propstream.event=left header.",
            ["topic", "reason"],
            registry=registry,
        )
        self.lag = Gauge(
            "propstream_forward_lag",
            "Records not yet delivered or dead-lettered, behind the end of the topic, over the "
            "partitions this forwarder owns (refreshed every 5 s).",
            ["topic"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "propstream_forward_request_seconds",
            "Wall time of one POST to the webhook, answered or not.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
