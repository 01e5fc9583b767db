"""Event-time timers on the real broker: silence rescoring, abandoned carts, orders-only sources,
replays, SIGKILLs and rebalances.

Every expected value is worked out here from the events a test sends, not by the code under test:
due times from the event times (the user's last event plus a silence point, the last cart change
plus 30 minutes), scores from hand-set models applied in this process to ``features.user.compute``
over a fold of the user's events, and every message is validated against the published JSON
schemas. A partition's event-time clock is the minimum over the three source topics' newest event
times, so the tests move it with "clock" users: one per partition and source topic (placed with
kafka-python's own partitioner, the producer these tests use), active every few minutes.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from datetime import datetime
from typing import Any

import jsonschema
import pytest
from kafka import KafkaProducer
from kafka.partitioner import murmur2

from models.online import OnlineModel
from models.persist import dump, model_of, restore, snapshot_of
from models.scoring import decode_state, input_names
from streams.rows import SCORES, decode_row
from streams.settings import Settings
from tests.conftest import ROOT, SHARED_DATA
from tests.integration.harness import (
    FAST_FAILOVER,
    Traffic,
    WorkerProc,
    consented_by_user,
    produce,
    random_pause,
    read_topic,
    run_seed,
    user_router,
    wait_settled,
    wait_until,
)
from tests.integration.test_pipeline import router
from tests.integration.test_scores_as_of import expected_scores
from tests.reference import random_events
from traffic.datasets import read_events
from traffic.simulator import SimConfig, simulate

pytestmark = pytest.mark.integration

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
LOW, HIGH, HYST, DELTA = 0.2, 0.5, 0.03, 0.15  # the documented change-rule defaults the workers run with
CART_AFTER = 30 * MIN  # PROPSTREAM_ABANDON_AFTER_S's default
SILENCE = (HOUR, DAY, 3 * DAY, 7 * DAY, 14 * DAY)  # PROPSTREAM_RESCORE_AFTER's default
WALL = ("emit_ts_ms", "emitted_at")  # the only fields that may differ between two emissions


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / "streams" / "schemas" / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


CHANGE, TRIGGER = _validator("change"), _validator("trigger")

# Hand-set models (every input standardises to itself): purchase rises with adds to cart in the last
# hour; churn with silence, from 2e-9 just after an event to 0.026 after 1 h, 0.94 after 1 d and
# 0.993 after 3 d, so a quiet user crosses into the high tier at the 1 d silence point and never
# moves by min_delta again.
WEIGHTS = {"purchase": ({"n_add_to_cart_1h": 2.0}, -2.0), "churn": ({"s_since_last_event": 2.0}, -20.0)}
VERSIONS = {"purchase": 5, "churn": 7}
FIXED = {  # the published models are never replaced: nothing is published by the trainers
    "PROPSTREAM_TARGETS": "purchase:7d,churn:14d",
    "PROPSTREAM_MIN_POSITIVES": "0",
    "PROPSTREAM_MIN_NEGATIVES": "0",
    # The trust gate is off: hand-set models carry no quality figures, so the gate would refuse them
    # ("no roc_auc yet") and no change would ever be announced. These tests are about timers; the
    # gate has its own (tests/unit/test_trust.py, tests/integration/test_trust.py).
    "PROPSTREAM_TRUST_MIN_AUC_LOWER": "0",
    "PROPSTREAM_TRUST_MAX_ECE": "1",
    "PROPSTREAM_PUBLISH_EVERY": str(10**9),
    "PROPSTREAM_PUBLISH_INTERVAL_S": str(10**9),
    "PROPSTREAM_SOURCE_IDLE_S": "0",  # pure event time: a topic that is slow to deliver is never skipped
    "PROPSTREAM_IDLE_ADVANCE_S": "0",  # no wall-clock moves of the clock
}


@pytest.fixture()
def triggers_topic(env: dict[str, str]) -> str:
    """A triggers topic of this test's own (the env fixture predates the triggers topic)."""
    return env["PROPSTREAM_TOPIC_CHANGES"].removesuffix(".changes") + ".triggers"


# --- models ------------------------------------------------------------------------------------
def hand_set(weights: dict[str, float], intercept: float) -> OnlineModel:
    names = input_names()
    assert set(weights) <= set(names), f"not a model input: {set(weights) - set(names)}"
    state = {
        "counts": dict.fromkeys(names, 2),
        "means": dict.fromkeys(names, 0.0),
        "vars": dict.fromkeys(names, 1.0),
        "weights": weights,
        "intercept": intercept,
        "n_iterations": 0,
        "optimizer": {},
        "positives": 500,
        "negatives": 500,
    }
    return restore({"optimizer": "sgd"}, state)


def publish_fixed(kafka: str, topic: str) -> dict[str, OnlineModel]:
    """Publish the hand-set models; returns them as a worker loads them."""
    out = {}
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all")
    for target, (weights, intercept) in WEIGHTS.items():
        snap = snapshot_of(
            hand_set(weights, intercept),
            target=target,
            version=VERSIONS[target],
            created_ms=int(time.time() * 1000),
        )
        producer.send(topic, key=snap.key, value=dump(snap)).get(timeout=30)
        out[target] = model_of(snap)
    producer.close()
    return out


def models_loaded(worker: WorkerProc) -> bool:
    status, body = worker.get("/models")
    return (
        status == 200
        and {t: m["version"] for t, m in body["models"].items()} == VERSIONS
        and not any(m["warming_up"] for m in body["models"].values())
    )


# --- events ------------------------------------------------------------------------------------
def partition_of(user: str, partitions: int) -> int:
    """Where kafka-python (the producer of these tests) puts a user's messages."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def clock_users(settings: Settings, tag: str = "clock") -> dict[str, str]:
    """One user per partition and source topic (user -> topic), so every partition's clock moves."""
    free = {(p, t) for p in range(settings.partitions) for t in settings.source_topics}
    out: dict[str, str] = {}
    i = 0
    while free:
        user = f"{tag}-{i}"
        p = partition_of(user, settings.partitions)
        topic = next((t for t in settings.source_topics if (p, t) in free), None)
        if topic is not None:
            free.discard((p, topic))
            out[user] = topic
        i += 1
    return out


def ticks(
    users: dict[str, str], start_ms: int, end_ms: int, every_ms: int
) -> list[tuple[str, dict[str, Any]]]:
    """A page view of every clock user every ``every_ms`` from ``start_ms`` to ``end_ms`` inclusive."""
    return [
        (topic, {"event_id": f"{u}@{ts}", "user_id": u, "type": "page_view", "ts": ts})
        for ts in range(start_ms, end_ms + 1, every_ms)
        for u, topic in users.items()
    ]


def ev(user: str, i: int, kind: str, ts: int, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"{user}-{i}", "user_id": user, "type": kind, "ts": ts, **fields}


def in_time_order(items: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], Any]:
    """The events in time order (so each topic is in time order: nothing is ever late), and where each goes."""
    items = sorted(items, key=lambda it: it[1]["ts"])
    where = {e["event_id"]: t for t, e in items}
    return [e for _, e in items], lambda e: where[e["event_id"]]


def send(kafka: str, items: list[tuple[str, dict[str, Any]]]) -> int:
    events, topic_of = in_time_order(items)
    return produce(kafka, topic_of, events)


def bodies(kafka: str, topic: str) -> list[dict[str, Any]]:
    """Every message of ``topic`` (partition order, then offsets: a user's in publication order)."""
    out = []
    for m in read_topic(kafka, topic):
        body = json.loads(m.value)
        assert m.key == body["user_id"].encode(), (m.key, body)
        out.append(body)
    return out


def read_until(kafka: str, topic: str, done: Any, timeout_s: float, what: str) -> list[Any]:
    """Read ``topic`` to its end again and again until ``done(messages)``; the messages."""
    got: list[Any] = []

    def check() -> Any:
        got[:] = read_topic(kafka, topic)
        return done(got)

    wait_until(check, timeout_s, every_s=0.5, what=what)
    return got


def epoch_ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def without_wall(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in WALL}


def cart_trigger(models: dict[str, OnlineModel], user: str, evs: list[dict[str, Any]]) -> dict[str, Any]:
    """The cart_abandoned trigger a user's adds (no removes, no purchase; one price per product) call for."""
    adds = [e for e in evs if e["type"] == "add_to_cart"]
    qty: dict[str, int] = {}
    price: dict[str, float] = {}
    for e in adds:
        qty[e["product_id"]] = qty.get(e["product_id"], 0) + e.get("quantity", 1)
        price[e["product_id"]] = e["price"]
    changed = max(e["ts"] for e in adds)
    due = changed + CART_AFTER
    scores = expected_scores(models, evs, due)
    return {
        "schema": "propstream.trigger/1",
        "trigger": "cart_abandoned",
        "trigger_id": f"cart_abandoned:{due}",
        "user_id": user,
        "event_ts_ms": due,
        "facts": {
            "cart_value": round(sum(q * price[p] for p, q in qty.items()), 6),
            "cart_items": sum(qty.values()),
            "lines": [{"product_id": p, "quantity": qty[p], "price": price[p]} for p in sorted(qty)],
            "cart_started_ms": min(e["ts"] for e in adds),
            "cart_changed_ms": changed,
        },
        "scores": scores,
    }


def check_trigger(body: dict[str, Any], want: dict[str, Any]) -> None:
    TRIGGER.validate(body)
    assert epoch_ms(body["event_time"]) == body["event_ts_ms"], body
    plain = {k: v for k, v in body.items() if k not in (*WALL, "event_time", "scores")}
    assert plain == {k: v for k, v in want.items() if k != "scores"}, body["user_id"]
    assert set(body["scores"]) == set(want["scores"]), body
    for t, s in body["scores"].items():
        assert (s["model_version"], s["warming_up"]) == (VERSIONS[t], False), (body["user_id"], t, s)
        assert s["score"] == pytest.approx(want["scores"][t], abs=2e-6), (body["user_id"], t)


def check_at_least_once(got: list[dict[str, Any]], want: dict[str, dict[str, Any]]) -> Counter[str]:
    """Every wanted trigger arrived, nothing else did, and each copy is the same apart from the wall clock."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    for body in got:
        by_user.setdefault(body["user_id"], []).append(body)
    assert set(by_user) == set(want), (
        f"missing: {sorted(set(want) - set(by_user))}, unexpected: {sorted(set(by_user) - set(want))}"
    )
    for user, copies in by_user.items():
        for body in copies:
            check_trigger(body, want[user])
        assert all(without_wall(c) == without_wall(copies[0]) for c in copies), copies
    return Counter({u: len(c) for u, c in by_user.items() if len(c) > 1})


# --- tests -------------------------------------------------------------------------------------
def test_silence_rescores_a_quiet_user_and_an_abandoned_cart_triggers_once(
    settings: Settings, make_worker: Any, kafka: str, triggers_topic: str
) -> None:
    models = publish_fixed(kafka, settings.topic_models)
    worker = make_worker(**FIXED, PROPSTREAM_TOPIC_TRIGGERS=triggers_topic).start()
    wait_until(lambda: models_loaded(worker), 60, what="the fixed models to be loaded")
    now = int(time.time() * 1000)
    base = now - now % MIN - 4 * DAY
    quiet = [
        ev("quiet", 0, "page_view", base),
        ev("quiet", 1, "product_view", base + 2 * MIN, product_id="p9", price=3.0),
        ev("quiet", 2, "page_view", base + 5 * MIN),
    ]
    cart_a = [
        ev("cart-a", 0, "page_view", base + 10 * MIN),
        ev("cart-a", 1, "add_to_cart", base + 12 * MIN, product_id="p1", price=15.5, quantity=2),
        ev("cart-a", 2, "add_to_cart", base + 20 * MIN, product_id="p2", price=4.25, quantity=1),
    ]
    cart_b = [  # bought 25 minutes after the add: no abandonment
        ev("cart-b", 0, "add_to_cart", base + 15 * MIN, product_id="p1", price=15.5, quantity=1),
        ev(
            "cart-b",
            1,
            "purchase",
            base + 40 * MIN,
            product_id="p1",
            price=15.5,
            order_id="o-b",
            revenue=15.5,
        ),
    ]
    end = base + 3 * DAY + 2 * HOUR  # past quiet's 1 h, 1 d and 3 d silence points; before its 7 d one
    route = router(settings)
    send(
        kafka,
        [(route(e), e) for e in quiet + cart_a + cart_b]
        + ticks(clock_users(settings), base - 30 * MIN, end, 30 * MIN),
    )
    read_until(
        kafka, triggers_topic, lambda ms: any(m.key == b"cart-a" for m in ms), 90, what="cart-a's trigger"
    )
    wait_settled(kafka, settings.app_id, settings.source_topics, 90)  # every tick consumed, outputs flushed

    # the cart: one trigger in all, cart-a's, at its last change + 30 min, with its facts and scores
    triggers = bodies(kafka, triggers_topic)
    assert [t["user_id"] for t in triggers] == ["cart-a"], triggers
    want = cart_trigger(models, "cart-a", cart_a)
    assert want["event_ts_ms"] == base + 50 * MIN and want["facts"]["cart_items"] == 3  # hand-worked
    assert want["facts"]["cart_value"] == 35.25
    check_trigger(triggers[0], want)
    assert now - 60_000 <= triggers[0]["emit_ts_ms"] <= time.time() * 1000
    # cart-b's clock passed its add + 30 min (every tick up to ``end`` is consumed, on every topic of
    # its partition), and its cart is empty: the purchase cancelled the trigger
    status, body = worker.get("/users/cart-b")
    assert status == 200 and body["clock_ms"] == end > base + 15 * MIN + CART_AFTER, body
    assert body["features"]["cart_items"] == 0

    # silence: quiet's churn score crosses into the high tier at the 1 d silence point, once
    last = base + 5 * MIN
    before = expected_scores(models, quiet, last)["churn"]
    at = {s: expected_scores(models, quiet, last + s)["churn"] for s in SILENCE if last + s <= end}
    assert list(at) == [HOUR, DAY, 3 * DAY]
    assert at[HOUR] < LOW - HYST and at[HOUR] - before < DELTA  # 1 h: still low, no large move
    assert at[DAY] >= HIGH + HYST  # 1 d: high
    assert at[3 * DAY] - at[DAY] < DELTA  # 3 d: within min_delta of what was announced
    changes = bodies(kafka, settings.topic_changes)
    for c in changes:
        CHANGE.validate(c)
        assert epoch_ms(c["event_time"]) == c["event_ts_ms"], c
        if c["trigger"] == "silence":
            assert c["event_id"] == f"silence:{c['event_ts_ms']}", c
        assert c["model_version"] == VERSIONS[c["target"]], c
    [change] = [c for c in changes if c["user_id"] == "quiet"]
    due = last + DAY
    plain = {k: v for k, v in change.items() if k not in (*WALL, "event_time", "top_factors")}
    assert plain == {
        "schema": "propstream.change/1",
        "user_id": "quiet",
        "target": "churn",
        "previous_score": pytest.approx(round(before, 6), abs=2e-6),
        "score": pytest.approx(round(at[DAY], 6), abs=2e-6),
        "previous_tier": "low",
        "tier": "high",
        "direction": "up",
        "reason": "churn_risk_up",
        "model_version": VERSIONS["churn"],
        "horizon_s": 14 * 86400,
        "trigger": "silence",
        "event_id": f"silence:{due}",
        "event_ts_ms": due,
    }
    top = change["top_factors"][0]
    assert (top["feature"], top["value"], top["previous"]) == ("s_since_last_event", 86400.0, 0.0), top
    assert sum(c["trigger"] == "silence" for c in changes) >= 2  # cart-a's and cart-b's quiet spells too
    assert worker.metric("propstream_triggers_total", trigger="cart_abandoned") == 1


# --- orders only ---------------------------------------------------------------------------------
ORDERS_ONLY = {
    "PROPSTREAM_MIN_POSITIVES": "20",
    "PROPSTREAM_MIN_NEGATIVES": "20",
    "PROPSTREAM_QUALITY_WINDOW": "300",
    "PROPSTREAM_MODEL_OPTIMIZER": "adagrad",
    "PROPSTREAM_MODEL_LEARNING_RATE": "0.05",
    "PROPSTREAM_PUBLISH_EVERY": "50",
    "PROPSTREAM_PUBLISH_INTERVAL_S": "1",
    "PROPSTREAM_SOURCE_IDLE_S": "2",  # clickstream and cart never deliver: they stop holding the clock
    "PROPSTREAM_IDLE_ADVANCE_S": "0",
}


def run_orders_only(
    settings: Settings,
    worker: WorkerProc,
    kafka: str,
    orders: list[dict[str, Any]],
    horizon_ms: int,
    wall_s: float,
    want_trust: bool = True,
) -> dict[str, Any]:
    """Send ``orders`` to the purchase topic only, over ``wall_s`` seconds, watching the live model.

    Returns what was seen: matured labels by class, a lower bound on them worked out from the
    orders, the trusted versions seen while it ran, the final ``/models`` entry and the scores.
    """
    traffic = Traffic(kafka, lambda e: settings.topic_purchase, orders, rate=len(orders) / wall_s)
    trusted: list[int] = []

    def live() -> dict[str, Any]:
        m = worker.get("/models")[1]["models"]["purchase"]
        if not m["warming_up"] and m["version"] >= 1:
            trusted.append(m["version"])
        return m

    traffic.start()
    while not traffic.done:
        live()
        time.sleep(0.5)
    traffic.finish()
    wait_settled(kafka, settings.app_id, [settings.topic_purchase, settings.topic_training], 120)
    wait_until(lambda: live()["version"] >= 1, 30, what="a published version")
    # versions published from the last labels, and the verdict on them
    deadline = time.monotonic() + (15 if want_trust else 0)
    while time.monotonic() < deadline and not trusted:
        live()
        time.sleep(0.5)
    # an independent lower bound: each buyer's first order is sampled, and its label is final once
    # the partition's clock (its newest order: the only topic) is a horizon and the lateness past it
    # (of users who consent to personalisation: the others' events are not used)
    newest: dict[int, int] = {}
    for e in orders:
        p = partition_of(str(e["user_id"]), settings.partitions)
        newest[p] = max(newest.get(p, 0), e["ts"])
    first = {u: evs[0]["ts"] for u, evs in consented_by_user(orders).items()}
    bound = sum(
        1 for u, ts in first.items() if ts + horizon_ms < newest[partition_of(u, settings.partitions)] - HOUR
    )
    scores = {}
    for u in sorted(first)[:80]:
        status, body = worker.get(f"/users/{u}")
        assert status == 200, (u, body)
        scores[u] = body["scores"]["purchase"]
    return {
        "positive": worker.metric("propstream_labels_matured_total", label="positive"),
        "negative": worker.metric("propstream_labels_matured_total", label="negative"),
        "bound": bound,
        "trusted": trusted,
        "model": live(),
        "scores": scores,
    }


def test_purchase_only_traffic_matures_labels_earns_trust_and_spreads_scores(
    settings: Settings, make_worker: Any, kafka: str, triggers_topic: str
) -> None:
    orders = [e for e in simulate(SimConfig(users=1000, days=30, seed=5)) if e["type"] == "purchase"]
    assert len(orders) > 500
    worker = make_worker(
        **ORDERS_ONLY, PROPSTREAM_TARGETS="purchase:3d", PROPSTREAM_TOPIC_TRIGGERS=triggers_topic
    ).start()
    seen = run_orders_only(settings, worker, kafka, orders, 3 * DAY, wall_s=25)
    m = seen["model"]
    print(
        f"\norders only (simulated): {len(orders)} orders, labels matured {seen['positive']:.0f} positive / "
        f"{seen['negative']:.0f} negative (bound {seen['bound']}), trusted versions seen {seen['trusted'][:3]}..., "
        f"final version {m['version']}: {m['trust']}, quality {m.get('quality')}"
    )
    assert seen["positive"] + seen["negative"] >= seen["bound"] > 100
    assert seen["positive"] > 0 and seen["negative"] > 0
    assert seen["trusted"], f"the trust gate never passed: {m['trust']}, quality {m.get('quality')}"
    distinct = {round(s["score"], 4) for s in seen["scores"].values()}
    assert all(s["model_version"] >= 1 for s in seen["scores"].values())
    assert len(distinct) >= 10, f"scores barely differ between users: {sorted(distinct)}"


TAOBAO = SHARED_DATA / "taobao" / "user_behavior_sample.csv"


@pytest.mark.skipif(not TAOBAO.exists(), reason=f"no Taobao sample at {TAOBAO}")
def test_taobao_buys_alone_mature_labels_and_spread_scores(
    settings: Settings, make_worker: Any, kafka: str, triggers_topic: str
) -> None:
    orders = [e for e in read_events(TAOBAO, "taobao") if e["type"] == "purchase"][:1000]
    worker = make_worker(
        **ORDERS_ONLY,
        PROPSTREAM_TARGETS="purchase:1d",
        PROPSTREAM_EARLIEST_EVENT_TIME="2017-11-01T00:00:00Z",  # the sample is from Nov/Dec 2017
        PROPSTREAM_TOPIC_TRIGGERS=triggers_topic,
    ).start()
    seen = run_orders_only(settings, worker, kafka, orders, DAY, wall_s=15, want_trust=False)
    m = seen["model"]
    print(
        f"\norders only (Taobao buys): {len(orders)} orders, labels matured {seen['positive']:.0f} positive / "
        f"{seen['negative']:.0f} negative (bound {seen['bound']}), final version {m['version']}: "
        f"{m['trust']}, quality {m.get('quality')}"
    )
    assert worker.metric("propstream_events_accepted_total") == len(orders)
    assert seen["positive"] + seen["negative"] >= seen["bound"] > 50
    assert seen["positive"] > 0 and seen["negative"] > 0
    distinct = {round(s["score"], 4) for s in seen["scores"].values()}
    assert len(distinct) >= 10, f"scores barely differ between users: {sorted(distinct)}"


# --- replay, crash, rebalance ---------------------------------------------------------------------
def test_a_replay_publishes_the_same_changes_and_triggers_whatever_the_batch_size(
    settings: Settings, make_worker: Any, kafka: str, env: dict[str, str]
) -> None:
    publish_fixed(kafka, settings.topic_models)  # both applications follow the one models topic
    now = int(time.time() * 1000)
    start, span = now - 6 * DAY, 6 * DAY - HOUR
    events = random_events(41, users=40, per_user=40, start_ms=start, span_ms=span)
    route = user_router(settings.source_topics)  # a user's events on one topic: one arrival order
    send(kafka, [(route(e), e) for e in events] + ticks(clock_users(settings), start, start + span, 3 * HOUR))
    runs = []
    for name, batch in (("one", 1), ("many", 2000)):
        app = f"{env['PROPSTREAM_APP_ID']}-{name}"
        topics = {k: f"{env['PROPSTREAM_APP_ID']}-{name}.{k}" for k in ("changes", "triggers", "training")}
        w = make_worker(
            name,
            **FIXED,
            PROPSTREAM_APP_ID=app,
            PROPSTREAM_BATCH_SIZE=str(batch),
            **{f"PROPSTREAM_TOPIC_{k.upper()}": t for k, t in topics.items()},
        )
        runs.append((w.launch(), app, topics))
    # the events wait on the topics before either worker starts, as in any replay: both must score
    # every one of them with the models published before they started
    for w, _, _ in runs:
        wait_until(w.ready, 90, what=f"worker {w.url} ready")
        wait_until(lambda w=w: models_loaded(w), 60, what=f"the fixed models on {w.url}")
    t0 = time.monotonic()
    out = []
    stale = []  # outputs scored by a version that was never published: the untrained version 0
    for _, app, topics in runs:
        wait_settled(kafka, app, settings.source_topics, 240)
        got: dict[str, dict[str, list[dict[str, Any]]]] = {"changes": {}, "triggers": {}}
        for kind in got:
            for body in bodies(kafka, topics[kind]):
                (CHANGE if kind == "changes" else TRIGGER).validate(body)
                scores = [body] if kind == "changes" else list(body["scores"].values())
                if any(s["model_version"] not in VERSIONS.values() for s in scores):
                    stale.append((app, kind, body["user_id"], body["event_ts_ms"]))
                got[kind].setdefault(body["user_id"], []).append(without_wall(body))
        out.append(got)
    took = time.monotonic() - t0
    one, many = out
    n = {k: Counter(c.get("trigger") for bs in one[k].values() for c in bs) for k in one}
    print(f"\nreplay: {n} (batch size 1 settled {took:.0f} s after start-up)")
    assert n["changes"]["silence"] > 0 and n["changes"]["event"] > 0, n
    assert n["triggers"]["cart_abandoned"] > 0 and n["triggers"]["repeat_view_no_purchase"] > 0, n
    differ = {
        kind: sorted(u for u in set(one[kind]) | set(many[kind]) if one[kind].get(u) != many[kind].get(u))
        for kind in one
    }
    first = []
    for kind, users in differ.items():
        for u in users[:2]:
            a, b = one[kind].get(u, []), many[kind].get(u, [])
            i = next(i for i in range(max(len(a), len(b))) if a[i : i + 1] != b[i : i + 1])
            brief = [
                {k: v for k, v in x[i].items() if k != "top_factors"} if i < len(x) else None for x in (a, b)
            ]
            first.append((kind, u, f"message {i}", brief))
    counts = {k: len(v) for k, v in differ.items()}
    assert not any(differ.values()), (
        f"the two runs differ for {counts} users: {first}; "
        f"outputs scored by an unpublished model version: {len(stale)} {stale[:5]}"
    )
    assert not stale, stale[:10]


CART_USERS = 160


def cart_users(
    base: int, n: int, every_ms: int
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """``n`` users who browse, add one or two products and leave, one every ``every_ms``."""
    events = []
    by_user: dict[str, list[dict[str, Any]]] = {}
    for i in range(n):
        u, t = f"cart-{i}", base + i * every_ms
        evs = [
            ev(u, 0, "page_view", t),
            ev(u, 1, "add_to_cart", t + MIN, product_id=f"p{i % 5}", price=10.0 + i % 7, quantity=1 + i % 3),
        ]
        if i % 2:
            evs.append(
                ev(u, 2, "add_to_cart", t + 6 * MIN, product_id=f"p{(i + 1) % 5}", price=3.5, quantity=1)
            )
        events += evs
        by_user[u] = evs
    return events, by_user


def cart_done_in_changelog(kafka: str, app_id: str, users: set[str]) -> dict[str, int]:
    """Per user, the start of the last cart episode whose trigger fired, as the newest row on the
    features changelog says (``ScoreState.cart_done_ms``)."""
    out = {}
    for m in read_topic(kafka, f"{app_id}-features-changelog"):
        user = m.key.decode()
        if user in users and m.value:
            out[user] = decode_state(decode_row(m.value)[SCORES]).cart_done_ms
    return out


def test_a_sigkill_around_timer_firings_loses_no_cart_trigger(
    settings: Settings, make_worker: Any, kafka: str, triggers_topic: str
) -> None:
    rng = random.Random(run_seed())
    models = publish_fixed(kafka, settings.topic_models)
    extra = {**FIXED, **FAST_FAILOVER, "PROPSTREAM_TOPIC_TRIGGERS": triggers_topic}
    worker = make_worker(**extra).start()
    wait_until(lambda: models_loaded(worker), 60, what="the fixed models to be loaded")
    now = int(time.time() * 1000)
    base = now - now % MIN - DAY
    # abandoned from base + 31 min to base + 11 h 12 min, while the clock moves on to base + 12 h
    carts, by_user = cart_users(base, CART_USERS, 4 * MIN)
    end = base + 12 * HOUR
    route = router(settings)
    events, topic_of = in_time_order(
        [(route(e), e) for e in carts] + ticks(clock_users(settings), base, end, 5 * MIN)
    )
    want = {u: cart_trigger(models, u, evs) for u, evs in by_user.items()}
    assert max(w["event_ts_ms"] for w in want.values()) < end

    traffic = Traffic(kafka, topic_of, events, rate=len(events) / 40)
    traffic.start()
    kills = []  # (events sent, events this worker process consumed, triggers on the topic) at each kill

    def kill() -> None:
        consumed = worker.metric("propstream_events_consumed_total")
        kills.append((traffic.sent, int(consumed), len(read_topic(kafka, triggers_topic))))
        worker.kill()

    random_pause(rng, 3, 12)  # while the worker keeps up: triggers firing a few per batch
    kill()
    worker.start(timeout_s=120)  # same state folder
    random_pause(rng, 0.5, 6)  # while it catches up on the backlog: many triggers per batch
    kill()
    worker.start(timeout_s=120)
    traffic.hurry()  # both kills were mid-stream: the rest of the events need no pacing
    traffic.finish()
    wait_settled(kafka, settings.app_id, settings.source_topics, 120)  # every tick consumed, outputs flushed
    got = bodies(kafka, triggers_topic)
    print(f"\nkilled after {kills} of {len(events)} events sent; {len(got)} triggers for {len(want)} carts")
    missing = sorted(set(want) - {b["user_id"] for b in got}, key=lambda u: want[u]["event_ts_ms"])
    if missing:  # evidence for whoever fixes it: what the rows on the changelog say about these carts
        fired = cart_done_in_changelog(kafka, settings.app_id, set(missing))
        lost = [
            f"{u} due tick {(want[u]['event_ts_ms'] - base) // (5 * MIN)}, its row says the episode "
            f"{'fired' if fired.get(u) == want[u]['facts']['cart_started_ms'] else 'did not fire'}"
            for u in missing
        ]
        # and a worker with nothing but the changelogs, once the clock moves again, fires the ones
        # whose row on the changelog is still pending: the killed worker's disk had them as fired
        worker.kill()
        fresh = make_worker("fresh", **extra).start(timeout_s=180)
        wait_until(lambda: models_loaded(fresh), 60, what="the fixed models to be loaded")
        send(kafka, ticks(clock_users(settings), end + 5 * MIN, end + 30 * MIN, 5 * MIN))
        wait_settled(kafka, settings.app_id, settings.source_topics, 120)
        late = {b["user_id"] for b in bodies(kafka, triggers_topic)} & set(missing)
        dead = Counter(
            dict(m.headers)["propstream.reason"] for m in read_topic(kafka, settings.topic_deadletter)
        )
        raise AssertionError(
            f"{len(missing)} triggers lost ({len(got)} published): {lost}; a worker rebuilt from the "
            f"changelogs then fired {len(late)} of them: {sorted(late)}; dead letters: {dict(dead)}"
        )
    dups = check_at_least_once(got, want)
    print(f"duplicates: {dict(dups)}")


def test_timers_of_moved_partitions_fire_on_the_new_owner(
    settings: Settings, make_worker: Any, kafka: str, triggers_topic: str
) -> None:
    models = publish_fixed(kafka, settings.topic_models)
    extra = {**FIXED, "PROPSTREAM_TOPIC_TRIGGERS": triggers_topic}
    a = make_worker("a", **extra).start()
    wait_until(lambda: models_loaded(a), 60, what="the fixed models to be loaded")
    now = int(time.time() * 1000)
    base = now - now % MIN - DAY
    carts, by_user = cart_users(base, 80, 10_000)  # adds within base + 15 min: due by base + 50 min
    want = {u: cart_trigger(models, u, evs) for u, evs in by_user.items()}
    clock = clock_users(settings)
    route = router(settings)
    send(kafka, [(route(e), e) for e in carts] + ticks(clock, base - 10 * MIN, base + 25 * MIN, 5 * MIN))
    wait_settled(kafka, settings.app_id, settings.source_topics, 90)  # a has every cart, in the changelogs
    assert min(w["event_ts_ms"] for w in want.values()) > base + 25 * MIN
    assert bodies(kafka, triggers_topic) == []  # nothing was due yet: every timer is pending

    b = make_worker("b", **extra).start()

    def shared() -> dict[str, str] | None:
        status, body = a.get("/partitions")
        owners = body["owners"] if status == 200 else {}
        ok = a.ready() and b.ready() and set(owners.values()) == {a.url, b.url} and models_loaded(b)
        return owners if ok else None

    owners = wait_until(shared, 90, what="both workers to own partitions")
    send(kafka, ticks(clock, base + 30 * MIN, base + 3 * HOUR, 5 * MIN))
    read_until(
        kafka,
        triggers_topic,
        lambda ms: {m.key.decode() for m in ms} >= set(want),
        90,
        what="every expected cart_abandoned trigger",
    )
    wait_settled(kafka, settings.app_id, settings.source_topics, 90)
    assert shared() == owners, "the partitions moved again: the counts below would not say who fired"
    got = bodies(kafka, triggers_topic)
    dups = check_at_least_once(got, want)
    on_b = {u for u in want if owners[str(partition_of(u, settings.partitions))] == b.url}
    assert 0 < len(on_b) < len(want), on_b
    # the moved partitions' timers were fired and published by their new owner (and only by it)
    fired = {w.url: w.metric("propstream_triggers_total", trigger="cart_abandoned") for w in (a, b)}
    print(f"\nrebalance: owners {owners}; triggers published {fired}; duplicates {dict(dups)}")
    by_b = sum(t["user_id"] in on_b for t in got)
    assert fired == {b.url: by_b, a.url: len(got) - by_b}, fired
