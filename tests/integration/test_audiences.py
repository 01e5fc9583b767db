"""Audiences on a real broker with two workers sharing the partitions.

- the compacted audience topic holds exactly the members a recount from the produced events gives;
- users who go quiet leave ``active`` by their silence timer, with a tombstone saying so;
- ``GET /audiences`` and the paginated ``GET /audiences/{name}`` answer the same through either
  worker (each merges the other's partitions), and ``propstream audience export`` writes them.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import time
from typing import Any

import jsonschema
import pytest

from streams.settings import Settings
from tests.conftest import ROOT
from tests.integration.harness import WorkerProc, read_topic, wait_settled, wait_until
from tests.integration.test_timers import (
    DAY,
    FIXED,
    HOUR,
    MIN,
    clock_users,
    ev,
    models_loaded,
    publish_fixed,
    send,
    ticks,
)

pytestmark = pytest.mark.integration

# slipping reads the hand-set churn model (tests/integration/test_timers.py): 0.026 one hour after
# a user's last event, 0.94 after a day, so a quiet user enters it at the 2 d silence point
AUDIENCES = "busy: n_events_7d >= 3; active: n_events_24h >= 3; viewer: n_product_view_7d >= 1; slipping: churn >= 0.5"
SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "streams" / "schemas" / "audience.schema.json").read_text()),
    format_checker=jsonschema.FormatChecker(),
)


def held(messages: list[Any]) -> dict[str, set[str]]:
    """What a consumer of the compacted topic holds: per audience, keys whose last value is not null."""
    last: dict[bytes, bytes | None] = {}
    for m in messages:
        last[m.key] = m.value
    out: dict[str, set[str]] = {}
    for key, value in last.items():
        name, _, user = key.decode().partition("|")
        if value is not None:
            out.setdefault(name, set()).add(user)
    return out


def export_pages(worker: WorkerProc, name: str, limit: int) -> list[str]:
    """Every member through one worker, following the cursor page by page."""
    users: list[str] = []
    cursor = ""
    for _ in range(1000):
        status, page = worker.get(
            f"/audiences/{name}?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        )
        assert status == 200, page
        users += [u["user_id"] for u in page["users"]]
        if page["next"] is None:
            return users
        cursor = page["next"]
    raise AssertionError("the cursor never ended")


def test_two_workers_hold_the_recounted_members_and_either_exports_them(
    settings: Settings, make_worker: Any, kafka: str, tmp_path: Any
) -> None:
    publish_fixed(kafka, settings.topic_models)
    extra = {**FIXED, "PROPSTREAM_AUDIENCES": AUDIENCES, "PROPSTREAM_RESCORE_AFTER": "1h,2d"}
    a = make_worker("a", **extra).start()
    b = make_worker("b", **extra).start()

    def shared() -> bool:
        status, body = a.get("/partitions")
        return status == 200 and len({o for o in body["owners"].values() if o}) == 2 and b.ready()

    wait_until(shared, 90, what="both workers to own partitions")
    wait_until(lambda: models_loaded(a) and models_loaded(b), 60, what="the fixed models on both workers")
    now = int(time.time() * 1000)
    base = now - now % MIN - 4 * DAY
    users: dict[str, list[dict[str, Any]]] = {}
    for i in range(40):  # 0 to 4 events each, a few minutes apart; every third views a product
        u = f"u{i}"
        users[u] = [
            ev(u, j, "product_view", base + j * MIN, product_id="p1", price=2.0)
            if i % 3 == 0
            else ev(u, j, "page_view", base + j * MIN)
            for j in range(i % 5)
        ]
    clocks = clock_users(settings)
    end = base + 3 * DAY  # past every u's 1 h and 2 d silence points
    items = [(t, e) for u, evs in users.items() for e in evs for t in [settings.topic_clickstream]]
    items += ticks(clocks, base - 30 * MIN, end, HOUR)
    send(kafka, items)
    wait_settled(kafka, settings.app_id, settings.source_topics, 120)  # all consumed, outputs flushed

    # the recount, from the produced events alone
    counts = {u: len(evs) for u, evs in users.items() if evs}
    ticks_per_clock = len(range(base - 30 * MIN, end + 1, HOUR))
    counts.update(dict.fromkeys(clocks, ticks_per_clock))
    busy = {u for u, n in counts.items() if n >= 3}
    active = set(clocks)  # the u users went quiet: their 2 d silence point emptied their 24 h
    viewer = {u for u, evs in users.items() if any(e["type"] == "product_view" for e in evs)}
    slipping = {u for u, evs in users.items() if evs}  # quiet two days: churn 0.94 and more
    messages = read_topic(kafka, settings.topic_audiences)
    assert held(messages) == {"busy": busy, "active": active, "viewer": viewer, "slipping": slipping}

    # each quiet user entered slipping by its 2 d silence point, not by an event
    entered = [json.loads(m.value) for m in messages if m.key.decode().startswith("slipping|") and m.value]
    assert sorted(e["user_id"] for e in entered) == sorted(slipping)  # once each
    for e in entered:
        SCHEMA.validate(e)
        assert e["trigger"] == "silence" and e["event_ts_ms"] == users[e["user_id"]][-1]["ts"] + 2 * DAY
        assert e["scores"]["churn"] >= 0.5

    # every busy u entered active on its third event and left by its 2 d silence point
    quiet = {u for u in busy if u.startswith("u")}
    left = [m for m in messages if m.value is None and m.key.decode().startswith("active|")]
    headers = {m.key.decode().split("|")[1]: {k: v.decode() for k, v in m.headers} for m in left}
    assert set(headers) == quiet
    for u, h in headers.items():
        last_ms = users[u][-1]["ts"]
        assert (h["propstream.event"], h["propstream.trigger"], h["propstream.reason"]) == (
            "left",
            "silence",
            "condition",
        )
        assert int(h["propstream.event_ts_ms"]) == last_ms + 2 * DAY

    # either worker answers for the whole deployment
    for w in (a, b):
        status, body = w.get("/audiences")
        assert status == 200, body
        sizes = {x["name"]: x["members"] for x in body["audiences"]}
        assert sizes == {
            "busy": len(busy),
            "active": len(active),
            "viewer": len(viewer),
            "slipping": len(slipping),
        }
        [est] = [x for x in body["audiences"] if x["name"] == "slipping"]
        assert est["estimated_by"] == "churn"
        assert (
            len(slipping) * 0.5 <= est["expected_converters"] <= len(slipping)
        )  # each member's churn >= 0.5
        assert body["missing_partitions"] == [] and body["complete"] is True
        exported = export_pages(w, "busy", limit=7)
        assert sorted(exported) == sorted(busy)  # each member once, none missing

    out = tmp_path / "busy.csv"
    result = b.cli("audience", "export", "busy", "--format", "csv", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["user_id"] for r in rows} == busy and len(rows) == len(busy)
    assert {"purchase", "churn"} <= set(rows[0])

    status, body = a.get("/audiences/nobody")
    assert status == 404 and body["error"] == "unknown_audience"
    status, body = b.get("/audiences/busy?cursor=not-a-cursor")
    assert status == 400 and body["error"] == "bad_cursor"
    status, body = b.get("/audiences/busy?partition=99")
    assert status == 400 and body["error"] == "bad_partition"


def test_a_bad_definition_stops_the_worker_at_start_with_the_column(make_worker: Any) -> None:
    w = make_worker("bad", PROPSTREAM_AUDIENCES="hot: purchase >= 0.6 and n_evnts_24h > 3")
    result = w.cli("worker", timeout_s=60)
    assert result.returncode != 0
    assert "PROPSTREAM_AUDIENCES: audience 'hot', column 21: unknown field 'n_evnts_24h'" in result.stderr


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_pseudonymous_members_export_reidentified_and_erasure_tombstones_every_audience(
    settings: Settings, make_worker: Any, kafka: str, tmp_path: Any, guarantee: str
) -> None:
    """Exactly-once too: entries leave in the checkpoint's transaction (read_committed here)."""
    key = "k3y"
    extra = {
        **FIXED,
        "PROPSTREAM_AUDIENCES": "busy: n_events_7d >= 3; seen: n_events_7d >= 1",
        "PROPSTREAM_PROCESSING_GUARANTEE": guarantee,
    }
    w = make_worker("p", PROPSTREAM_PSEUDONYMIZE_KEY=key, **extra).start()
    now = int(time.time() * 1000)
    people = ["alice", "bob", "carol"]
    items = [
        (settings.topic_clickstream, ev(u, j, "page_view", now - 10 * MIN + j * MIN))
        for u in people
        for j in range(3)
    ]
    send(kafka, items)
    wait_settled(kafka, settings.app_id, settings.source_topics, 60)
    # the pseudonym from its documented definition (HMAC-SHA256 of the id, 32 hex digits), not by propstream
    pseudo = {u: hmac.new(key.encode(), u.encode(), hashlib.sha256).hexdigest()[:32] for u in people}
    assert held(read_topic(kafka, settings.topic_audiences))["busy"] == set(pseudo.values())

    ids = tmp_path / "crm-ids.txt"
    ids.write_text("alice\nbob\nsomeone-else\n")
    out = tmp_path / "busy.jsonl"
    result = w.cli(
        "audience", "export", "busy", "--format", "jsonl", "--out", str(out), "--reidentify", str(ids)
    )
    assert result.returncode == 0, result.stderr
    rows = {(r["user_id"], r["reidentified"]) for r in map(json.loads, out.read_text().splitlines())}
    assert rows == {("alice", True), ("bob", True), (pseudo["carol"], False)}

    assert w.cli("forget", "alice").returncode == 0
    wait_until(
        lambda: bool(read_topic(kafka, settings.topic_erasure_done)), 60, what="the erasure to be confirmed"
    )
    messages = read_topic(kafka, settings.topic_audiences)
    gone = {m.key.decode() for m in messages if m.value is None}
    assert gone == {f"busy|{pseudo['alice']}", f"seen|{pseudo['alice']}"}
    reasons = {dict(m.headers)["propstream.reason"] for m in messages if m.value is None}
    assert reasons == {b"erasure"}
    assert held(messages) == {
        "busy": {pseudo["bob"], pseudo["carol"]},
        "seen": {pseudo["bob"], pseudo["carol"]},
    }
    status, body = w.get("/audiences")
    assert status == 200 and {a["name"]: a["members"] for a in body["audiences"]} == {"busy": 2, "seen": 2}
