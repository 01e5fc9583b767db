"""streams.metrics.FaustCollector: lag, keys and recovery arithmetic on stand-ins for Faust's objects.

The real thing (a worker, a broker, a Prometheus server) is in tests/integration/test_prometheus.py;
these pin the edge cases a live run rarely shows: nothing committed yet, no fetch yet, non-source
topics, standby partitions, a large table answered by RocksDB's estimate.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import rocksdict
from faust.types import TP
from prometheus_client.parser import text_string_to_metric_families

from streams.metrics import EXACT_COUNT_BELOW, Metrics

OFFSET_KEY = b"__faust\0offset__"


class Consumer:
    def __init__(self, highwaters: dict[TP, int | None], committed: dict[TP, int]) -> None:
        self.highwaters = highwaters
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None, committed)

    def assignment(self) -> set[TP]:
        return set(self.highwaters)

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_lag_is_highwater_minus_committed_for_source_topics_only() -> None:
    a0, a1, a2, b0 = TP("a", 0), TP("a", 1), TP("a", 2), TP("b", 0)
    changelog = TP("app-features-changelog", 0)
    consumer = Consumer({a0: 120, a1: 40, a2: None, b0: 7, changelog: 999}, {a0: 100})
    app = SimpleNamespace(
        _consumer=consumer,
        topics=SimpleNamespace(acking_topics={"a", "b"}),
        tables=SimpleNamespace(values=lambda: []),
    )
    m = Metrics()
    m.watch_app(app)
    m.watch_app(app)  # idempotent: registering twice would raise
    got = {k: v for k, v in samples(m).items() if k[0] == "propstream_consumer_lag_messages"}
    lag = "propstream_consumer_lag_messages"
    assert got == {
        (lag, (("partition", "0"), ("topic", "a"))): 20.0,  # 120 - 100
        (lag, (("partition", "1"), ("topic", "a"))): 40.0,  # nothing committed: counted from 0
        (lag, (("partition", "0"), ("topic", "b"))): 7.0,
        # a/2: no fetch answered yet, no sample; the changelog is not consumer lag
    }
    assert set(consumer._committed_offset) == {a0}  # reading inserted nothing into the defaultdict


def test_unstarted_app_exposes_families_without_samples() -> None:
    m = Metrics()
    m.watch_app(SimpleNamespace(tables=SimpleNamespace(values=lambda: [])))
    text = m.exposition().decode()
    for name in (
        "propstream_consumer_lag_messages",
        "propstream_table_keys",
        "propstream_recovery_active",
        "propstream_recovery_remaining_messages",
    ):
        assert f"# TYPE {name} gauge" in text
        assert f"\n{name} " not in text and f"\n{name}{{" not in text


def test_table_keys_active_partitions_exact_then_estimated(tmp_path: Path) -> None:
    dbs: dict[int, Any] = {}
    for p, n in ((0, 3), (1, 5), (2, EXACT_COUNT_BELOW + 10)):
        db = rocksdict.Rdict(str(tmp_path / f"p{p}"))
        for i in range(n):
            db[f"user{i}".encode()] = b"state"
        db[OFFSET_KEY] = b"41"  # Faust's bookkeeping, not a key of the table
        db.flush()
        dbs[p] = db
    try:
        store = SimpleNamespace(_dbs=dbs, offset_key=OFFSET_KEY)
        table = SimpleNamespace(name="features", _data=store, changelog_topic_name="app-features-changelog")
        memory = SimpleNamespace(name="small", _data={b"k1": b"v", b"k2": b"v"})
        actives = {TP("app-features-changelog", p) for p in (0, 2)}  # partition 1 is a standby copy
        recovery = SimpleNamespace(
            in_recovery=False,
            completed=SimpleNamespace(is_set=lambda: True),
            active_remaining_total=lambda: 0,
        )
        app = SimpleNamespace(
            assignor=SimpleNamespace(assigned_actives=lambda: actives),
            tables=SimpleNamespace(values=lambda: [table, memory], _recovery=recovery),
        )
        m = Metrics()
        m.watch_app(app)
        got = samples(m)
        # Partition 0 counted exactly (3, without the offset key); partition 2 from RocksDB's
        # estimate after a flush: its keys plus the offset key.
        assert got["propstream_table_keys", (("table", "features"),)] == 3 + EXACT_COUNT_BELOW + 10 + 1
        assert got["propstream_table_keys", (("table", "small"),)] == 2
        assert got["propstream_recovery_active", ()] == 0
        assert got["propstream_recovery_remaining_messages", ()] == 0
    finally:
        for db in dbs.values():
            db.close()


def test_recovery_active_until_first_recovery_completes() -> None:
    def app(in_recovery: bool, completed: bool, remaining: int) -> Any:
        recovery = SimpleNamespace(
            in_recovery=in_recovery,
            completed=SimpleNamespace(is_set=lambda: completed),
            active_remaining_total=lambda: remaining,
        )
        return SimpleNamespace(tables=SimpleNamespace(values=lambda: [], _recovery=recovery))

    for in_recovery, completed, remaining, active in (
        (False, False, 0, 1),  # started, first recovery not finished: not ready
        (True, False, 1234, 1),
        (True, True, 50, 1),  # recovering again after a rebalance
        (False, True, 0, 0),
    ):
        m = Metrics()
        m.watch_app(app(in_recovery, completed, remaining))
        got = samples(m)
        assert got["propstream_recovery_active", ()] == active
        assert got["propstream_recovery_remaining_messages", ()] == remaining
