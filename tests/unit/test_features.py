"""Features against hand-worked examples and a brute-force recount (tests/reference.py)."""

from __future__ import annotations

import itertools
import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.catalogue import NAMES, as_markdown
from features.contract import Rules, parse
from features.state import FeatureParams, UserState, decode, encode
from features.user import apply, compute, finalize, fold
from tests.conftest import ROOT
from tests.reference import DAY, HOUR, assert_features_equal, random_events, reference_features

NOW = 1_800_000_000_000
PARAMS = FeatureParams()
T0 = 1_700_000_000_000 - (1_700_000_000_000 % DAY)  # a midnight, so bucket edges are easy to reason about


def events_of(raw: list[dict]) -> list:
    enc = msgspec.json.Encoder()
    return [ev for r in raw for ev in parse(enc.encode(r), Rules(), NOW)]


def ev(i: int, kind: str, ts: int, **kw: object) -> dict:
    return {"event_id": f"e{i}", "user_id": "u", "type": kind, "ts": ts, **kw}


def test_hand_worked_cart_and_orders() -> None:
    raw = [
        ev(1, "add_to_cart", T0 + 1 * HOUR, product_id="a", price=10.0, quantity=2),
        ev(2, "add_to_cart", T0 + 2 * HOUR, product_id="b", price=5.0),
        ev(3, "purchase", T0 + 3 * HOUR, product_id="a", revenue=25.0),  # clears both lines
        ev(4, "add_to_cart", T0 + 4 * HOUR, product_id="c", price=7.5, quantity=2),
        ev(5, "remove_from_cart", T0 + 4 * HOUR + 60_000, product_id="c", quantity=1),
    ]
    f = compute(fold(events_of(raw), PARAMS), T0 + 5 * HOUR, PARAMS)
    assert f["cart_items"] == 1 and f["cart_value"] == 7.5
    assert f["cart_abandoned"] is True  # last add 1h ago, nothing bought since
    assert f["purchases_30d"] == 1 and f["revenue_30d"] == 25.0 and f["aov_90d"] == 25.0
    assert f["s_since_last_purchase"] == 2 * 3600.0
    assert f["n_add_to_cart_24h"] == 3 and f["n_events_24h"] == 5


def test_hand_worked_windows_and_buckets() -> None:
    # three views: 61 minutes, 59 minutes and 1 minute before as_of (as_of on a minute edge)
    as_of = T0 + 10 * HOUR
    raw = [ev(i, "product_view", as_of - m * 60_000, product_id="p") for i, m in enumerate((61, 59, 1))]
    f = compute(fold(events_of(raw), PARAMS), as_of, PARAMS)
    assert f["n_product_view_1h"] == 2  # minute buckets (as_of-60min, as_of]
    assert f["n_product_view_24h"] == 3
    assert f["distinct_products_viewed_24h"] == 1
    assert f["max_views_one_product_unbought_24h"] == 3
    later = compute(fold(events_of(raw), PARAMS), as_of + 31 * DAY, PARAMS)
    assert later["n_product_view_30d"] == 0 and later["n_events_7d"] == 0


def test_derived_sessions_split_on_gap() -> None:
    raw = [ev(1, "page_view", T0), ev(2, "page_view", T0 + 10 * 60_000), ev(3, "page_view", T0 + 50 * 60_000)]
    f = compute(fold(events_of(raw), PARAMS), T0 + HOUR, PARAMS)
    assert f["sessions_7d"] == 2  # 40 minutes of silence > 30-minute gap
    assert f["events_per_session_7d"] == 1.5
    assert f["mean_session_duration_s_7d"] == 300.0  # (600 s + 0 s) / 2


def test_duplicates_are_refused_and_idempotent() -> None:
    raw = [ev(1, "page_view", T0), ev(1, "page_view", T0)]
    st_ = UserState()
    results = [apply(st_, e, PARAMS) for e in events_of(raw)]
    assert results == [None, "duplicate"]
    assert st_.events == 1


def test_dedup_memory_overflow_raises_the_floor() -> None:
    params = FeatureParams(dedup_capacity=16)
    st_ = UserState()
    for i in range(40):
        assert apply(st_, events_of([ev(i, "page_view", T0 + i * 1000)])[0], params) is None
    assert len(st_.ids) <= 16
    # every remembered id is still refused; anything older than the floor is refused as late
    assert apply(st_, events_of([ev(39, "page_view", T0 + 39_000)])[0], params) == "duplicate"
    assert apply(st_, events_of([ev(0, "page_view", T0)])[0], params) == "late"


def test_catalogue_matches_compute_and_docs() -> None:
    f = compute(UserState(), T0, PARAMS)
    assert set(f) == set(NAMES)
    docs = (ROOT / "docs" / "features.md").read_text()
    assert as_markdown() in docs, (
        "docs/features.md is stale: regenerate with `propstream features --catalogue`"
    )


def test_state_of_another_version_is_refused_not_misread() -> None:
    from features.state import Corrupt

    st_ = fold(events_of([ev(1, "page_view", T0)]), PARAMS)
    st_.v = 999
    with pytest.raises(Corrupt, match="layout version 999"):
        decode(encode(st_))  # the worker counts it and starts afresh (tests/unit/test_worker_faults.py)


@pytest.mark.parametrize("seed", range(6))
def test_stream_equals_brute_force_recount(seed: int) -> None:
    raw = random_events(seed, users=1, per_user=150, start_ms=T0, span_ms=40 * DAY)
    as_of = max(r["ts"] for r in raw) + random.Random(seed).randrange(3 * DAY)
    got = compute(fold(events_of(raw), PARAMS), as_of, PARAMS)
    assert_features_equal(got, reference_features(raw, as_of), f"seed {seed}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 120),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    shuffle_window_ms=st.sampled_from([0, 60_000, 1_800_000]),
    with_sessions=st.booleans(),
    delay_ms=st.integers(0, 10 * DAY),
    dup_every=st.integers(0, 7),
)
def test_property_any_batching_and_local_disorder(
    seed: int,
    n: int,
    cuts: list[int],
    shuffle_window_ms: int,
    with_sessions: bool,
    delay_ms: int,
    dup_every: int,
) -> None:
    """Batches (encode/decode between them), duplicates and small reorderings never change the features."""
    raw = random_events(seed, users=1, per_user=n, start_ms=T0, span_ms=20 * DAY, with_sessions=with_sessions)
    rng = random.Random(seed)
    if shuffle_window_ms and with_sessions:  # order-insensitive only for producer-given sessions
        raw.sort(key=lambda r: r["ts"] + rng.randrange(shuffle_window_ms))
    if dup_every:
        raw = [r for i, r in enumerate(raw) for _ in range(2 if i % dup_every == 0 else 1)]
    evs = events_of(raw)
    blob = encode(UserState())
    bounds = sorted({0, len(evs), *[c for c in cuts if c < len(evs)]})
    for lo, hi in itertools.pairwise(bounds):
        state = decode(blob)
        for e in evs[lo:hi]:
            apply(state, e, PARAMS)
        finalize(state)
        blob = encode(state)
    as_of = max(r["ts"] for r in raw) + delay_ms
    assert_features_equal(compute(decode(blob), as_of, PARAMS), reference_features(raw, as_of))


@pytest.mark.parametrize("seed", range(4))
def test_the_finalizer_skips_only_states_nothing_was_folded_into_since(seed: int) -> None:
    """``Finalizer`` (the hot path's) leaves every state as plain ``finalize`` would, event by event."""
    from features.user import Finalizer

    raw = random_events(seed, users=1, per_user=120, start_ms=T0, span_ms=40 * DAY)
    once = Finalizer()
    memo, plain = UserState(), UserState()
    for e in events_of(raw):
        apply(memo, e, PARAMS)
        apply(plain, e, PARAMS)
        once(memo)
        once(memo)  # asked again with nothing folded in: skipped, and nothing is left to drop
        finalize(plain)
        assert encode(memo) == encode(plain)
    other = decode(encode(plain))  # another object, same content: finalised, not skipped
    other.cd.setdefault("page_view", {})[0] = 1  # a bucket no window reaches: finalize drops it
    once(other)
    assert 0 not in other.cd.get("page_view", {})


@pytest.mark.parametrize("seed", range(6))
def test_the_finalizer_drops_what_plain_finalize_drops_with_late_events_and_caps(seed: int) -> None:
    """Partial finalising (only windows whose floor moved) leaves the state as a full one, also when
    events come out of order, a day or an hour boundary passes, and the product cap is reached."""
    from features.user import Finalizer

    rng = random.Random(seed)
    raw = random_events(seed, users=1, per_user=400, start_ms=T0, span_ms=60 * DAY)
    for i, r in enumerate(raw):
        if r.get("product_id"):
            r["product_id"] = f"p{rng.randrange(160)}"  # past MAX_PRODUCTS distinct products viewed
        if i and rng.random() < 0.2:  # late: up to two hours before the previous event
            r["ts"] = max(T0, raw[i - 1]["ts"] - rng.randrange(7_200_000))
    once = Finalizer()
    memo, plain, other = UserState(), UserState(), UserState()
    for e in events_of(raw):
        apply(memo, e, PARAMS)
        apply(plain, e, PARAMS)
        once(memo)
        if rng.random() < 0.1:  # another state in between: the memo is lost, a full finalize runs
            apply(other, e, PARAMS)
            once(other)
        finalize(plain)
        assert encode(memo) == encode(plain)
    assert len(plain.views) > 50  # the product cap and hourly pruning were exercised


def test_model_inputs_come_in_input_names_order_for_any_state() -> None:
    """Snapshot vectors are ``list(inputs(...).values())``: every key, in ``input_names()`` order."""
    from models.online import inputs
    from models.scoring import input_names

    for seed in range(4):
        state = fold(
            events_of(random_events(seed, users=1, per_user=80, start_ms=T0, span_ms=20 * DAY)), PARAMS
        )
        for as_of in (state.last_ms, state.last_ms + 3 * DAY):
            assert tuple(inputs(compute(state, as_of, PARAMS))) == input_names()
    assert tuple(inputs(compute(UserState(), 0, PARAMS))) == input_names()
