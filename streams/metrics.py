"""Prometheus metrics on a registry the app owns (never the import-time global one).

The hot path never touches these objects per event: the ingest handler tallies a batch in
plain dicts and :meth:`Metrics.record_batch` adds the totals once per batch. Infrastructure
state (consumer lag, table sizes, recovery) is read from the Faust app only when Prometheus
scrapes, by :class:`FaustCollector`.

Duplicates and late events are rejections like any other:
``propstream_events_rejected_total{reason="duplicate"|"late"}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from faust.types import TP
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Below this many keys per RocksDB partition the table is counted exactly (about 0.5 us a key, so
# at most ~10 ms a partition); above it RocksDB's own estimate is used (see FaustCollector).
EXACT_COUNT_BELOW = 20_000


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
        self.checkpoint_seconds = Histogram(
            "propstream_checkpoint_seconds",
            "Wall time of one checkpoint, from its start to its rows on the local disk (outputs, rows, "
            "watermarks and examples acknowledged in turn); it runs in the background, and batches "
            "wait for it only when PROPSTREAM_CHECKPOINT_ROWS rows are held.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.checkpoint_rows = Counter(
            "propstream_checkpoint_rows_total",
            "Users' rows written by checkpoints (each changed user once per checkpoint).",
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
        self.lookups = Counter(
            "propstream_lookups_total",
            "Single-user lookups by where they were answered: served=thread on the read server's "
            "thread, beside the event loop (this worker's users); served=faust passed to Faust's "
            "views on the loop (routed to the owner, or asked during a rebalance or recovery).",
            ["served"],
            registry=r,
        )
        self.stale_records = Counter(
            "propstream_stale_records_total",
            "Records fetched around a rebalance and not processed (a batch held them from before it, "
            "or Faust skipped them while its flow was suspended), left uncommitted: their "
            "partition's owner reads them again from the committed offset.",
            registry=r,
        )
        self.evicted = Counter(
            "propstream_users_evicted_total",
            "Users removed from state after user_ttl_days without events (retention).",
            registry=r,
        )
        self.decode_errors = Counter(
            "propstream_decode_errors_total",
            "Stored or consumed bytes that could not be read, by what they should have been "
            "(features, scores, ledger, watermark, trainer_state, training_message, model_snapshot, "
            "erasure_request): state starts afresh, a message is skipped; the worker goes on.",
            ["what"],
            registry=r,
        )
        self.processing_errors = Counter(
            "propstream_processing_errors_total",
            "Unexpected exceptions isolated to one unit of work, by stage: user (its events of the "
            "batch became processing_error dead letters), expire, sweep, trainer, models.",
            ["stage"],
            registry=r,
        )
        self.triggers = Counter(
            "propstream_triggers_total",
            "Behavioural trigger events published to the triggers topic, by trigger.",
            ["trigger"],
            registry=r,
        )
        self.timers_fired = Counter(
            "propstream_timer_users_fired_total",
            "Users whose due timers (silence points, cart abandonment) fired, once per user and firing.",
            registry=r,
        )
        self.audience_members = Gauge(
            "propstream_audience_members",
            "Members of each audience in the partitions this worker owns (sum over workers: the "
            "audience's size).",
            ["audience"],
            registry=r,
        )
        self.audience_moves = Counter(
            "propstream_audience_events_total",
            "Audience membership events published, by audience and event (entered, left).",
            ["audience", "event"],
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

    def record_checkpoint(self, seconds: float, rows: int) -> None:
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_rows.inc(rows)

    def watch_app(self, app: Any) -> None:
        """Expose consumer lag, table keys and recovery progress of ``app``, read at scrape time."""
        if getattr(self, "_watched", None) is not app:
            self.registry.register(FaustCollector(app))
            self._watched = app

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class FaustCollector(Collector):
    """Gauges computed from a Faust app when scraped: no timers, nothing per event.

    - ``propstream_consumer_lag_messages{topic,partition}``: for each assigned partition of a
      source topic (the topics our agents acknowledge; changelogs and Faust's leader topic are not
      consumer lag), the partition's highwater (offset of the next message to be written, as last
      reported by a fetch) minus the group's committed offset (the next message to process). Before
      the group's first commit on a partition Faust records no offset, so the lag counts from
      offset 0, which is exact for our ``earliest`` reset unless retention already deleted data.
    - ``propstream_table_keys{table}``: keys of each table in the partitions this worker owns as
      active (standby copies are not counted, so the sum over workers is the table size). Small
      partitions are counted exactly; above :data:`EXACT_COUNT_BELOW` keys the RocksDB property
      ``rocksdb.estimate-num-keys`` is used, which is O(1) but counts every overwrite still in the
      memtable, so it overstates by at most one memtable of writes until RocksDB flushes.
    - ``propstream_recovery_active``: 1 until the first table recovery has finished and while a
      rebalance recovers again (the same condition that makes ``/readyz`` answer 503).
    - ``propstream_recovery_remaining_messages``: changelog messages still to replay into the
      active partitions of this worker's tables.

    Faust creates its consumer, stores and recovery service lazily; this collector never creates
    them (it reads the private attributes), so scraping an app that has not started is harmless.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        lag, keys, active, remaining = self._families()
        for topic, partition, n in self._lag():
            lag.add_metric([topic, str(partition)], n)
        for table, n in self._table_keys():
            keys.add_metric([table], n)
        recovery = self._recovery()
        if recovery is not None:
            active.add_metric([], recovery[0])
            remaining.add_metric([], recovery[1])
        return [lag, keys, active, remaining]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "propstream_consumer_lag_messages",
                "Messages of a source partition not yet committed by this worker's group "
                "(highwater - committed offset).",
                labels=["topic", "partition"],
            ),
            GaugeMetricFamily(
                "propstream_table_keys",
                "Keys in the table partitions this worker owns (exact when small, else RocksDB's estimate).",
                labels=["table"],
            ),
            GaugeMetricFamily(
                "propstream_recovery_active",
                "1 while tables are being recovered from their changelogs (not ready), else 0.",
            ),
            GaugeMetricFamily(
                "propstream_recovery_remaining_messages",
                "Changelog messages still to replay into this worker's active table partitions.",
            ),
        )

    def _lag(self) -> Iterator[tuple[str, int, int]]:
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return
        try:
            assigned = consumer.assignment()
        except Exception:  # ConsumerNotStarted, or a rebalance in progress: no samples this scrape
            return
        sources = self.app.topics.acking_topics
        committed = consumer._committed_offset  # a defaultdict: .get() so reading inserts nothing
        for tp in sorted(assigned):
            if tp.topic not in sources:
                continue
            try:
                high = consumer.highwater(tp)
            except Exception:  # revoked between assignment() and here
                continue
            if high is None or high < 0:  # no fetch answered for this partition yet
                continue
            yield tp.topic, tp.partition, max(0, high - (committed.get(tp) or 0))

    def _table_keys(self) -> Iterator[tuple[str, int]]:
        try:
            actives = self.app.assignor.assigned_actives()
        except Exception:
            actives = set()
        for table in self.app.tables.values():
            store = getattr(table, "_data", None)
            if store is None:
                continue
            dbs = getattr(store, "_dbs", None)
            if dbs is None:  # in-memory store: a dict
                yield table.name, len(store)
                continue
            changelog = table.changelog_topic_name
            yield (
                table.name,
                sum(
                    _count_keys(db, store.offset_key)
                    for partition, db in list(dbs.items())
                    if TP(changelog, partition) in actives
                ),
            )

    def _recovery(self) -> tuple[int, int] | None:
        recovery = getattr(self.app.tables, "_recovery", None)
        if recovery is None:
            return None
        active = recovery.in_recovery or not recovery.completed.is_set()
        return int(active), int(recovery.active_remaining_total())


def _count_keys(db: Any, offset_key: bytes) -> int:
    """Keys of one rocksdict partition database, without Faust's offset bookkeeping key."""
    estimate = int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
    if estimate >= EXACT_COUNT_BELOW:
        return estimate
    return sum(1 for key in db.keys() if key != offset_key)  # noqa: SIM118 (Rdict iterates by index)
