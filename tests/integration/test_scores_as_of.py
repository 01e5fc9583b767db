"""Scores as of the partition's event-time clock, and ``propstream score`` over two workers, on the real broker.

The expected values are computed here, independently of the worker: each partition's clock is the
newest event time that landed on it (read back from Kafka), features are the brute-force recount
of ``tests/reference.py`` and a fold of the produced events, and scores are those of the fixed
models this test publishes, applied in this process.
"""

from __future__ import annotations

import csv
import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from features.contract import Rules, parse
from features.state import FeatureParams
from features.user import compute, fold
from models.online import ModelConfig, OnlineModel, inputs
from models.persist import dump, model_of, snapshot_of
from models.scoring import input_names
from streams.settings import Settings
from tests.integration.harness import WorkerProc, produce, read_topic, wait_until
from tests.integration.test_pipeline import router
from tests.reference import DAY, HOUR, MIN, assert_features_equal, random_events, reference_features

pytestmark = pytest.mark.integration

TARGETS = "purchase:7d,churn:14d"
VERSIONS = {"purchase": 5, "churn": 7}
FIXED = {  # the published models are never replaced: nothing is learnt, nothing is published
    "PROPSTREAM_TARGETS": TARGETS,
    "PROPSTREAM_MIN_POSITIVES": "0",
    "PROPSTREAM_MIN_NEGATIVES": "0",
    "PROPSTREAM_PUBLISH_EVERY": str(10**9),
    "PROPSTREAM_PUBLISH_INTERVAL_S": str(10**9),
}
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def publish_models(kafka: str, settings: Settings) -> dict[str, OnlineModel]:
    """Publish one model per target whose score depends on recency and recent activity (purchase up with
    activity, churn up with silence); returns them as the worker loads them."""
    out = {}
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all")
    for target, seed, sign in (("purchase", 1, 1.0), ("churn", 2, -1.0)):  # churn: silence, not activity
        rng = random.Random(seed)
        m = OnlineModel(ModelConfig(optimizer="sgd", learning_rate=0.05))
        for _ in range(400):
            x = {k: rng.uniform(0, 3) for k in input_names()}
            z = sign * (x["n_page_view_24h"] + x["n_add_to_cart_24h"] - x["s_since_last_event"]) - 0.5
            m.learn(x, int(z + rng.gauss(0, 0.5) > 0))
        snap = snapshot_of(m, target=target, version=VERSIONS[target], created_ms=int(time.time() * 1000))
        producer.send(settings.topic_models, key=snap.key, value=dump(snap)).get(timeout=30)
        out[target] = model_of(snap)
    producer.close()
    return out


def traffic(seed: int, users: int, per_user: int, start_ms: int, span_ms: int) -> list[dict[str, Any]]:
    """Random events without those ``random_events`` clamps to the span's end: two sessions of a user
    ending at the same time make "the latest session" ambiguous, and the recount may pick the other."""
    events = random_events(seed, users=users, per_user=per_user, start_ms=start_ms, span_ms=span_ms)
    return [e for e in events if e["ts"] != start_ms + span_ms]


def models_loaded(worker: WorkerProc, headers: dict[str, str] | None = None) -> bool:
    status, body = worker.get("/models", headers=headers)
    return status == 200 and {t: m["version"] for t, m in body["models"].items()} == VERSIONS


def by_user(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(str(e["user_id"]), []).append(e)
    return out


def landed(kafka: str, settings: Settings) -> tuple[dict[str, int], dict[int, int]]:
    """Per user the partition its events landed on, and per partition the newest event time there."""
    part: dict[str, int] = {}
    clock: dict[int, int] = {}
    for topic in settings.source_topics:
        for m in read_topic(kafka, topic):
            user, ts = m.key.decode(), json.loads(m.value)["ts"]
            assert part.setdefault(user, m.partition) == m.partition, user
            clock[m.partition] = max(clock.get(m.partition, 0), ts)
    return part, clock


def expected_scores(
    models: dict[str, OnlineModel], evs: list[dict[str, Any]], as_of: int
) -> dict[str, float]:
    """Every target's score as of ``as_of`` for a user with events ``evs``, computed in this process
    (the pure feature code and the models, no worker)."""
    rules, params = Rules(max_future_ms=10**15), FeatureParams()
    st = fold([e for d in evs for e in parse(json.dumps(d).encode(), rules, 0)], params)
    x = inputs(compute(st, as_of, params))
    return {t: m.score(x) for t, m in models.items()}


def wait_for_events(worker: WorkerProc, users: dict[str, list[dict[str, Any]]], headers: Any = None) -> None:
    def done() -> bool:
        for u, evs in users.items():
            status, body = worker.get(f"/users/{u}/features", headers=headers)
            if status != 200 or body["events"] != len(evs):
                return False
        return True

    wait_until(done, 90, what="every user's events to be folded")


def test_lookups_score_every_user_as_of_its_partitions_clock(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    models = publish_models(kafka, settings)
    worker = make_worker(**FIXED).start()
    wait_until(lambda: models_loaded(worker), 60, what="the fixed models to be loaded")
    base = (int(time.time() * 1000) // 1000) * 1000 - 2 * HOUR
    quiet_last = base - 5 * DAY
    quiet = [
        {"event_id": f"q{i}", "user_id": "quiet", "type": kind, "ts": quiet_last - (3 - i) * 10 * MIN}
        for i, kind in enumerate(("page_view", "product_view", "add_to_cart", "page_view"))
    ]
    quiet[2].update(product_id="p1", price=20.0, quantity=1)
    produce(kafka, router(settings), quiet)  # first: older than what moves the clock, so never late
    wait_for_events(worker, {"quiet": quiet})
    movers = traffic(
        7, users=16, per_user=12, start_ms=base - 4 * DAY, span_ms=4 * DAY - HOUR
    )  # after quiet's
    movers += [
        {"event_id": f"last-{u}", "user_id": f"user-{u}", "type": "page_view", "ts": base} for u in range(16)
    ]
    produce(kafka, router(settings), movers)
    users = by_user(quiet + movers)
    wait_for_events(worker, users)

    part, clock = landed(kafka, settings)
    warming = {t: m["warming_up"] for t, m in worker.get("/models")[1]["models"].items()}
    assert set(clock.values()) == {base}, f"a partition without a mover: {clock}"  # 16 movers, 4 partitions
    for u, evs in users.items():
        status, body = worker.get(f"/users/{u}")
        assert status == 200, (u, body)
        last = max(e["ts"] for e in evs)
        p = part[u]
        assert (body["partition"], body["clock_ms"], body["as_of_ms"]) == (p, clock[p], clock[p]), u
        assert (body["last_event_ms"], body["requested_as_of_ms"]) == (last, None), u
        assert_features_equal(body["features"], reference_features(evs, clock[p]), f"user {u}")
        assert body["features"]["s_since_last_event"] == (clock[p] - last) / 1000, u
        want = expected_scores(models, evs, clock[p])
        for t, s in body["scores"].items():
            assert (s["model_version"], s["warming_up"]) == (VERSIONS[t], warming[t]), (u, t)
            assert s["score"] == pytest.approx(want[t], abs=2e-6), (u, t)
        status, feats = worker.get(f"/users/{u}/features")  # the features view: the same clock
        assert (status, feats["as_of_ms"]) == (200, clock[p]), u
        assert_features_equal(feats["features"], reference_features(evs, clock[p]), f"user {u} /features")

    status, body = worker.get("/users/quiet")
    assert body["features"]["s_since_last_event"] == 5 * 86400  # hand-worked: silent for five days
    then = expected_scores(models, quiet, quiet_last)  # what the lookup used to show: "just active"
    assert body["scores"]["purchase"]["score"] < then["purchase"] - 0.05
    assert body["scores"]["churn"]["score"] > then["churn"] + 0.05

    # an as_of before the last event is answered as of the last event, and says what was asked
    status, body = worker.get(f"/users/quiet?as_of={quiet_last - DAY}")
    assert status == 200
    assert (body["as_of_ms"], body["requested_as_of_ms"]) == (quiet_last, quiet_last - DAY)
    assert body["features"]["s_since_last_event"] == 0
    assert body["scores"]["purchase"]["score"] == pytest.approx(then["purchase"], abs=2e-6)
    later = base + DAY
    iso = datetime.fromtimestamp(later / 1000, tz=UTC).isoformat().replace("+00:00", "Z")
    status, body = worker.get(f"/users/quiet?as_of={iso}")
    assert (status, body["as_of_ms"], body["requested_as_of_ms"]) == (200, later, later)
    assert body["features"]["s_since_last_event"] == 6 * 86400
    assert body["scores"]["churn"]["score"] == pytest.approx(
        expected_scores(models, quiet, later)["churn"], abs=2e-6
    )
    for bad in ("abc", "%C2%B2"):
        for user in ("quiet", "nobody"):
            status, body = worker.get(f"/users/{user}?as_of={bad}")
            assert (status, body["error"]) == (400, "bad_as_of"), (user, bad, body)


def rows_of(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return header, rows


def test_score_export_over_two_workers_writes_every_user_once_with_the_lookup_scores(
    settings: Settings, make_worker: Any, kafka: str, tmp_path: Path
) -> None:
    models = publish_models(kafka, settings)
    extra = {**FIXED, "PROPSTREAM_API_TOKEN": TOKEN}
    a = make_worker("a", **extra).start()
    b = make_worker("b", **extra).start()
    wait_until(lambda: a.ready() and b.ready(), 60, what="both workers ready after the rebalance")
    wait_until(lambda: models_loaded(a, AUTH) and models_loaded(b, AUTH), 60, what="the fixed models")
    base = int(time.time() * 1000) - HOUR
    events = traffic(8, users=300, per_user=8, start_ms=base - 3 * DAY, span_ms=3 * DAY)
    produce(kafka, router(settings), events)
    users = by_user(events)
    wait_for_events(a, users, AUTH)
    part, clock = landed(kafka, settings)

    # who owns what, and the owner is the only one that pages a partition
    assert a.get("/partitions")[0] == 401 and a.get("/scores?partition=0")[0] == 401
    status, layout = b.get("/partitions", headers=AUTH)
    assert (
        status == 200
        and layout["partitions"] == settings.partitions
        and layout["targets"] == ["purchase", "churn"]
    )
    owners = layout["owners"]
    assert sorted(owners) == [str(p) for p in range(settings.partitions)]
    assert set(owners.values()) == {a.url, b.url}, f"the partitions are not shared: {owners}"
    by_url = {a.url: a, b.url: b}
    for p, url in owners.items():
        other = b if url == a.url else a
        status, body = other.get(f"/scores?partition={p}", headers=AUTH)
        assert (status, body["error"], body["owner"]) == (409, "not_owner", url), body
    for query, code in (
        ("partition=9", "bad_partition"),
        ("partition=0&limit=0", "bad_limit"),
        ("partition=0&after=%21", "bad_cursor"),
        ("partition=0&as_of=abc", "bad_as_of"),
    ):
        status, body = by_url[owners["0"]].get(f"/scores?{query}", headers=AUTH)
        assert (status, body["error"]) == (400, code), (query, body)

    # CSV, as of each partition's clock (the default), in small pages so cursors are followed
    out = tmp_path / "scores.csv"
    t0 = time.monotonic()
    run = a.cli("score", "--out", str(out), "--page-size", "37")
    took = time.monotonic() - t0
    assert run.returncode == 0, run.stderr[-3000:]
    n = settings.partitions
    assert f"score: {len(users):,} users written, {n}/{n} partitions done" in run.stderr, run.stderr
    header, rows = rows_of(out)
    assert header == ["user_id", "purchase", "churn"]
    assert sorted(r[0] for r in rows) == sorted(users)  # every produced user, exactly once
    for user_id, *scores in rows:
        status, body = b.get(f"/users/{user_id}", headers=AUTH)
        assert status == 200 and body["as_of_ms"] == clock[part[user_id]], (user_id, body)
        assert [float(s) for s in scores] == [body["scores"][t]["score"] for t in ("purchase", "churn")], (
            user_id
        )
        assert_features_equal(
            body["features"], reference_features(users[user_id], clock[part[user_id]]), user_id
        )
        want = expected_scores(models, users[user_id], clock[part[user_id]])
        assert [float(s) for s in scores] == pytest.approx([want["purchase"], want["churn"]], abs=2e-6)
    print(
        f"\nexport of {len(rows)} users over two workers: {took:.1f} s with start-up; {run.stderr.strip().splitlines()[-1]}"
    )

    # JSON lines, as of one given time (ISO-8601) for everyone
    later = base + 2 * DAY
    iso = datetime.fromtimestamp(later / 1000, tz=UTC).isoformat()
    out = tmp_path / "scores.jsonl"
    run = b.cli("score", "--out", str(out), "--format", "jsonl", "--as-of", iso)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(d["user_id"] for d in lines) == sorted(users)
    for d in lines:
        assert d["as_of_ms"] == later
        status, body = a.get(f"/users/{d['user_id']}?as_of={later}", headers=AUTH)
        assert status == 200 and body["as_of_ms"] == later
        for t in ("purchase", "churn"):
            s = body["scores"][t]
            want = {k: s[k] for k in ("score", "tier", "warming_up", "model_version")}
            assert {k: d["scores"][t][k] for k in want} == want, (d["user_id"], t)

    run = a.cli("score", "--out", str(tmp_path / "x.csv"), "--as-of", "yesterday")
    assert run.returncode != 0 and "as_of" in run.stderr and not (tmp_path / "x.csv").exists()
