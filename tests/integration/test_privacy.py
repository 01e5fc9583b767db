"""Privacy on the real broker: pseudonymised ids appear nowhere, erasure leaves no trace in state.

Both tests look for the user where it could hide, independently of the code that put it there:
every message of every topic the system writes (keys, values, headers), the worker's metrics and
log, and the RocksDB files on disk, opened directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.partitioner.default import murmur2
from rocksdict import AccessType, Options, Rdict

from streams.privacy import Pseudonymizer
from streams.settings import Settings
from tests.integration.harness import read_topic, wait_settled, wait_until
from tests.integration.test_pipeline import router
from tests.reference import DAY, HOUR, random_events

pytestmark = pytest.mark.integration

LEARNING = {
    "PROPSTREAM_TARGETS": "purchase:1h,churn:2h",
    "PROPSTREAM_SAMPLE_EVERY_S": "600",
    "PROPSTREAM_MIN_POSITIVES": "0",
    "PROPSTREAM_MIN_NEGATIVES": "0",
    # trusted at once, the trust gate off too: change events (keyed by user) are among what is searched
    "PROPSTREAM_TRUST_MIN_AUC_LOWER": "0",
    "PROPSTREAM_TRUST_MAX_ECE": "1",
    "PROPSTREAM_PUBLISH_EVERY": "20",
    "PROPSTREAM_COOLDOWN_S": "0",
}
MARKER = "RawId"


def traffic(users: int, name: Any) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    events = random_events(5, users=users, per_user=80, start_ms=now - 2 * DAY, span_ms=2 * DAY - HOUR)
    for e in events:
        e["user_id"] = name(int(e["user_id"].split("-")[1]))
    return events


def publish(
    kafka: str, settings: Settings, events: list[dict[str, Any]], extra: list[tuple[bytes, bytes]]
) -> None:
    topic_of = router(settings)
    p = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5)
    for e in events:
        p.send(topic_of(e), key=e["user_id"].encode(), value=json.dumps(e).encode())
    for key, value in extra:
        p.send(settings.topic_clickstream, key=key, value=value)
    p.flush()
    p.close()


def counted(worker: Any, events: list[dict[str, Any]]) -> bool:
    per_user: dict[str, int] = {}
    for e in events:
        per_user[e["user_id"]] = per_user.get(e["user_id"], 0) + 1
    for user, n in per_user.items():
        f = worker.features(user)
        if f is None or f["events"] != n:
            return False
    return True


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in the Java client) gives ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def table_files(data_dir: Path, table: str) -> list[Path]:
    return sorted((data_dir / "v1" / "tables").glob(f"{table}-*.db"))


def keys_on_disk(data_dir: Path, table: str) -> set[bytes]:
    """Every key of a table's RocksDB partitions, read straight from the files (worker stopped)."""
    keys: set[bytes] = set()
    for path in table_files(data_dir, table):
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            keys.update(k for k in db.keys() if not k.startswith(b"__faust"))  # noqa: SIM118 (Rdict)
        finally:
            db.close()
    return keys


def test_pseudonymised_ids_appear_nowhere(
    settings: Settings, make_worker: Any, kafka: str, tmp_path: Path
) -> None:
    worker = make_worker(
        PROPSTREAM_PSEUDONYMIZE_KEY="s3cret", PROPSTREAM_LOG_LEVEL="info", **LEARNING
    ).start()
    events = traffic(12, lambda u: f"{MARKER}{u}x")
    bad = [
        (f"{MARKER}99x".encode(), f'{{"user_id": "{MARKER}99x", oops'.encode()),  # not JSON
        (f"{MARKER}98x".encode(), json.dumps({**events[0], "user_id": f"{MARKER}97x"}).encode()),  # wrong key
    ]
    publish(kafka, settings, events, bad)
    wait_until(lambda: counted(worker, events), 120, what="every user's events, looked up by raw id")
    wait_until(lambda: worker.metric("propstream_labels_matured_total") > 0, 60, what="labels to mature")
    wait_until(lambda: worker.metric("propstream_events_rejected_total") >= 2, 30, what="the dead letters")
    # everything the worker wrote for its input is in Kafka: changelogs, examples, dead letters, models
    wait_settled(kafka, settings.app_id, [*settings.source_topics, settings.topic_training])

    secret = Pseudonymizer(Settings(pseudonymize_key="s3cret").pseudonymize_key)
    # first, the search covers the newest writes: the two bad messages were published last, every
    # user's row is on the changelog under its pseudonym, every matured label is on the training log
    dead = read_topic(kafka, settings.topic_deadletter)
    assert sorted(dict(m.headers)["propstream.reason"] for m in dead) == [b"not_json", b"wrong_key"]
    rows = {m.key for m in read_topic(kafka, f"{settings.app_id}-features-changelog")}
    assert {secret(e["user_id"]).encode() for e in events} <= rows
    matured = worker.metric("propstream_labels_matured_total")
    assert len(read_topic(kafka, settings.topic_training)) == matured > 0
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    ours = [
        t for t in admin.list_topics() if t.startswith(settings.app_id) or t.split(".")[0] == settings.app_id
    ]
    ours += [
        settings.topic_deadletter,
        settings.topic_changes,
        settings.topic_training,
        settings.topic_models,
    ]
    admin.close()
    seen_pseudonym = False
    searched = 0
    for topic in sorted(set(ours)):
        for m in read_topic(kafka, topic):
            searched += 1
            blob = b"".join([m.key or b"", m.value or b"", *(v for _, v in m.headers)])
            assert MARKER.encode() not in blob, (topic, m.offset, blob[:200])
            seen_pseudonym |= secret(f"{MARKER}0x").encode() in blob
    assert searched >= 12 and seen_pseudonym, "the search found neither messages nor the pseudonyms"

    _, metrics = worker.get("/metrics")
    assert b"propstream_labels_matured_total" in metrics  # the exposition is the full one
    assert MARKER.encode() not in metrics
    worker.stop()
    log = worker.log.read_text(errors="replace")
    # the log is complete (the worker logged its publications and its shutdown) before it is searched
    assert "model version" in log and "Closing event loop" in log, log[-2000:]
    assert MARKER not in log
    files = [p for p in Path(worker.env["PROPSTREAM_DATA_DIR"]).rglob("*") if p.is_file()]
    on_disk = b"".join(p.read_bytes() for p in files)
    assert MARKER.encode() not in on_disk
    assert secret(f"{MARKER}0x").encode() in on_disk  # the state is there, under the pseudonym


def test_erasure_leaves_no_trace(settings: Settings, make_worker: Any, kafka: str) -> None:
    worker = make_worker("w1", **LEARNING).start()
    events = traffic(8, lambda u: f"user-{u}")
    publish(kafka, settings, events, [])
    wait_until(lambda: counted(worker, events), 120, what="every user's events")
    wait_until(lambda: worker.metric("propstream_labels_matured_total") > 0, 60, what="labels to mature")
    victim, other = "user-3", "user-4"
    status, body = worker.get(f"/users/{victim}")
    assert status == 200 and sum(s["pending_snapshots"] for s in body["scores"].values()) > 0

    out = worker.cli("forget", victim)
    assert out.returncode == 0, out.stderr
    assert "features" in out.stdout and "scores" in out.stdout and "ledger" in out.stdout, out.stdout
    assert worker.get(f"/users/{victim}")[0] == 404
    assert worker.get(f"/users/{victim}/features")[0] == 404
    assert worker.get(f"/users/{other}")[0] == 200

    # a marker user on the victim's partition, written after the erasure: wherever the test looks for
    # the victim below, it first finds the marker, so what it searches holds the writes that followed
    n = settings.partitions
    victim_p = partition_of(victim.encode(), n)
    marker = next(f"after-{i}" for i in range(1000) if partition_of(f"after-{i}".encode(), n) == victim_p)
    last_ts = max(e["ts"] for e in events)
    ev = {"event_id": "after-erasure", "user_id": marker, "type": "page_view", "ts": last_ts}
    publish(kafka, settings, [ev], [])
    wait_until(lambda: worker.features(marker) is not None, 60, what="the marker user's event")
    wait_settled(kafka, settings.app_id, [*settings.source_topics, settings.topic_erasure])

    # the changelog of the users' rows (features, scores and ledger in one value) ends with a tombstone
    # for the user, before the marker's row in the same partition; so does the compacted outbound topic
    rows = read_topic(kafka, f"{settings.app_id}-features-changelog")
    msgs = [m for m in rows if m.key == victim.encode()]
    assert msgs and msgs[-1].value is None
    after = [m for m in rows if m.key == marker.encode()]
    assert after and after[-1].partition == msgs[-1].partition and after[-1].offset > msgs[-1].offset
    changes = [m for m in read_topic(kafka, settings.topic_changes) if m.key == victim.encode()]
    assert changes and changes[-1].value is None
    [done] = [json.loads(m.value) for m in read_topic(kafka, settings.topic_erasure_done)]
    assert done["user_id"] == victim and set(done["removed"]) == {"features", "scores", "ledger"}

    # on disk: the user's key is in none of the RocksDB files of the tables, the others' and the marker's are
    worker.stop()
    data_dir = Path(worker.env["PROPSTREAM_DATA_DIR"])
    tables = {p.name.rsplit("-", 1)[0] for p in (data_dir / "v1" / "tables").glob("*.db")}
    assert "features" in tables
    assert {other.encode(), marker.encode()} <= keys_on_disk(data_dir, "features")
    for table in tables:
        assert victim.encode() not in keys_on_disk(data_dir, table), table

    # a worker restoring from the changelogs alone does not bring the user back: it has restored the
    # victim's partition past the tombstone (the marker is there) and the victim is not
    fresh = make_worker("w2", **LEARNING).start(timeout_s=180)
    wait_until(lambda: fresh.features(other) is not None, 60, what="the other users restored")
    wait_until(lambda: fresh.features(marker) is not None, 60, what="the marker restored")
    assert fresh.get(f"/users/{victim}")[0] == 404


def test_retention_evicts_idle_users_from_state_and_changelogs(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    worker = make_worker(PROPSTREAM_USER_TTL_DAYS="1", **LEARNING).start()
    now = int(time.time() * 1000)
    idle = random_events(8, users=3, per_user=20, start_ms=now - 6 * DAY, span_ms=DAY)
    for e in idle:
        e["user_id"] = "idle-" + e["user_id"]
    publish(kafka, settings, idle, [])
    wait_until(lambda: counted(worker, idle), 60, what="the idle users' events")
    active = random_events(9, users=10, per_user=30, start_ms=now - 2 * HOUR, span_ms=HOUR)
    publish(kafka, settings, active, [])
    wait_until(lambda: counted(worker, active), 60, what="the active users' events")
    idle_users = sorted({e["user_id"] for e in idle})
    wait_until(
        lambda: all(worker.get(f"/users/{u}")[0] == 404 for u in idle_users),
        60,
        what="the idle users evicted",
    )
    assert worker.metric("propstream_users_evicted_total") == len(idle_users)

    # gone from Kafka too, by the next checkpoint (a tick's sweep holds its deletes until then): a
    # tombstone, or never written (evicted before a checkpoint wrote the row)
    def tombstoned() -> bool:
        last = {m.key: m.value for m in read_topic(kafka, f"{settings.app_id}-features-changelog")}
        return all(last.get(u.encode()) is None for u in idle_users)

    wait_until(tombstoned, 30, what="the idle users' tombstones on the changelog")
    assert all(worker.features(e["user_id"]) is not None for e in active[:10])
