"""Label ledger (resolution, censoring at the horizon, no leakage, sampling) and change detection."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from models.changes import Announced, ChangeRules, detect, tier_of
from models.ledger import Snapshot, Target, UserLedger, due, expire, next_deadline, observe, offer, open_from

H = 7 * 86_400_000
PURCHASE = Target("purchase", H, frozenset({"purchase"}), sample_every_ms=0)
CHURN = Target("churn", 14 * 86_400_000, churn=True, sample_every_ms=0)


def snap(ts: int) -> Snapshot:
    return Snapshot.of(ts, [float(ts)], 0.5, 1)


def test_positive_as_soon_as_the_target_happens_learnt_at_the_horizon() -> None:
    led = UserLedger()
    offer(led, PURCHASE, snap(1000))
    assert observe(led, (PURCHASE,), "page_view", 2000) == 0
    assert observe(led, (PURCHASE,), "purchase", 3000) == 1
    assert led.pending["purchase"][0].label == 1  # known now ...
    assert open_from(led, PURCHASE) is None  # ... so no later event needs to look at it
    assert expire(led, "u", (PURCHASE,), 1000 + H) == []  # ... but it leaves only after its horizon
    [m] = expire(led, "u", (PURCHASE,), 1001 + H)
    assert (m.label, m.snapshot.ts_ms, m.resolved_ms) == (1, 1000, 3000)
    assert "purchase" not in led.pending


def test_censoring_exactly_at_the_horizon() -> None:
    led = UserLedger()
    offer(led, PURCHASE, snap(0))
    assert next_deadline(led, (PURCHASE,)) == H
    assert expire(led, "u", (PURCHASE,), H) == []  # clock at the horizon: the window is still open
    assert observe(led, (PURCHASE,), "purchase", H) == 1  # an event exactly at t + H counts
    [m] = expire(led, "u", (PURCHASE,), H + 1)
    assert (m.snapshot.ts_ms, m.label) == (0, 1)
    offer(led, PURCHASE, snap(H + 1))
    assert observe(led, (PURCHASE,), "purchase", 2 * H + 2) == 0  # one ms past the window
    [m] = expire(led, "u", (PURCHASE,), 2 * H + 2)
    assert (m.snapshot.ts_ms, m.label, m.resolved_ms) == (H + 1, 0, 2 * H + 2)
    assert next_deadline(led, (PURCHASE,)) == 0


def test_event_at_snapshot_time_or_before_never_labels_it() -> None:
    led = UserLedger()
    offer(led, PURCHASE, snap(5000))
    assert observe(led, (PURCHASE,), "purchase", 5000) == 0
    assert observe(led, (PURCHASE,), "purchase", 4000) == 0
    assert led.pending["purchase"][0].label == -1
    assert open_from(led, PURCHASE) == 5000


def test_churn_labels() -> None:
    led = UserLedger()
    offer(led, CHURN, snap(0))
    offer(led, CHURN, snap(86_400_000))
    assert observe(led, (CHURN,), "page_view", 86_400_000 + 5) == 2  # inside both windows
    offer(led, CHURN, snap(10 * 86_400_000))
    matured = expire(led, "u", (CHURN,), 25 * 86_400_000)
    assert sorted((m.snapshot.ts_ms, m.label) for m in matured) == [
        (0, 0),
        (86_400_000, 0),
        (10 * 86_400_000, 1),  # nothing in its window: churned
    ]


def test_sampling_rule_limits_heavy_users() -> None:
    t = Target("purchase", H, frozenset({"purchase"}), sample_every_ms=3_600_000, max_pending=3)
    last: int | None = None
    kept = []
    for i in range(13):  # every 10 minutes for 2 hours
        ok = due(last, t, i * 600_000)
        kept.append(ok)
        if ok:
            last = i * 600_000
    assert kept == [i % 6 == 0 for i in range(13)]
    led = UserLedger()
    assert [offer(led, t, snap(i)) for i in range(5)] == [True, True, True, False, False]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_labels_equal_a_brute_force_lookahead_and_replay_equals_live(seed: int) -> None:
    """Labels from the streaming ledger equal those read off the complete history, in any batching."""
    rng = random.Random(seed)
    events = sorted(
        (rng.randrange(30 * 86_400_000), rng.choice(["page_view", "purchase"])) for _ in range(60)
    )
    end = 40 * 86_400_000
    target = Target("purchase", H, frozenset({"purchase"}), sample_every_ms=0, max_pending=1000)

    def run(expire_every: int) -> list[tuple[int, int]]:
        led, out = UserLedger(), []
        for i, (ts, kind) in enumerate(events):
            observe(led, (target,), kind, ts)
            if i % expire_every == 0:
                out += expire(led, "u", (target,), ts)
            offer(led, target, snap(ts))
        out += expire(led, "u", (target,), end)
        return sorted((m.snapshot.ts_ms, m.label) for m in out)

    want = sorted((t, int(any(k == "purchase" and t < u <= t + H for u, k in events))) for t, _ in events)
    assert run(1) == want
    assert run(7) == want


R = ChangeRules(thresholds=(0.2, 0.5), hysteresis=0.03, min_delta=0.15, cooldown_ms=1000)


def test_snapshot_inputs_read_back_exactly_and_layout_2_ledgers_still_read() -> None:
    import math
    from array import array

    import msgspec

    from models.scoring import decode_ledger, encode

    values = [0.0, 1.5, 0.0, -2.25, float("nan"), 0.0, 1e-300, -0.0, 3.0]
    got = Snapshot.of(7, values, 0.5, 2).features
    assert len(got) == len(values) and got[4] != got[4]  # NaN kept
    assert [v for i, v in enumerate(got) if i != 4] == [v for i, v in enumerate(values) if i != 4]
    assert math.copysign(1.0, got[7]) == 1.0  # -0.0 is stored as the 0 it equals
    # zeros cost nothing: 62 inputs with 3 non-zero take far less than 62 float64s
    sparse = [0.0] * 62
    sparse[3], sparse[40], sparse[61] = 1.0, 2.0, 3.0
    assert len(encode(UserLedger({"p": [Snapshot.of(1, sparse, 0.1, 1)]}))) < 62 * 8 / 4
    # a ledger written by layout 2 (dense float64 inputs, no positions), as msgpack by hand
    dense = array("d", [0.0, 4.0, 0.5]).tobytes()
    raw = msgspec.msgpack.encode([{"purchase": [[11, dense, 0.25, 3, -1, 0]]}, 2])
    led = decode_ledger(raw)
    assert led.pending["purchase"][0].features == [0.0, 4.0, 0.5]
    assert led.pending["purchase"][0].score == 0.25 and led.v == 3
    again = decode_ledger(encode(led))  # written back in layout 3, read again the same
    assert again.pending["purchase"][0].features == [0.0, 4.0, 0.5]
    # a snapshot stores each input's position in one byte: a model of over 256 inputs needs a layout 4
    from models.online import INPUT_NAMES

    assert len(INPUT_NAMES) <= 256


def test_tiers_and_hysteresis() -> None:
    assert [tier_of(s, None, R) for s in (0.1, 0.2, 0.49, 0.5, 0.9)] == [0, 1, 1, 2, 2]
    assert tier_of(0.22, 0, R) == 0 and tier_of(0.23, 0, R) == 1  # must clear 0.2 by 0.03
    assert tier_of(0.18, 1, R) == 1 and tier_of(0.169, 1, R) == 0
    assert tier_of(0.9, 0, R) == 2 and tier_of(0.05, 2, R) == 0  # jumps across two boundaries


def test_no_flapping_at_a_boundary() -> None:
    last, changes = None, []
    for i, s in enumerate([0.19, 0.21, 0.19, 0.215, 0.185, 0.22, 0.19]):
        last, ch = detect(last, s, i * 10_000, R, target="x", warming_up=False)
        changes.append(ch)
    assert changes == [None] * 7


def test_delta_tier_and_reasons() -> None:
    base = Announced(0.30, 1, 0)
    _, ch = detect(base, 0.44, 10_000, R, target="x", warming_up=False)
    assert ch is None  # +0.14: same tier, under min_delta
    _, ch = detect(base, 0.46, 10_000, R, target="x", warming_up=False)
    assert ch is not None and (ch.reason, ch.direction, ch.tier) == ("large_move", "up", "medium")
    _, ch = detect(base, 0.56, 10_000, R, target="purchase", warming_up=False)
    assert ch is not None and (ch.reason, ch.previous_tier, ch.tier) == (
        "purchase_intent_up",
        "medium",
        "high",
    )
    _, ch = detect(Announced(0.6, 2, 0), 0.3, 10_000, R, target="purchase", warming_up=False, engaged=True)
    assert ch is not None and ch.reason == "churn_risk_up"
    _, ch = detect(Announced(0.6, 2, 0), 0.3, 10_000, R, target="purchase", warming_up=False, engaged=False)
    assert ch is not None and ch.reason == "purchase_intent_down"
    _, ch = detect(Announced(0.1, 0, 0), 0.3, 10_000, R, target="churn", warming_up=False)
    assert ch is not None and ch.reason == "churn_risk_up"


def test_cooldown_and_warming_up_suppress() -> None:
    base = Announced(0.1, 0, 0)
    assert detect(base, 0.9, 500, R, target="x", warming_up=False)[1] is None  # within cooldown
    assert detect(base, 0.9, 5000, R, target="x", warming_up=True)[1] is None  # model warming up
    state, ch = detect(base, 0.9, 5000, R, target="x", warming_up=False)
    assert ch is not None and state.ts_ms == 5000 and state.score == 0.9


def test_churn_grace_period_ignores_the_rest_of_the_session() -> None:
    t = Target("churn", 14 * 86_400_000, churn=True, sample_every_ms=0, grace_ms=1_800_000)
    led = UserLedger()
    offer(led, t, snap(0))
    assert observe(led, (t,), "page_view", 600_000) == 0  # same session: not a return
    assert observe(led, (t,), "page_view", 1_800_001) == 1  # back after the grace period
    offer(led, t, snap(10 * 86_400_000))
    matured = expire(led, "u", (t,), 25 * 86_400_000)
    assert [(m.snapshot.ts_ms, m.label) for m in matured] == [(0, 0), (10 * 86_400_000, 1)]
