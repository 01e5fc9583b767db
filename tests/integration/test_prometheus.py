"""A real Prometheus server scrapes a real worker on loopback; we ask its HTTP query API what arrived."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer

from streams.broker import free_port
from streams.settings import Settings
from tests.conftest import ROOT
from tests.integration.harness import WorkerProc, wait_until
from tests.reference import random_events

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
CART = {"add_to_cart", "remove_from_cart", "checkout_start"}


class PrometheusServer:
    """`prometheus` on a free loopback port, scraping ``targets`` every second, with our alert rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": [
                {"job_name": "propstream", "scrape_timeout": "1s", "static_configs": [{"targets": targets}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self.ready, 60, what=f"prometheus on port {self.port} to be ready (log {self.log})")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant vector: [{"metric": {...}, "value": [ts, "1.5"]}, ...]."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of a query answering one series, None when it answers none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    if PROMETHEUS is None:
        pytest.skip(
            "no prometheus binary: `make test` installs Debian's prometheus package when run as root "
            "(bash deploy/system-deps.sh); as a user, apt-get install prometheus"
        )
    servers: list[PrometheusServer] = []

    def start(*workers: WorkerProc) -> PrometheusServer:
        (tmp_path / "prom").mkdir(exist_ok=True)
        server = PrometheusServer(tmp_path / "prom", [f"127.0.0.1:{w.port}" for w in workers])
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def test_prometheus_scrapes_worker_metrics(
    settings: Settings, make_worker: Any, kafka: str, prometheus_for: Any
) -> None:
    users, per_user = 30, 40
    now = int(time.time() * 1000)
    # Recent traffic: event times within the last 10 minutes, so processing delays are minutes at most.
    valid = random_events(7, users=users, per_user=per_user, start_ms=now - 600_000, span_ms=590_000)
    bad: list[tuple[bytes | None, bytes, str]] = [
        (b"user-1", b"{not json", "not_json"),
        (b"user-1", b"{not json either", "not_json"),
        (b"user-2", json.dumps({**valid[0], "event_id": "x1", "type": "teleport"}).encode(), "unknown_type"),
        (
            b"user-3",
            json.dumps({"user_id": "user-3", "type": "page_view", "ts": now}).encode(),
            "missing_field",
        ),
    ]
    dupes = valid[:5]

    worker = make_worker().start()
    prom = prometheus_for(worker)

    def topic_of(ev: dict[str, Any]) -> str:
        t = ev["type"]
        return (
            settings.topic_purchase
            if t == "purchase"
            else settings.topic_cart
            if t in CART
            else settings.topic_clickstream
        )

    # Watch the worker's own lag gauge while the traffic goes in: Faust commits every few seconds,
    # so consumed-but-uncommitted messages must show as lag for a moment.
    seen_lag: list[float] = []
    stop = threading.Event()

    def watch_lag() -> None:
        while not stop.is_set():
            seen_lag.append(worker.metric("propstream_consumer_lag_messages"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_lag, daemon=True)
    watcher.start()
    p = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5)
    for ev in valid:
        p.send(topic_of(ev), key=ev["user_id"].encode(), value=json.dumps(ev).encode())
    for key, value, _ in bad:
        p.send(settings.topic_clickstream, key=key, value=value)
    p.flush()  # duplicates only after their originals are in, so they really are re-sends
    for ev in dupes:
        p.send(topic_of(ev), key=ev["user_id"].encode(), value=json.dumps(ev).encode())
    p.flush()
    p.close()
    total = len(valid) + len(bad) + len(dupes)
    by_topic = Counter(topic_of(ev) for ev in valid + dupes) + Counter({settings.topic_clickstream: len(bad)})

    # Everything consumed and committed, as Prometheus sees it through its scrapes.
    wait_until(
        lambda: prom.value("sum(propstream_events_consumed_total)") == total,
        90,
        what=f"Prometheus to see {total} consumed events",
    )
    wait_until(
        lambda: prom.value("max(propstream_consumer_lag_messages)") == 0,
        60,
        what="consumer lag to reach 0 on every partition",
    )
    stop.set()
    watcher.join()
    assert 0 < max(seen_lag) <= total, max(seen_lag)
    assert seen_lag[-1] == 0

    assert prom.value('up{job="propstream"}') == 1.0

    consumed = {
        r["metric"]["topic"]: float(r["value"][1]) for r in prom.query("propstream_events_consumed_total")
    }
    assert consumed == {t: float(n) for t, n in by_topic.items()}
    assert prom.value("sum(propstream_events_accepted_total)") == len(valid)
    accepted = {
        r["metric"]["type"]: float(r["value"][1])
        for r in prom.query("sum by (type) (propstream_events_accepted_total)")
    }
    assert accepted == {t: float(n) for t, n in Counter(ev["type"] for ev in valid).items()}
    rejected = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prom.query("sum by (reason) (propstream_events_rejected_total)")
    }
    assert rejected == {"not_json": 2.0, "unknown_type": 1.0, "missing_field": 1.0, "duplicate": 5.0}

    # Processing delay: observed once per batch; the median lies within the traffic's time span.
    assert (prom.value("sum(propstream_processing_delay_seconds_count)") or 0) > 0
    p50 = prom.value("histogram_quantile(0.5, sum by (le) (propstream_processing_delay_seconds_bucket))")
    assert p50 is not None and 0 < p50 <= 900, p50
    assert (prom.value("sum(propstream_batch_processing_seconds_count)") or 0) > 0
    # every user's row written by at least one checkpoint, and at most once per accepted event
    assert (prom.value("sum(propstream_checkpoint_seconds_count)") or 0) > 0
    rows = prom.value("sum(propstream_checkpoint_rows_total)")
    assert rows is not None and users <= rows <= len(valid), rows

    # Consumer lag: one series per partition of each source topic, all assigned to this one worker
    # (other topics our agents consume, such as the training log, have their series too).
    lag = prom.query("propstream_consumer_lag_messages")
    partitions = {(r["metric"]["topic"], r["metric"]["partition"]) for r in lag}
    assert partitions >= {(t, str(i)) for t in settings.source_topics for i in range(settings.partitions)}
    assert len(lag) == len(partitions)  # one series per partition: no instance or other labels split them

    # Keys per table, counted exactly while small: one feature state per user, one watermark per
    # source topic and partition.
    assert prom.value('propstream_table_keys{table="features"}') == users
    assert (
        prom.value('propstream_table_keys{table="watermarks"}')
        == len(settings.source_topics) * settings.partitions
    )
    assert prom.value("propstream_recovery_active") == 0
    assert prom.value("propstream_recovery_remaining_messages") == 0

    # The alert rules load in a real server and evaluate without errors.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    declared = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in declared["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == names and all(r["health"] == "ok" for r in rules), [
        (r["name"], r.get("lastError")) for r in rules
    ]

    # Model metrics. Every user with accepted events is scored for each target at least once and at
    # most once per accepted event (one score per user per batch). The traffic spans ten minutes, far
    # less than any horizon, so no label matures: each target's live model is the untrained version 0,
    # warming up, and nothing is announced.
    for target in ("purchase", "churn"):
        n = prom.value(f'propstream_scores_total{{target="{target}"}}')
        assert n is not None and users <= n <= len(valid), (target, n)
        assert prom.value(f'propstream_score_count{{target="{target}"}}') == n
        assert prom.value(f'propstream_score_bucket{{target="{target}",le="+Inf"}}') == n
        assert prom.value(f'propstream_model_version{{target="{target}"}}') == 0
        assert prom.value(f'propstream_model_warming_up{{target="{target}"}}') == 1
    assert prom.value("sum(propstream_labels_matured_total)") is None
    assert prom.value("sum(propstream_change_events_total)") is None

    # promtool accepts the live exposition of a running worker.
    if PROMTOOL is not None:
        _, text = worker.get("/metrics")
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
