"""Audience definitions: the grammar and its errors, membership semantics, the partition figures,
and membership through the worker's batch path (entered / left, timers, any batching)."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import jsonschema
import pytest
from hypothesis import example, given
from hypothesis import strategies as hs

from features.catalogue import NAMES
from models.audience_stats import PartitionStats, ScoreHistogram
from models.audiences import AudienceError, Cut, View, members, parse_audiences, score_bin
from streams.bench.core import build, records_of, trained_models
from streams.settings import Settings
from tests.conftest import ROOT

TARGETS = ["purchase", "churn"]
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T0 = 1_764_547_200_000  # 2025-12-01T00:00Z
NOW = (T0 + 40 * DAY) / 1000


def parse(text: str) -> list[Any]:
    return list(parse_audiences(text, TARGETS, NAMES))


def view(scores: dict[str, float] | None = None, tiers: dict[str, int] | None = None, **feats: Any) -> View:
    return View(scores or {"purchase": 0.5, "churn": 0.1}, tiers or {"purchase": 1, "churn": 0}, feats, {})


TRUSTED = {"purchase": True, "churn": True}


# --- grammar and semantics -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("condition", "v", "expected"),
    [
        ("purchase >= 0.6", view({"purchase": 0.6, "churn": 0}), True),
        ("purchase >= 0.6", view({"purchase": 0.59, "churn": 0}), False),
        ("purchase > 0.5 and churn < 0.2", view({"purchase": 0.7, "churn": 0.1}), True),
        ("purchase > 0.5 and churn < 0.2", view({"purchase": 0.7, "churn": 0.3}), False),
        ("purchase > 0.9 or churn >= 0.3", view({"purchase": 0.1, "churn": 0.3}), True),
        ("not (purchase > 0.9 or churn >= 0.3)", view({"purchase": 0.1, "churn": 0.3}), False),
        ("purchase.tier >= medium", view(tiers={"purchase": 1, "churn": 0}), True),
        ("purchase.tier == high", view(tiers={"purchase": 1, "churn": 0}), False),
        ("churn.tier != low", view(tiers={"purchase": 2, "churn": 0}), False),
        ("n_purchase_30d >= 2", view(n_purchase_30d=2), True),
        ("n_purchase_30d >= 2", view(n_purchase_30d=1), False),
        ("in_session", view(in_session=True), True),
        ("in_session == false", view(in_session=False), True),
        ("not in_session", view(in_session=False), True),
        # a null feature (never bought) fails every comparison, and so its negation holds
        ("s_since_last_purchase < 3600", view(s_since_last_purchase=None), False),
        ("s_since_last_purchase >= 3600", view(s_since_last_purchase=None), False),
        ("not s_since_last_purchase < 3600", view(s_since_last_purchase=None), True),
        # and binds tighter than or
        (
            "purchase > 0.9 or churn > 0.9 and in_session",
            view({"purchase": 0.95, "churn": 0}, in_session=False),
            True,
        ),
    ],
)
def test_conditions_mean_what_they_say(condition: str, v: View, expected: bool) -> None:
    (a,) = parse(f"x: {condition}")
    assert a.test(v) is expected


def test_definitions_split_on_semicolons_and_lines_and_keep_their_order() -> None:
    auds = parse("a: purchase >= 0.5;\n b: in_session\n\n c: churn top 5%")
    assert [a.name for a in auds] == ["a", "b", "c"]
    assert [a.primary for a in auds] == ["purchase", None, "churn"]
    assert auds[2].cuts == (Cut("churn", True, 5.0),)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("hot: purchse >= 0.6", "column 1: unknown field 'purchse' (did you mean 'purchase'?)"),
        ("hot: purchase >= 0.6 and n_evnts_24h > 3", "column 21: unknown field 'n_evnts_24h'"),
        ("hot: purchase >= 1.5", "column 13: a score is in [0, 1]"),
        ("hot: purchase.tier >= 2", "column 18: a tier compares with low, medium or high"),
        ("hot: purchase.score > 0.1", "column 1: 'purchase' has no field 'score'"),
        ("hot: in_session.tier == low", "only a target has .tier"),
        ("hot: purchase >= 0.6 and", "column 20: expected a target, a feature or '(', found the end"),
        ("hot: (purchase >= 0.6", "column 17: expected ')'"),
        ("hot: purchase >= 0.6 churn", "column 17: expected 'and', 'or' or the end"),
        ("hot: purchase = 0.6", "column 10: unexpected character '='"),
        ("hot: purchase top 0%", "a percentile is above 0 and below 100"),
        ("hot: purchase top ten", "a percentile is written 'purchase top 10%'"),
        ("hot:", "the condition is empty"),
        ("hot purchase >= 0.6", "is not NAME: CONDITION"),
        ("Hot: purchase >= 0.6", "audience name 'Hot' must be lower case"),
        ("a: in_session; a: in_session", "audience 'a' is defined twice"),
    ],
)
def test_a_bad_definition_names_the_audience_the_column_and_the_cause(text: str, fragment: str) -> None:
    with pytest.raises(AudienceError) as exc:
        parse(text)
    assert fragment in str(exc.value)


def test_settings_refuse_a_bad_definition_at_start_up() -> None:
    with pytest.raises(ValueError, match="PROPSTREAM_AUDIENCES: audience 'hot', column 1: unknown field"):
        Settings(audiences="hot: purchse >= 0.6")


def test_a_definition_over_an_untrusted_target_has_no_members() -> None:
    auds = parse("a: purchase >= 0.1; b: in_session; c: churn >= 0 or in_session")
    v = view({"purchase": 0.9, "churn": 0.9}, in_session=True)
    assert members(auds, v) == ["a", "b", "c"]
    assert members(auds, v, ["purchase"]) == ["b", "c"]
    assert members(auds, v, ["churn"]) == ["a", "b"]


def test_a_percentile_admits_by_the_cut_keeps_by_the_looser_one_and_nobody_without_one() -> None:
    (a,) = parse("x: purchase top 10%")
    cut = Cut("purchase", True, 10.0)
    cuts = {cut: (score_bin(0.8), score_bin(0.75))}  # enter at 0.8, stay down to 0.75
    assert a.test(View({"purchase": 0.8}, {}, {}, cuts)) is True
    assert a.test(View({"purchase": 0.7999}, {}, {}, cuts)) is False
    assert a.test(View({"purchase": 0.7999}, {}, {}, cuts, was=["x"])) is True  # a member stays
    assert a.test(View({"purchase": 0.7499}, {}, {}, cuts, was=["x"])) is False
    assert a.test(View({"purchase": 0.99}, {}, {}, {})) is False
    (b,) = parse("y: churn bottom 20%")
    low = {Cut("churn", False, 20.0): (score_bin(0.1), score_bin(0.15))}
    assert b.test(View({"churn": 0.1}, {}, {}, low)) is True
    assert b.test(View({"churn": 0.12}, {}, {}, low)) is False
    assert b.test(View({"churn": 0.12}, {}, {}, low, was=["y"])) is True


# --- the partition's figures -------------------------------------------------------------------
@given(hs.lists(hs.floats(0, 1), min_size=1, max_size=300), hs.sampled_from([1.0, 5.0, 10.0, 50.0, 90.0]))
@example([0.0] * 7 + [1.0] * 7, 50.0)  # 50 * (14 / 100) is 7.000000000000001: the cut once took all 14
def test_a_percentile_cut_holds_at_least_its_share_and_no_more_than_its_bin_adds(
    scores: list[float], pct: float
) -> None:
    h = ScoreHistogram()
    for s in scores:
        h.add(s)
    bins = sorted((score_bin(s) for s in scores), reverse=True)
    [top] = h.cuts(True, [pct]) or [0]
    want = len(scores) * pct / 100
    inside = sum(b >= top for b in bins)
    assert inside >= want  # at least the share asked for...
    assert sum(b > top for b in bins) < want  # ...and without the cut's own bin, less than it
    [bottom] = h.cuts(False, [pct]) or [0]
    assert sum(b <= bottom for b in bins) >= want > sum(b < bottom for b in bins)


def test_partition_figures_follow_users_in_and_out() -> None:
    auds = parse("hot: purchase >= 0.5; busy: in_session; top: purchase top 50%")
    stats = PartitionStats(auds, TARGETS)
    stats.add({"purchase": 0.8, "churn": 0.1}, ["hot", "busy"])
    stats.add({"purchase": 0.6, "churn": 0.2}, ["hot"])
    stats.add({"purchase": 0.8, "churn": 0.1}, ["hot", "busy"], sign=-1)
    stats.add({"purchase": 0.3, "churn": 0.1}, ["busy", "removed_definition"])
    assert stats.size == {"hot": 1, "busy": 1, "top": 0}
    assert stats.expected["hot"] == pytest.approx(0.6)  # the one member's purchase score
    assert stats.expected["busy"] == 0.0  # reads no target: nothing to estimate with
    assert set(stats.histograms) == {"purchase"}  # only what a percentile reads
    assert stats.histograms["purchase"].n == 2  # 0.6 and 0.3 remain
    assert stats.cuts() == {Cut("purchase", True, 50.0): (score_bin(0.6), score_bin(0.3))}


# --- through the worker's batch path -----------------------------------------------------------
def worker_settings(**extra: Any) -> Settings:
    base: dict[str, Any] = {
        "targets": "purchase:1h",
        "allowed_lateness_s": 0,
        "rescore_after": "1h,2d",
        "min_positives": 0,
        "min_negatives": 0,
        "trust_min_auc_lower": 0,
        "trust_max_ece": 1,
        "source_idle_s": 0,
        "idle_advance_s": 0,
        "partitions": 1,
        "audiences": "busy: n_events_24h >= 3; buyer: n_purchase_30d >= 1; hot: purchase top 20%",
        "audience_cooldown_s": 0,  # every move at once: membership as of each evaluation
    }
    return Settings(**{**base, **extra})


def events(
    seed: int, users: int = 12, n: int = 150, steps: tuple[int, ...] = (MIN, 10 * MIN, HOUR, 5 * HOUR)
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    ts = T0
    for i in range(n):
        ts += rng.choice(steps)
        kind = rng.choices(["page_view", "product_view", "purchase"], [6, 3, 1])[0]
        ev: dict[str, Any] = {
            "event_id": f"e{i}",
            "user_id": f"u{rng.randrange(users)}",
            "type": kind,
            "ts": ts,
        }
        if kind != "page_view":
            ev["product_id"] = "p1"
            ev["price"] = 10.0
        if kind == "purchase":
            ev["order_id"] = f"o{i}"
            ev["revenue"] = 10.0
        out.append(ev)
    return out


_MODELS: dict[str, Any] = {}


def run(
    evs: list[dict[str, Any]], size: int, s: Settings
) -> list[tuple[bytes, bytes | None, dict[str, str]]]:
    if not _MODELS:
        _MODELS.update(trained_models(s))
    out: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = []
    h = build(s, audience=out, models=_MODELS, clock=lambda: NOW)
    recs = records_of(evs, s)
    for i in range(0, len(recs), size):
        h.process(recs[i : i + size])
    return [(k, v, {n: x.decode() for n, x in hd}) for k, v, hd in out]


def membership(moves: list[tuple[bytes, bytes | None, dict[str, str]]]) -> set[str]:
    """What a consumer of the compacted topic holds: keys whose last message is not a tombstone."""
    last: dict[bytes, bytes | None] = {}
    for k, v, _ in moves:
        last[k] = v
    return {k.decode() for k, v in last.items() if v is not None}


def test_busy_and_buyer_membership_equal_a_recount_from_the_events() -> None:
    s = worker_settings(rescore_after="")  # no silence points: membership as of each user's last event
    evs = events(1)
    moves = run(evs, 40, s)
    # recount from the events alone: as of each user's last event, events in the 24 hour buckets
    # ending at that event's hour (features.md: n_events_24h), and any purchase in 90 days
    last: dict[str, int] = {}
    for e in evs:
        last[e["user_id"]] = e["ts"]
    busy, buyer = set(), set()
    for u, t in last.items():
        first_bucket = t // HOUR - 23
        if sum(1 for e in evs if e["user_id"] == u and e["ts"] // HOUR >= first_bucket) >= 3:
            busy.add(f"busy|{u}")
        if any(e["user_id"] == u and e["type"] == "purchase" for e in evs):
            buyer.add(f"buyer|{u}")
    held = membership(moves)
    assert {k for k in held if k.startswith("busy|")} == busy
    assert {k for k in held if k.startswith("buyer|")} == buyer
    assert busy and buyer and len(busy) < len(last)  # the stream exercises both sides


def test_membership_events_are_the_same_however_the_stream_is_batched() -> None:
    s = worker_settings(audiences="busy: n_events_24h >= 3; buyer: n_purchase_30d >= 1")
    evs = events(2)
    runs = [per_key(run(evs, size, s)) for size in (1, 7, 500)]
    assert runs[0] == runs[1] == runs[2]
    assert any(v is None for msgs in runs[0].values() for v, _ in msgs)  # someone left, too


def per_key(moves: list[tuple[bytes, bytes | None, dict[str, str]]]) -> dict[bytes, list[Any]]:
    """Each key's messages in order (a batch orders its users by partition and arrival, and
    Kafka orders only within a key)."""
    out: dict[bytes, list[Any]] = {}
    for k, v, h in moves:
        out.setdefault(k, []).append((v, h))
    return out


def test_a_quiet_user_leaves_by_the_silence_timer_with_a_tombstone() -> None:
    s = worker_settings(audiences="busy: n_events_24h >= 3")
    quiet = [{"event_id": f"q{i}", "user_id": "q", "type": "page_view", "ts": T0 + i * MIN} for i in range(3)]
    # the partition's clock is the least of its topics': one event on each moves it past the timers
    clock = [
        {
            "event_id": f"c{i}",
            "user_id": "other",
            "type": t,
            "ts": T0 + 3 * DAY,
            "product_id": "p",
            "price": 1.0,
        }
        for i, t in enumerate(["page_view", "add_to_cart", "purchase"])
    ]
    clock[2]["order_id"] = "o1"
    moves = run(quiet + clock, 10, s)
    mine = [(v, h) for k, v, h in moves if k == b"busy|q"]
    assert [h["propstream.event"] for _, h in mine] == ["entered", "left"]
    entered, left = mine
    assert left[0] is None  # the tombstone
    assert left[1]["propstream.trigger"] == "silence"
    assert int(left[1]["propstream.event_ts_ms"]) == T0 + 2 * MIN + 2 * DAY  # the 2d point, not the clock
    body = json.loads(entered[0])
    schema = json.loads((ROOT / "streams/schemas/audience.schema.json").read_text())
    jsonschema.validate(body, schema)
    assert body["event_ts_ms"] == T0 + 2 * MIN and body["trigger"] == "event" and body["event_id"] == "q2"


def test_a_top_percentile_audience_holds_about_its_share_of_users() -> None:
    s = worker_settings(audiences="hot: purchase top 20%", rescore_after="")
    evs = events(3, users=200, n=4000, steps=(MIN, 2 * MIN))  # about 20 events a user
    held = membership(run(evs, 100, s))
    users = len({e["user_id"] for e in evs})
    # each member met the cut of its last batch: the share is about 20%, not exactly
    assert 0.1 * users <= len(held) <= 0.35 * users, (len(held), users)


def test_no_definitions_publish_nothing() -> None:
    s = worker_settings(audiences="")
    assert run(events(4), 50, s) == []


def test_counts_of_moves_balance_per_key() -> None:
    moves = run(events(5), 25, worker_settings(rescore_after="1h"))
    kinds = Counter((k, h["propstream.event"]) for k, _, h in moves)
    for (k, kind), n in kinds.items():
        other = kinds.get((k, "left" if kind == "entered" else "entered"), 0)
        assert abs(n - other) <= 1  # entered and left alternate per key


def test_a_move_within_the_cooldown_waits_for_the_next_evaluation_after_it() -> None:
    s = worker_settings(audiences="carting: cart_value > 0", audience_cooldown_s="15m", rescore_after="")
    cart = {"product_id": "p1", "price": 5.0, "quantity": 1}
    evs = [
        {"event_id": "a", "user_id": "c", "type": "add_to_cart", "ts": T0, **cart},
        {
            "event_id": "r",
            "user_id": "c",
            "type": "remove_from_cart",
            "ts": T0 + 2 * MIN,
            **cart,
        },  # empty: too soon
        {"event_id": "v1", "user_id": "c", "type": "page_view", "ts": T0 + 10 * MIN},  # still too soon
        {
            "event_id": "v2",
            "user_id": "c",
            "type": "page_view",
            "ts": T0 + 20 * MIN,
        },  # 20 min after the entry
    ]
    moves = run(evs, 1, s)
    seen = [(h["propstream.event"], int(h["propstream.event_ts_ms"])) for _, _, h in moves]
    assert seen == [("entered", T0), ("left", T0 + 20 * MIN)]
    no_cooldown = run(evs, 1, worker_settings(audiences="carting: cart_value > 0", rescore_after=""))
    # without the cooldown the cart's removal is the exit
    assert [int(h["propstream.event_ts_ms"]) for _, _, h in no_cooldown] == [T0, T0 + 2 * MIN]
