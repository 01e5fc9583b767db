"""ScoringCore: sampling, no leakage, labels against a brute-force lookahead, worker = eval, change events."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import msgspec
import pytest

from features.contract import Event, Rules, parse
from features.state import Corrupt, FeatureParams, UserState
from features.user import apply, compute, finalize, fold
from models.changes import ChangeRules
from models.evaluate import run
from models.ledger import Matured, Snapshot, Target, UserLedger, make_target
from models.online import ModelConfig, OnlineModel, inputs
from models.persist import restore
from models.scoring import (
    LazyLedger,
    ScoreState,
    ScoringCore,
    TargetModel,
    TargetState,
    decode_ledger,
    decode_state,
    encode,
    input_names,
    source_feature,
    top_factors,
)
from models.training import decode_message
from streams.ingest import IngestHandler, MemoryStore, Record
from streams.metrics import Metrics
from streams.model_metrics import ModelMetrics
from streams.producer import topic_for
from streams.score_stage import MemoryKV, ScoreStage
from streams.settings import Settings
from tests.reference import random_events

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY  # a day boundary, so hand-worked windows are easy
PARAMS = FeatureParams()
RULES = Rules(max_future_ms=10**15)
ENC = msgspec.json.Encoder()


def ev(i: int, ts: int, kind: str = "page_view", user: str = "u") -> Event:
    return Event(event_id=f"{user}-{i}", user_id=user, type=kind, ts_ms=ts)


def events_of(dicts: list[dict[str, Any]]) -> list[Event]:
    return [e for d in dicts for e in parse(ENC.encode(d), RULES, 0)]


def trained_model(seed: int = 0, n: int = 400) -> OnlineModel:
    """A model with non-trivial weights: labels driven by a few inputs of random feature vectors."""
    rng = random.Random(seed)
    names = input_names()
    model = OnlineModel(ModelConfig(optimizer="sgd", learning_rate=0.05))
    for _ in range(n):
        x = {k: rng.uniform(0, 3) for k in names}
        z = x["n_add_to_cart_24h"] + x["n_page_view_1h"] - x["s_since_last_event"] - 0.5
        model.learn(x, int(z + rng.gauss(0, 0.5) > 0))
    return model


def core_for(targets: tuple[Target, ...], model: OnlineModel | None = None, **kw: Any) -> ScoringCore:
    m = model or OnlineModel()
    return ScoringCore(
        targets, PARAMS, ChangeRules(), {t.name: TargetModel(m, 1, 0, 0) for t in targets}, **kw
    )


class User:
    """One user driven through the core the way eval does it: apply, finalize, on_event."""

    def __init__(self, core: ScoringCore, user_id: str = "u") -> None:
        self.core = core
        self.user_id = user_id
        self.st = UserState()
        self.ss = ScoreState()
        self.ledger = LazyLedger(lambda: None)

    def feed(self, e: Event) -> list[tuple[Target, Snapshot]]:
        assert apply(self.st, e, PARAMS) is None
        finalize(self.st)
        return self.core.on_event(self.ss, self.ledger, self.st, e)

    def expire(self, clock_ms: int) -> list[Matured]:
        return self.core.expire(self.user_id, self.ss, self.ledger, clock_ms)


# --- sampling -----------------------------------------------------------------------------------


def test_snapshots_at_most_one_per_sample_period_every_ten_minutes() -> None:
    t = Target("purchase", 7 * DAY, frozenset({"purchase"}), sample_every_ms=HOUR)
    u = User(core_for((t,)))
    taken = [s.ts_ms - T0 for i in range(19) for _, s in u.feed(ev(i, T0 + i * 10 * MIN))]
    assert taken == [0, HOUR, 2 * HOUR, 3 * HOUR]  # 3 hours of events every 10 minutes


def test_sampling_counts_from_the_last_snapshot_not_a_grid() -> None:
    t = Target("purchase", 7 * DAY, frozenset({"purchase"}), sample_every_ms=HOUR)
    u = User(core_for((t,)))
    minutes = [0, 50, 70, 125, 130, 185, 189, 190]
    taken = [(s.ts_ms - T0) // MIN for i, m in enumerate(minutes) for _, s in u.feed(ev(i, T0 + m * MIN))]
    # 70 - 0 >= 60; 125 - 70 < 60; 130 - 70 >= 60; 185 and 189 are < 60 after 130; 190 - 130 = 60
    assert taken == [0, 70, 130, 190]


def test_max_pending_caps_the_ledger_and_sampling_resumes_after_expiry() -> None:
    t = Target("purchase", 2 * DAY, frozenset({"purchase"}), sample_every_ms=HOUR, max_pending=3)
    u = User(core_for((t,)))
    taken = [s.ts_ms - T0 for i in range(61) for _, s in u.feed(ev(i, T0 + i * 10 * MIN))]  # 10 hours
    assert taken == [0, HOUR, 2 * HOUR]
    led = u.ledger.get()
    assert [s.ts_ms - T0 for s in led.pending["purchase"]] == [0, HOUR, 2 * HOUR]
    assert u.ss.deadline_ms == T0 + 2 * DAY
    # after the first horizon, one slot is free: the next due event is sampled again
    later = T0 + 2 * DAY + 1
    assert [m.snapshot.ts_ms - T0 for m in u.expire(later)] == [0]
    assert [s.ts_ms for _, s in u.feed(ev(100, later))] == [later]
    assert len(led.pending["purchase"]) == 3


def test_each_target_samples_on_its_own_schedule() -> None:
    hourly = Target("purchase", 7 * DAY, frozenset({"purchase"}), sample_every_ms=HOUR)
    daily = Target("churn", 14 * DAY, churn=True, sample_every_ms=DAY, grace_ms=30 * MIN)
    u = User(core_for((hourly, daily)))
    got: dict[str, list[int]] = {"purchase": [], "churn": []}
    for i in range(0, 26 * 6):  # every 10 minutes for 26 hours
        for tgt, s in u.feed(ev(i, T0 + i * 10 * MIN)):
            got[tgt.name].append((s.ts_ms - T0) // HOUR)
    assert got == {"purchase": list(range(26)), "churn": [0, 24]}


# --- no leakage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_snapshot_holds_only_what_was_known_at_its_time(seed: int) -> None:
    dicts = random_events(seed, users=1, per_user=160, start_ms=T0, span_ms=20 * DAY)
    events = events_of(dicts)
    targets = (make_target("purchase", 7 * 86400), make_target("churn", 14 * 86400))
    u = User(core_for(targets, trained_model()))
    taken: list[tuple[int, Target, Snapshot]] = []
    for i, e in enumerate(events):
        taken += [(i, t, s) for t, s in u.feed(e)]
    assert len(taken) > 20
    matured = u.expire(T0 + 10**12)  # everything leaves, after every later event was seen
    assert sorted((m.target, m.snapshot.ts_ms) for m in matured) == sorted(
        (t.name, s.ts_ms) for _, t, s in taken
    )
    by_key = {(m.target, m.snapshot.ts_ms): m.snapshot for m in matured}
    for i, t, s in taken:
        prefix = events[: i + 1]
        assert max(e.ts_ms for e in prefix) == s.ts_ms  # sampled at the user's newest event
        st = fold(prefix, PARAMS)
        want = inputs(compute(st, s.ts_ms, PARAMS))
        assert by_key[(t.name, s.ts_ms)].features == [want[k] for k in input_names()], (i, t.name)
        assert s.score == pytest.approx(u.core.models[t.name].model.score(want), rel=1e-12)  # River's


def test_input_names_cover_every_input_in_a_fixed_order() -> None:
    names = input_names()
    assert len(names) == len(set(names))
    st = fold(events_of(random_events(9, users=1, per_user=50, start_ms=T0, span_ms=5 * DAY)), PARAMS)
    assert set(inputs(compute(st, st.last_ms, PARAMS))) == set(names)  # a busy user: same inputs
    assert [source_feature(n) for n in ("never_s_since_last_purchase", "n_events_1h")] == [
        "s_since_last_purchase",
        "n_events_1h",
    ]


# --- labels -------------------------------------------------------------------------------------


def brute_force(t: Target, t0: int, history: list[Event]) -> int:
    """The label read off the user's complete history: did the target happen in (t0 + grace, t0 + horizon]?"""
    hit = any(t0 + t.grace_ms < e.ts_ms <= t0 + t.horizon_ms and t.matches(e.type) for e in history)
    return int(not hit) if t.churn else int(hit)


def label_history(seed: int) -> list[Event]:
    rng = random.Random(seed)
    out = []
    for u in range(4):
        ts = T0 + rng.randrange(DAY)
        for i in range(rng.randrange(20, 70)):
            # bursts within a session, and gaps from hours to beyond the horizons
            ts += rng.choice(
                [rng.randrange(MIN, 20 * MIN), rng.randrange(HOUR, 3 * DAY), rng.randrange(8 * DAY)]
            )
            kind = rng.choices(["page_view", "add_to_cart", "purchase", "sign_up"], [8, 2, 2, 1])[0]
            out.append(ev(i, ts, kind, user=f"u{u}"))
    out.sort(key=lambda e: e.ts_ms)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_labels_equal_a_brute_force_lookahead_and_replay_equals_live(seed: int) -> None:
    history = label_history(seed)
    targets = (
        make_target("purchase", 7 * 86400),
        make_target("churn", 3 * 86400),
        make_target("sign_up", 2 * 86400, sample_every_s=600),
    )
    rng = random.Random(seed)

    def drive(policy: str) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str, int]]]:
        core = core_for(targets)
        users: dict[str, User] = {}
        matured: list[Matured] = []
        offered = []
        for e in history:
            u = users.setdefault(e.user_id, User(core, e.user_id))
            offered += [(e.user_id, t.name, s.ts_ms) for t, s in u.feed(e)]
            if policy == "every event" or (policy == "batches" and rng.random() < 0.1):
                for other in users.values():  # no accepted event is older than this one: labels final
                    matured += other.expire(e.ts_ms)
        for u in users.values():
            matured += u.expire(history[-1].ts_ms + 30 * DAY)
        got = sorted((m.user_id, m.target, m.snapshot.ts_ms, m.label) for m in matured)
        return got, sorted(offered)

    live, offered = drive("every event")
    assert len(offered) > 30
    assert [g[:3] for g in live] == offered  # every snapshot leaves exactly once
    by_user = {u: [e for e in history if e.user_id == u] for u in {e.user_id for e in history}}
    byname = {t.name: t for t in targets}
    want = [(u, n, t0, brute_force(byname[n], t0, by_user[u])) for u, n, t0 in offered]
    assert live == want
    assert {label for *_, label in live} == {0, 1}
    assert drive("batches")[0] == want
    assert drive("only at the end")[0] == want


def test_a_target_event_exactly_at_the_horizon_still_counts() -> None:
    t = Target("purchase", 2 * DAY, frozenset({"purchase"}), sample_every_ms=HOUR)
    u = User(core_for((t,)))
    u.feed(ev(0, T0))
    u.feed(ev(1, T0 + 3 * HOUR))
    assert u.ss.deadline_ms == T0 + 2 * DAY
    assert u.expire(T0 + 2 * DAY) == []  # the clock at the horizon: the window is still open
    u.feed(ev(2, T0 + 2 * DAY, "purchase"))
    matured = u.expire(T0 + 2 * DAY + 1)
    assert [(m.snapshot.ts_ms - T0, m.label, m.resolved_ms - T0) for m in matured] == [(0, 1, 2 * DAY)]
    assert u.ss.deadline_ms == T0 + 3 * HOUR + 2 * DAY  # the next pending snapshot's horizon
    later = u.expire(T0 + 10 * DAY)
    # the same purchase is in the 3h snapshot's window too; the one sampled at the purchase sees none
    assert [(m.snapshot.ts_ms - T0, m.label) for m in later] == [(3 * HOUR, 1), (2 * DAY, 0)]
    assert u.ss.deadline_ms == 0


def test_lazy_ledger_is_read_only_when_an_event_can_change_it() -> None:
    t = Target("purchase", 7 * DAY, frozenset({"purchase"}), sample_every_ms=HOUR)
    core = core_for((t,))
    raw: dict[str, bytes] = {}
    reads: list[int] = []

    def step(e: Event, st: UserState, ss: ScoreState) -> LazyLedger:
        led = LazyLedger(lambda: reads.append(e.ts_ms) or raw.get("u"))
        assert apply(st, e, PARAMS) is None
        finalize(st)
        core.on_event(ss, led, st, e)
        if led.dirty and led.loaded is not None:
            raw["u"] = encode(led.loaded)
        return led

    st, ss = UserState(), ScoreState()
    step(ev(0, T0), st, ss)  # sampled: read
    step(ev(1, T0 + MIN), st, ss)  # neither due nor a purchase: no read
    led = step(ev(2, T0 + 2 * MIN, "purchase"), st, ss)  # labels the pending snapshot
    assert reads == [T0, T0 + 2 * MIN]
    assert led.get().pending["purchase"][0].label == 1 and ss.targets["purchase"].open_ms == -1
    step(ev(3, T0 + 3 * MIN, "purchase"), st, ss)  # nothing open any more: no read
    assert reads == [T0, T0 + 2 * MIN]


def test_score_state_round_trip_and_stale_versions_are_refused() -> None:
    from features.state import Corrupt

    ss = ScoreState(targets={"purchase": TargetState(5, 6, None, b"\x00\x01")}, deadline_ms=9)
    assert decode_state(encode(ss)) == ss
    assert decode_state(None) == ScoreState()
    with pytest.raises(Corrupt, match="scores"):
        decode_state(b"\xc1garbage")
    old = msgspec.msgpack.encode(ScoreState(v=0, deadline_ms=9))
    with pytest.raises(Corrupt, match="layout version 0"):
        decode_state(old)
    led = UserLedger({"purchase": [Snapshot.of(1, [0.5], 0.25, 3)]})
    assert LazyLedger(lambda: encode(led)).get() == led


def test_a_version_1_ledger_with_its_inputs_as_lists_is_read_not_dropped() -> None:
    # the version-1 layout, written by hand: [{target: [[ts, inputs, score, version, label, resolved]]}, 1]
    v1 = msgspec.msgpack.encode(
        [{"purchase": [[7, [0.5, -1.25], 0.25, 3, 1, 9], [8, [2.0, 0.0], 0.5, 4]]}, 1]
    )
    got = decode_ledger(v1).pending["purchase"]
    assert [(s.ts_ms, s.features, s.score, s.model_version, s.label, s.resolved_ms) for s in got] == [
        (7, [0.5, -1.25], 0.25, 3, 1, 9),
        (8, [2.0, 0.0], 0.5, 4, -1, 0),
    ]
    with pytest.raises(Corrupt, match="ledger"):
        decode_ledger(msgspec.msgpack.encode([{"purchase": [[7, [0.5], 0.25, 3]]}, 5]))  # no such version


# --- the worker path equals the evaluation path -------------------------------------------------


def flush_events(ts: int) -> list[dict[str, Any]]:
    """An event at ``ts`` on every source topic, so the watermark passes every horizon before it."""
    return [
        {"event_id": f"flush-{k}", "user_id": "flush", "type": k, "ts": ts, "product_id": "p", "price": 1.0}
        for k in ("page_view", "add_to_cart", "purchase")
    ]


def worker_examples(
    settings: Settings, models: dict[str, OnlineModel], dicts: list[dict[str, Any]], sizes: list[int]
) -> list[bytes]:
    targets = settings.target_list()
    core = ScoringCore(
        targets,
        FeatureParams(),
        settings.change_rules(),
        {t.name: TargetModel(models[t.name], 4, 0, 0) for t in targets},
    )
    examples: list[bytes] = []
    metrics = Metrics()
    stage = ScoreStage(
        core,
        MemoryKV(),
        MemoryKV(),
        lambda user, value: None,
        lambda target, value: examples.append(value),
        ModelMetrics(metrics.registry),
        wall_clock=lambda: 2e9,
    )
    dead: list[Any] = []
    h = IngestHandler(settings, MemoryStore(), dead.append, metrics, clock=lambda: 2e9, stage=stage)
    records = [
        Record(topic_for(d["type"], settings), 0, i, d["user_id"].encode(), json.dumps(d).encode())
        for i, d in enumerate(dicts)
    ]
    i = 0
    for n in sizes * (len(records) // sum(sizes) + 1):
        if i >= len(records):
            break
        h.process(records[i : i + n])
        i += n
    assert not dead
    return examples


@pytest.mark.parametrize("sizes", [[1], [7, 1, 30], [250]], ids=["one", "mixed", "large"])
def test_worker_sends_the_trainer_exactly_what_eval_learns(sizes: list[int]) -> None:
    settings = Settings(allowed_lateness_s=0, targets="purchase:2d,churn:3d")
    dicts = random_events(4, users=5, per_user=90, start_ms=T0, span_ms=12 * DAY)
    dicts += flush_events(T0 + 60 * DAY)
    models = {"purchase": trained_model(1), "churn": trained_model(2)}
    got: dict[str, list[tuple[int, int, float, list[float]]]] = {"purchase": [], "churn": []}
    for raw in worker_examples(settings, models, dicts, sizes):
        m = decode_message(raw)
        got[m.target].append((m.ts_ms, m.label, m.score, m.x))
    for t in settings.target_list():
        res = run(dicts, t, model=models[t.name], learn=False)
        want = sorted((o.ts_ms, o.label, o.score, o.x) for o in res.outcomes)
        assert len(want) > 30 and {o[1] for o in want} == {0, 1}
        assert len({o[2] for o in want}) > 10  # the fixed model really scores
        assert sorted(got[t.name]) == want, t.name


# --- change events ------------------------------------------------------------------------------

W, B = 3.0, -3.0  # score = sigmoid(W * log1p(add_to_cart events in the last hour) + B)


def cart_model(positives: int = 500) -> OnlineModel:
    """A hand-set model: every input standardises to itself and only the 1h cart count has a weight."""
    names = input_names()
    state = {
        "counts": dict.fromkeys(names, 2),
        "means": dict.fromkeys(names, 0.0),
        "vars": dict.fromkeys(names, 1.0),
        "weights": {"n_add_to_cart_1h": W},
        "intercept": B,
        "n_iterations": 0,
        "optimizer": {},
        "positives": positives,
        "negatives": positives,
    }
    return restore({"optimizer": "sgd"}, state)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_a_tier_crossing_is_announced_once_with_the_documented_fields() -> None:
    t = make_target("purchase", 7 * 86400)
    model = cart_model()
    low, one_cart = sigmoid(B), sigmoid(W * math.log1p(1) + B)
    assert low < 0.2 < 0.23 < one_cart < 0.5  # low, then medium past the hysteresis
    rules = ChangeRules(cooldown_ms=10 * MIN)
    core = ScoringCore((t,), PARAMS, rules, {"purchase": TargetModel(model, 7, 0, 0)}, top_k=3)
    st, ss = UserState(), ScoreState()

    def step(e: Event) -> tuple[float, list[dict[str, Any]]]:
        assert apply(st, e, PARAMS) is None
        finalize(st)
        scores, changes, _ = core.rescore("u", ss, st, e)
        return scores["purchase"], changes

    assert step(ev(0, T0)) == (pytest.approx(low, abs=1e-12), [])  # the baseline
    assert step(ev(1, T0 + 20 * MIN))[1] == []
    cart = Event("u-2", "u", "add_to_cart", T0 + 40 * MIN, product_id="p1", price=10.0)
    score, changes = step(cart)
    assert score == pytest.approx(one_cart, abs=1e-12)
    [ch] = changes
    assert set(ch) == {
        "user_id", "target", "previous_score", "score", "previous_tier", "tier", "direction", "reason",
        "top_factors", "model_version", "horizon_s", "event_id", "event_ts_ms", "trigger",
    }  # fmt: skip
    assert {k: v for k, v in ch.items() if k != "top_factors"} == {
        "user_id": "u",
        "target": "purchase",
        "previous_score": round(low, 6),
        "score": round(one_cart, 6),
        "previous_tier": "low",
        "tier": "medium",
        "direction": "up",
        "reason": "purchase_intent_up",
        "model_version": 7,
        "horizon_s": 7 * 86400,
        "event_id": "u-2",
        "event_ts_ms": T0 + 40 * MIN,
        "trigger": "event",
    }
    first = ch["top_factors"][0]
    assert first == {
        "feature": "n_add_to_cart_1h",
        "contribution": round(W * math.log1p(1), 6),
        "value": 1.0,
        "previous": 0.0,
        "change": 1.0,
    }
    assert len(ch["top_factors"]) == 3
    assert all(f["contribution"] == 0 for f in ch["top_factors"][1:])
    assert step(ev(3, T0 + 55 * MIN))[1] == []  # same score: nothing new
    # an hour after the cart the count leaves the 1h window: back to low, announced once
    score, changes = step(ev(4, T0 + 101 * MIN))
    assert score == pytest.approx(low, abs=1e-12)
    assert [(c["previous_tier"], c["tier"], c["direction"], c["reason"]) for c in changes] == [
        ("medium", "low", "down", "purchase_intent_down")
    ]
    assert step(ev(5, T0 + 130 * MIN))[1] == []


def test_nothing_while_warming_up_and_the_first_trusted_score_is_a_baseline() -> None:
    t = make_target("purchase", 7 * 86400)
    model = cart_model(positives=50)
    models = {"purchase": TargetModel(model, 1, min_positives=51, min_negatives=0)}
    core = ScoringCore((t,), PARAMS, ChangeRules(cooldown_ms=0), models)
    st, ss = UserState(), ScoreState()
    feed = [
        ev(0, T0),
        Event("u-1", "u", "add_to_cart", T0 + MIN),  # medium
        ev(2, T0 + 2 * HOUR),  # low again
        Event("u-3", "u", "add_to_cart", T0 + 3 * HOUR),  # medium: trusted from here on
        ev(4, T0 + 3 * HOUR + MIN),
        ev(5, T0 + 5 * HOUR),  # low: the first change
    ]
    out = []
    for i, e in enumerate(feed):
        if i == 3:
            assert models["purchase"].warming_up
            models["purchase"] = TargetModel(model, 2, min_positives=50, min_negatives=0)  # hot swap
            assert not models["purchase"].warming_up
        assert apply(st, e, PARAMS) is None
        finalize(st)
        out.append([(c["event_id"], c["previous_tier"], c["tier"]) for c in core.rescore("u", ss, st, e)[1]])
        if i < 3:
            assert ss.targets.get("purchase") in (None, TargetState())  # not even a baseline kept
    assert out == [[], [], [], [], [], [("u-5", "medium", "low")]]
    assert ss.targets["purchase"].announced is not None
    assert ss.targets["purchase"].announced.ts_ms == T0 + 5 * HOUR


# --- explanations -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [3, 4])
def test_contributions_and_intercept_sum_to_the_logit(seed: int) -> None:
    model = trained_model(seed)
    st = fold(events_of(random_events(seed, users=1, per_user=80, start_ms=T0, span_ms=6 * DAY)), PARAMS)
    feats = compute(st, st.last_ms, PARAMS)
    x = inputs(feats)
    names = input_names()
    factors = top_factors(model, x, feats, {}, k=len(names))
    sources = {source_feature(n) for n in names}
    assert [f["feature"] for f in factors] != [] and {f["feature"] for f in factors} == sources
    p = model.score(x)
    logit = math.log(p / (1 - p))
    scaler, lr = model.pipeline.steps.values()
    total = sum(f["contribution"] for f in factors) + lr.intercept
    assert total == pytest.approx(logit, abs=len(sources) * 1e-6)
    # each factor, recomputed from the scaler's statistics and the weights, never_ flags folded in
    want: dict[str, float] = {}
    for n in names:
        v = scaler.vars[n]
        z = (x[n] - scaler.means[n]) / math.sqrt(v) if v else 0.0
        want[source_feature(n)] = want.get(source_feature(n), 0.0) + lr.weights.get(n, 0.0) * z
    assert {f["feature"]: f["contribution"] for f in factors} == pytest.approx(want, abs=1e-6)
    mags = [abs(f["contribution"]) for f in factors]
    assert mags == sorted(mags, reverse=True)
    assert top_factors(model, x, feats, {}, k=4) == factors[:4]
    for f in factors:
        raw = feats[f["feature"]]
        assert f["value"] == (None if raw is None else float(raw))
        assert f["previous"] is None and f["change"] is None
