"""Event-time timers through the worker's batch path: order, determinism under any batching, bounds.

The handler and score stage run exactly as the worker wires them (``streams.bench.core.build``);
what they publish is compared across batchings and with a brute-force schedule worked out here
from the events alone.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as hs

from models.timers import TimerConfig, next_due
from models.training import decode_message
from streams.bench.core import build, records_of, trained_models
from streams.cli_models import format_trigger
from streams.ingest import Record
from streams.settings import Settings
from tests.conftest import ROOT

MIN = 60_000
HOUR = 60 * MIN
T0 = 1_764_547_200_000  # 2025-12-01T00:00Z
NOW = (T0 + 40 * 86_400_000) / 1000  # the wall clock the worker runs at: after every event
SILENCE = (HOUR, 6 * HOUR)
CART_AFTER = 30 * MIN


def worker_settings(**extra: Any) -> Settings:
    base: dict[str, Any] = {
        "targets": "purchase:1h",
        "sample_every_s": 0,  # a snapshot at every event and every silence point: all observable
        "max_pending": 1000,
        "allowed_lateness_s": 0,
        "rescore_after": "1h,6h",
        "abandon_after_s": "30m",
        "min_positives": 0,
        "min_negatives": 0,
        "cooldown_s": 0,
        "min_delta": 0.001,
        "source_idle_s": 0,
        "idle_advance_s": 0,
        "partitions": 1,
    }
    return Settings(**{**base, **extra})


def stream(seed: int, users: int = 4, n: int = 120) -> list[dict[str, Any]]:
    """Events of a few users over two days, in time order, with quiet spells and carts."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    ts = T0
    for i in range(n):
        ts += rng.choice([MIN, 5 * MIN, 20 * MIN, 50 * MIN, 2 * HOUR, 7 * HOUR]) // users
        u = f"u{rng.randrange(users)}"
        kind = rng.choices(
            ["page_view", "product_view", "add_to_cart", "remove_from_cart", "purchase"], [5, 3, 3, 1, 1]
        )[0]
        ev: dict[str, Any] = {"event_id": f"e{i}", "user_id": u, "type": kind, "ts": ts}
        if kind != "page_view":
            ev["product_id"] = f"p{rng.randrange(2)}"
            ev["price"] = 10.0
        if kind == "purchase":
            ev["order_id"] = f"o{i}"
            ev["revenue"] = 10.0
        out.append(ev)
    # the clock passes every timer at the end: one event on each source topic, far later
    end = ts + 2 * 86_400_000
    for k, kind in enumerate(["page_view", "add_to_cart", "purchase"]):
        ev = {
            "event_id": f"end{k}",
            "user_id": "clock",
            "type": kind,
            "ts": end,
            "product_id": "z",
            "price": 1.0,
        }
        out.append({**ev, "order_id": "oz"} if kind == "purchase" else ev)
    return out


_MODELS: dict[str, Any] = {}


def models() -> dict[str, Any]:
    """Fixed trained models (no learning in the stage): built once, shared by every run."""
    if not _MODELS:
        _MODELS.update(trained_models(worker_settings()))
    return _MODELS


def run(
    records: list[Record], sizes: list[int], s: Settings, ticks: list[int] | None = None
) -> dict[str, list[Any]]:
    """Outputs of ``records`` cut into batches of ``sizes``; with ``ticks``, idle-clock ticks after
    the last batch until one works on no partition (their number is appended to ``ticks``)."""
    changes: list[bytes] = []
    triggers: list[bytes] = []
    examples: list[bytes] = []
    h = build(s, changes=changes, triggers=triggers, examples=examples, models=models(), clock=lambda: NOW)
    i = 0
    for n in sizes * (len(records) // max(1, sum(sizes)) + 1):
        if i >= len(records):
            break
        h.process(records[i : i + n])
        i += n
    if ticks is not None:
        ticks.append(0)
        while h.tick():
            ticks[-1] += 1
    return {
        "changes": sorted(_without_wall(c) for c in changes),
        "triggers": sorted(_without_wall(t) for t in triggers),
        "examples": sorted((m.ts_ms, m.label, m.score) for m in map(decode_message, examples)),
    }


def _without_wall(raw: bytes) -> str:
    body = msgspec.json.decode(raw)
    for k in ("emit_ts_ms", "emitted_at"):
        body.pop(k)
    return json.dumps(body, sort_keys=True)


def brute_force(events: list[dict[str, Any]]) -> tuple[list[int], list[tuple[str, int]]]:
    """Silence points and cart abandonments from the events alone (one in-order stream).

    Silence: for each user and each quiet spell after an event at ``t``, the points ``t + s`` that
    come before the user's next event (or the end of the stream). Cart: per user, walking the
    events, a non-empty cart untouched for CART_AFTER with no purchase fires once per episode.
    """
    by_user: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e)
    end = max(e["ts"] for e in events)
    silence: list[int] = []
    carts: list[tuple[str, int]] = []
    for u, evs in by_user.items():
        for a, b in zip(evs, [*evs[1:], None], strict=True):
            nxt = b["ts"] if b is not None else end + 1
            silence += [a["ts"] + s for s in SILENCE if a["ts"] + s < nxt and a["ts"] + s <= end]
        qty: dict[str, int] = {}
        episode_fired = False
        changed = 0
        for a, b in zip(evs, [*evs[1:], None], strict=True):
            if a["type"] == "purchase":
                qty, episode_fired = {}, False
            elif a["type"] in ("add_to_cart", "remove_from_cart"):
                was = sum(max(q, 0) for q in qty.values())
                p = a["product_id"]
                qty[p] = qty.get(p, 0) + (1 if a["type"] == "add_to_cart" else -1)
                if was == 0 and sum(max(q, 0) for q in qty.values()) > 0:
                    episode_fired = False  # a new episode
                changed = a["ts"]
            items = sum(max(q, 0) for q in qty.values())
            nxt = b["ts"] if b is not None else end + 1
            due = changed + CART_AFTER
            # the next event comes after the due time (or is the end): nothing can cancel it before
            if items > 0 and not episode_fired and due < nxt and due <= end:
                carts.append((u, due))
                episode_fired = True
    return sorted(silence), sorted(carts)


@pytest.mark.parametrize("seed", range(3))
def test_timers_fire_at_the_brute_force_times(seed: int) -> None:
    s = worker_settings(triggers="cart_abandoned")
    events = stream(seed)
    got = run(records_of(events, s), [17], s)
    silence, carts = brute_force(events)
    assert carts, "no abandoned cart in this stream: the test would prove little"
    assert sorted((json.loads(t)["user_id"], json.loads(t)["event_ts_ms"]) for t in got["triggers"]) == carts
    end = max(e["ts"] for e in events)
    # a snapshot at every event and at every silence point (sample_every_s=0), each labelled once
    # when the clock passed its 1 h horizon
    want = [ts for ts in [e["ts"] for e in events] + silence if ts + HOUR < end]
    assert sorted(ts for ts, _, _ in got["examples"]) == sorted(want)
    for t in map(json.loads, got["triggers"]):
        assert t["trigger_id"] == f"cart_abandoned:{t['event_ts_ms']}" and t["facts"]["cart_items"] >= 1
    assert any(json.loads(c)["trigger"] == "silence" for c in got["changes"])


def test_published_changes_and_triggers_validate_and_read_as_one_line() -> None:
    s = worker_settings()
    events = stream(1)
    changes: list[bytes] = []
    triggers: list[bytes] = []
    build(s, changes=changes, triggers=triggers, models=models(), clock=lambda: NOW).process(
        records_of(events, s)
    )
    schemas = ROOT / "streams" / "schemas"
    change_schema = json.loads((schemas / "change.schema.json").read_text())
    trigger_schema = json.loads((schemas / "trigger.schema.json").read_text())
    kinds = set()
    for raw in changes:
        jsonschema.validate(json.loads(raw), change_schema)
    for raw in triggers:
        body = json.loads(raw)
        jsonschema.validate(body, trigger_schema)
        kinds.add(body["trigger"])
        line = format_trigger(body)
        assert body["user_id"] in line and body["trigger"] in line and body["event_time"][:19] in line
    assert kinds == {"cart_abandoned", "repeat_view_no_purchase"}, kinds
    assert {json.loads(c)["trigger"] for c in changes} == {"event", "silence"}


@hyp_settings(max_examples=15, deadline=None)
@given(seed=hs.integers(0, 10_000), sizes=hs.lists(hs.integers(1, 60), min_size=1, max_size=5))
def test_any_batching_publishes_the_same_changes_triggers_and_examples(seed: int, sizes: list[int]) -> None:
    s = worker_settings()
    records = records_of(stream(seed, n=60), s)
    assert run(records, sizes, s) == run(records, [len(records)], s)


def test_a_fire_limit_defers_timers_to_later_batches_and_ticks_without_changing_any_output() -> None:
    s = worker_settings()
    records = records_of(stream(7, users=12, n=80), s)
    want = run(records, [len(records)], s)
    assert len(want["triggers"]) + len(want["changes"]) > 20, "too few timers: the check would prove little"
    ticks: list[int] = []
    limited = run(records, [len(records)], worker_settings(timer_fires_per_batch=1), ticks)
    assert limited == want
    assert ticks[0] >= 5, f"one timer per batch, yet only {ticks[0]} ticks had work left"


def test_a_purchase_or_an_emptied_cart_cancels_the_trigger_and_it_fires_once_per_episode() -> None:
    s = worker_settings(triggers="cart_abandoned", rescore_after="")

    def ev(i: int, kind: str, minute: int, product: str = "p") -> dict[str, Any]:
        e = {
            "event_id": f"c{i}",
            "user_id": "u",
            "type": kind,
            "ts": T0 + minute * MIN,
            "product_id": product,
            "price": 5.0,
        }
        return {**e, "order_id": f"o{i}"} if kind == "purchase" else e

    events = [
        ev(1, "add_to_cart", 0),
        ev(2, "purchase", 20),  # bought within 30 min: cancelled
        ev(3, "add_to_cart", 100),
        ev(4, "remove_from_cart", 110),  # emptied: cancelled
        ev(5, "add_to_cart", 200),  # a new episode, abandoned at 230
        ev(6, "add_to_cart", 300, "q"),  # the same episode, changed again: no second trigger
        ev(7, "page_view", 400),
    ]
    events += [e for e in stream(0, users=1, n=0)]  # the end-of-stream clock events
    got = run(records_of(events, s), [1], s)
    assert [json.loads(t)["event_ts_ms"] for t in got["triggers"]] == [T0 + 230 * MIN]
    [t] = map(json.loads, got["triggers"])
    assert t["facts"]["lines"] == [{"product_id": "p", "quantity": 1, "price": 5.0}]
    assert t["facts"]["cart_value"] == 5.0 and set(t["scores"]) == {"purchase"}


def test_timers_are_bounded_per_user() -> None:
    cfg = TimerConfig(silence_ms=SILENCE, cart_after_ms=CART_AFTER)
    from features.state import UserState

    st = UserState(last_ms=T0, cart=[(T0, "p", 1, 1.0)])
    fired = []
    quiet_from, done, cart_done = 0, 0, 0
    while (d := next_due(cfg, st, quiet_from, done, cart_done)) is not None:
        fired.append(d.kind)
        if d.kind == "silence":
            done = (done if quiet_from == st.last_ms else 0) + 1
            quiet_from = st.last_ms
        else:
            cart_done = d.cart.start_ms  # type: ignore[union-attr]
        assert len(fired) <= 10
    assert fired == ["cart_abandoned", "silence", "silence"]  # one per silence point, one per episode


def test_a_repeat_view_fires_once_per_product_and_day() -> None:
    s = worker_settings(rescore_after="", triggers="repeat_view_no_purchase")
    views = [
        {
            "event_id": f"v{i}",
            "user_id": "u",
            "type": "product_view",
            "ts": T0 + i * 10 * MIN,
            "product_id": "p",
            "price": 9.5,
        }
        for i in range(6)
    ]
    got = run(records_of(views, s), [2], s)
    [t] = map(json.loads, got["triggers"])
    assert (t["trigger"], t["event_ts_ms"], t["facts"]) == (
        "repeat_view_no_purchase",
        T0 + 20 * MIN,
        {"product_id": "p", "views_24h": 3, "price": 9.5},
    )
