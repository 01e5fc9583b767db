"""The value target: revenue labels against a brute-force recount, the hurdle model, its versions,
tiers and change events, worker = eval, and the one-currency rule."""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import msgspec
import pytest

from features.contract import Rejected, Rules, parse
from models.changes import ChangeRules, value_rules
from models.evaluate import run
from models.fastscore import FastScorer
from models.ledger import Matured, Target, make_target
from models.online import ModelConfig
from models.persist import dump, load, model_of, snapshot_of
from models.scoring import ScoringCore, TargetModel, input_names
from models.training import Example, Rollback, Trainer, decode_message, inputs_hash
from models.trust import TrustGate
from models.value import ValueConfig, ValueModel
from streams.settings import Settings
from tests.unit.test_scoring import DAY, HOUR, MIN, PARAMS, T0, User, ev, flush_events
from tests.unit.test_scoring import worker_examples as scoring_worker_examples

ENC = msgspec.json.Encoder()


def value_model(seed: int = 0, n: int = 3000, form: str = "hurdle") -> ValueModel:
    """A value model trained on random inputs: buyers driven by two inputs, amounts by a third."""
    rng = random.Random(seed)
    names = input_names()
    m = ValueModel(ModelConfig(learning_rate=0.05), ValueConfig(form=form, severity_lr=0.02))
    for _ in range(n):
        x = {k: rng.uniform(0, 3) for k in names}
        buys = x["n_add_to_cart_24h"] + x["n_page_view_1h"] - 3 + rng.gauss(0, 0.5) > 0
        amount = math.exp(2 + 0.5 * x["revenue_90d"] + rng.gauss(0, 0.4)) if buys else 0.0
        m.learn(x, int(buys), amount)
    return m


# --- labels -------------------------------------------------------------------------------------


def purchase(i: int, ts: int, cents: int, user: str) -> Any:
    e = ev(i, ts, "purchase", user)
    e.revenue = cents / 100
    return e


def value_history(seed: int) -> tuple[list[Any], dict[str, list[tuple[int, int]]]]:
    """Events of four users, purchases with amounts in whole cents; and per user (time, cents)."""
    rng = random.Random(seed)
    out, bought = [], {}
    for u in range(4):
        user = f"u{u}"
        ts = T0 + rng.randrange(DAY)
        bought[user] = []
        for i in range(rng.randrange(30, 80)):
            ts += rng.choice(
                [rng.randrange(MIN, 20 * MIN), rng.randrange(HOUR, 2 * DAY), rng.randrange(6 * DAY)]
            )
            if rng.random() < 0.3:
                cents = rng.choice([10, 20, 30, 1999, rng.randrange(1, 10**6)])  # 0.1 + 0.2 included
                out.append(purchase(i, ts, cents, user))
                bought[user].append((ts, cents))
            else:
                out.append(ev(i, ts, rng.choice(["page_view", "add_to_cart"]), user))
    out.sort(key=lambda e: e.ts_ms)
    return out, bought


@pytest.mark.parametrize("seed", range(4))
def test_revenue_labels_equal_a_brute_force_recount_over_any_batching(seed: int) -> None:
    history, bought = value_history(seed)
    target = make_target("value", 3 * 86400, sample_every_s=1800)
    rng = random.Random(seed)

    def drive(policy: str) -> list[tuple[str, int, int, int]]:
        core = ScoringCore((target,), PARAMS, ChangeRules(), {"value": TargetModel(ValueModel(), 1, 0, 0)})
        users: dict[str, User] = {}
        matured: list[Matured] = []
        for e in history:
            u = users.setdefault(e.user_id, User(core, e.user_id))
            u.feed(e)
            if policy == "every event" or (policy == "batches" and rng.random() < 0.1):
                for other in users.values():
                    matured += other.expire(e.ts_ms)
        for u in users.values():
            matured += u.expire(history[-1].ts_ms + 30 * DAY)
        return sorted((m.user_id, m.snapshot.ts_ms, m.label, m.snapshot.value_units) for m in matured)

    live = drive("every event")
    # the recount: whole cents of every purchase in (t, t + horizon], as integers (no float order)
    want = []
    for user, t0, _, _ in live:
        cents = [c for ts, c in bought[user] if t0 < ts <= t0 + target.horizon_ms]
        want.append((user, t0, int(bool(cents)), sum(cents) * 100))
    assert live == want
    assert len(live) > 50 and {lab for _, _, lab, _ in live} == {0, 1}
    assert drive("batches") == want
    assert drive("only at the end") == want


# --- the worker's path equals eval's --------------------------------------------------------------


def worker_examples(
    settings: Settings, model: ValueModel, dicts: list[dict[str, Any]], size: int
) -> list[Example]:
    """The training examples the worker's handler and score stage send for ``dicts`` in batches of ``size``."""
    out = []
    for raw in scoring_worker_examples(settings, {"value": model}, dicts, [size]):  # type: ignore[dict-item]
        m = decode_message(raw)
        assert isinstance(m, Example)
        out.append(m)
    return out


def shop_events(seed: int, users: int = 6, per_user: int = 80) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for u in range(users):
        ts = T0 + rng.randrange(DAY)
        for i in range(per_user):
            ts += rng.choice([rng.randrange(MIN, 20 * MIN), rng.randrange(HOUR, 3 * DAY)])
            kind = rng.choices(["page_view", "product_view", "add_to_cart", "purchase"], [6, 4, 2, 1])[0]
            d: dict[str, Any] = {"event_id": f"e{u}-{i}", "user_id": f"u{u}", "type": kind, "ts": ts}
            if kind in ("product_view", "add_to_cart"):
                d.update(product_id=f"p{rng.randrange(20)}", price=round(rng.uniform(1, 200), 2))
            if kind == "purchase":
                d.update(order_id=f"o{u}-{i}", revenue=round(rng.lognormvariate(3.5, 0.8), 2))
            out.append(d)
    out.sort(key=lambda d: d["ts"])
    return out + flush_events(T0 + 90 * DAY)


@pytest.mark.parametrize("size", [1, 37, 500])
def test_the_worker_scores_and_labels_value_exactly_as_eval(size: int) -> None:
    settings = Settings(allowed_lateness_s=0, targets="value:5d")
    dicts = shop_events(3)
    model = value_model(1)
    got = sorted(
        (m.ts_ms, m.label, m.value, m.score, m.x) for m in worker_examples(settings, model, dicts, size)
    )
    res = run(dicts, settings.target_list()[0], model=model, learn=False)
    want = sorted((o.ts_ms, o.label, o.value, o.score, o.x) for o in res.outcomes)
    assert len(want) > 50 and sum(o[2] > 0 for o in want) > 10
    assert len({o[3] for o in want}) > 20  # the fixed model really scores
    assert got == want


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["hurdle", "log1p"])
def test_fast_scores_equal_the_models_own_and_survive_a_snapshot(form: str) -> None:
    m = value_model(2, form=form)
    restored = model_of(load(dump(snapshot_of(m, target="value", version=3, created_ms=0))))
    assert isinstance(restored, ValueModel) and restored.value_config.form == form
    rng = random.Random(5)
    fast = FastScorer()
    names = input_names()
    for _ in range(200):
        x = {k: rng.uniform(0, 3) for k in names}
        own = m.score(x)
        assert own >= 0
        assert fast.scores_of((m,), names, list(x.values())) == pytest.approx([own], rel=1e-12)
        assert restored.score(x) == own
    # the restored model goes on learning exactly as the original
    x = {k: 1.0 for k in names}
    for mm in (m, restored):
        mm.learn(x, 1, 55.5)
    assert restored.score(x) == m.score(x)


def test_the_hurdle_recovers_expected_revenue_on_data_with_a_known_answer() -> None:
    """Buy with p = 0.25 when a flag is on, else 0.05; amounts lognormal(mu = 3 + b, sigma = 0.5), so
    E[revenue] = p * exp(mu + 0.125). Learnt online with the default learning rates, the model is
    within 30% of the truth everywhere (SGD's last steps keep the classifier a few points off) and
    ranks as the truth does: the flag is worth x5, b = 0.9 over b = 0.1 x2.2."""
    rng = random.Random(7)
    m = ValueModel()
    for _ in range(40_000):
        x = {"flag": float(rng.random() < 0.5), "b": rng.random()}
        p = 0.25 if x["flag"] else 0.05
        buys = rng.random() < p
        m.learn(x, int(buys), math.exp(rng.gauss(3 + x["b"], 0.5)) if buys else 0.0)
    for flag, b in ((1.0, 0.5), (0.0, 0.5), (1.0, 0.9), (1.0, 0.1)):
        truth = (0.25 if flag else 0.05) * math.exp(3 + b + 0.125)
        assert m.score({"flag": flag, "b": b}) == pytest.approx(truth, rel=0.3)
    assert m.score({"flag": 1.0, "b": 0.5}) > 3 * m.score({"flag": 0.0, "b": 0.5})
    assert m.score({"flag": 1.0, "b": 0.9}) > 1.5 * m.score({"flag": 1.0, "b": 0.1})
    assert m.mean_value == pytest.approx(m.revenue_sum / 40_000)


def test_a_value_trainer_rolls_back_to_an_earlier_version_and_learns_on_from_it() -> None:
    tr = Trainer(
        "value",
        config=ModelConfig(),
        min_positives=1,
        min_negatives=1,
        publish_every=10,
        publish_interval_ms=10**9,
        window=100,
        value=ValueConfig(),
    )
    rng = random.Random(3)
    names = input_names()

    def example(i: int) -> Example:
        x = [rng.uniform(0, 2) for _ in names]
        buys = rng.random() < 0.3
        return Example("value", i, x, int(buys), 0.0, 0, inputs_hash(), rng.uniform(5, 90) if buys else 0.0)

    for i in range(10):
        assert tr.handle(i, example(i)) == "learnt"
    v1 = tr.publish(1)
    assert isinstance(model_of(v1), ValueModel) and v1.quality["matured"] == 10
    for i in range(10, 30):
        tr.handle(i, example(i))
    probe = {k: 0.7 for k in names}
    assert tr.model.score(probe) != model_of(v1).score(probe)
    assert tr.handle(30, Rollback("value", 1, dump(v1))) == "rollback"
    assert tr.model.score(probe) == model_of(v1).score(probe)
    v2 = tr.publish(2)
    assert v2.note == "rollback to 1" and model_of(v2).score(probe) == model_of(v1).score(probe)
    tr.handle(31, example(31))
    assert tr.model.positives + tr.model.negatives == 11  # learns on from version 1's counts


def test_the_trust_gate_judges_a_value_report_by_gini_and_calibration() -> None:
    judge = functools.partial(TrustGate().judge, value=True)
    assert judge({"matured": 900, "gini": 0.41, "calibration_ratio": 1.1}).trusted
    low = judge({"matured": 900, "gini": 0.12, "calibration_ratio": 1.0})
    assert low.failing == ("gini",) and "gini 0.120 < 0.2" in low.reason
    off = judge({"matured": 900, "gini": 0.5, "calibration_ratio": 0.5})
    assert off.failing == ("calibration",)
    assert judge({"matured": 0, "gini": math.nan, "calibration_ratio": math.nan}).failing == (
        "gini",
        "calibration",
    )
    # a value target with no version yet (an empty report) is refused in its own terms, not ROC-AUC's
    nothing = judge({})
    assert nothing.failing == ("gini", "calibration") and "roc_auc" not in nothing.reason


# --- tiers and change events ----------------------------------------------------------------------


def test_value_tiers_are_multiples_of_the_models_mean_or_fixed_amounts() -> None:
    rel = value_rules(ChangeRules(), 40.0)
    assert rel.thresholds == (40.0, 120.0) and rel.min_delta == math.inf
    fixed = value_rules(ChangeRules(value_tiers=(50.0, 200.0, False)), 40.0)
    assert fixed.thresholds == (50.0, 200.0)
    assert Settings(value_tiers="50,200").change_rules().value_tiers == (50.0, 200.0, False)
    for bad in ("200,50", "1x,200", "x,3x", "1x"):
        with pytest.raises(ValueError, match="value_tiers"):
            Settings(value_tiers=bad)


def test_a_value_tier_change_is_announced_and_purchase_changes_carry_expected_value() -> None:
    """Twelve adds to cart a minute apart push both scores up. Expected here, independently of the
    scoring core: each step's value is the model's own (River) score of inputs computed from a
    fold of the events so far; the value tiers are fixed amounts between the first and the last
    value, and the announcements follow from them with the 10% hysteresis; purchase changes carry
    the value of their moment."""
    from features.user import compute, fold
    from models.online import inputs
    from tests.unit.test_scoring import cart_model

    purchase_t = Target("purchase", 7 * DAY, frozenset({"purchase"}))
    value_t = make_target("value", 30 * 86400)
    vm = value_model(4)
    events = [ev(i, T0 + i * MIN, "add_to_cart") for i in range(12)]
    values = []
    for i, e in enumerate(events):
        feats = compute(fold(events[: i + 1], PARAMS), e.ts_ms, PARAMS)
        values.append(vm.score(inputs(feats)))
    lo, hi = min(values), max(values)
    assert hi > 2 * lo, "the model's value rises with the carts"
    low, high = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
    rules = ChangeRules(cooldown_ms=0, value_tiers=(low, high, False))
    models = {"purchase": TargetModel(cart_model(), 2, 0, 0), "value": TargetModel(vm, 5, 0, 0)}
    core = ScoringCore((purchase_t, value_t), PARAMS, rules, models, currency="EUR")
    u = User(core)
    changes: list[dict[str, Any]] = []
    for e in events:
        u.feed(e)
        changes += core.rescore("u", u.ss, u.st, e).changes

    h = 0.1 * low
    want, t = [], (values[0] >= low) + (values[0] >= high)
    for e, v in zip(events[1:], values[1:], strict=True):
        raw = (v >= low) + (v >= high)
        new = (
            t + sum(v >= c + h for c in (low, high)[t:raw])
            if raw > t
            else t - sum(v < c - h for c in (low, high)[raw:t])
        )
        if new != t:
            want.append((e.ts_ms, "value_tier_up" if new > t else "value_tier_down", round(v, 2)))
        t = new
    got = [(c["event_ts_ms"], c["reason"], c["expected_value"]) for c in changes if c["target"] == "value"]
    assert got == want and len(want) == 2
    by_time = {e.ts_ms: round(v, 2) for e, v in zip(events, values, strict=True)}
    purchase = [c for c in changes if c["target"] == "purchase"]
    assert purchase, "the cart model's score rises through the tiers"
    for c in purchase + [c for c in changes if c["target"] == "value"]:
        assert c["currency"] == "EUR" and c["expected_value"] == by_time[c["event_ts_ms"]]


# --- one currency -------------------------------------------------------------------------------


def test_amounts_in_another_currency_are_converted_at_the_configured_rate_or_rejected() -> None:
    rules = Settings(default_currency="usd", currency_rates="EUR=1.1, gbp=1.25").ingest_rules()
    base = {"event_id": "e1", "user_id": "u", "type": "purchase", "ts": T0, "order_id": "o1"}
    (e,) = parse(ENC.encode({**base, "revenue": 100.0, "currency": "EUR"}), rules, T0)
    assert e.currency == "USD" and e.revenue == pytest.approx(110.0)
    (e,) = parse(ENC.encode({**base, "revenue": 10.0, "currency": "GBP", "price": 4.0}), rules, T0)
    assert (e.revenue, e.price) == (pytest.approx(12.5), pytest.approx(5.0))
    (e,) = parse(ENC.encode({**base, "revenue": 10.0}), rules, T0)
    assert (e.currency, e.revenue) == ("USD", 10.0)
    with pytest.raises(Rejected) as info:
        parse(ENC.encode({**base, "revenue": 10.0, "currency": "JPY"}), rules, T0)
    assert info.value.reason == "currency" and "JPY" in info.value.detail and "USD" in info.value.detail
    with pytest.raises(Rejected):
        parse(ENC.encode({**base, "revenue": 10.0, "currency": "EUR"}), Rules(), T0)
    for bad in ("EUR", "EUR=0", "EURO=1.1", "EUR=x"):
        with pytest.raises(ValueError, match="currency_rates"):
            Settings(currency_rates=bad)


def test_value_is_a_target_and_audiences_read_it() -> None:
    s = Settings(targets="purchase:7d,value:90d", audiences="big: value >= 100 and value.tier >= medium")
    (value_t,) = [t for t in s.target_list() if t.value]
    assert value_t.horizon_ms == 90 * DAY and value_t.event_types == frozenset({"purchase"})
    assert value_t.sample_every_ms == DAY  # PROPSTREAM_VALUE_SAMPLE_EVERY_S's default


@pytest.mark.parametrize("pct", [1.0, 10.0, 25.0])
def test_a_value_percentile_takes_the_top_spenders_within_two_percent(pct: float) -> None:
    """``vip: value top 10%`` over amounts spread across four orders of magnitude: the members are
    at least the share asked for, and every member is worth at least the share's boundary amount
    (read off the sorted amounts here) less the log bins' 2% resolution."""
    from models.audience_stats import PartitionStats
    from models.audiences import View, members, parse_audiences

    (vip,) = parse_audiences(f"vip: value top {pct:g}%", ["value"], [])
    rng = random.Random(int(pct))
    amounts = [rng.lognormvariate(3.0, 1.5) for _ in range(3000)] + [0.0] * 1000  # a quarter spent nothing
    stats = PartitionStats((vip,), ["value"])
    for v in amounts:
        stats.add({"value": v}, [])
    cuts = stats.cuts()
    inside = [v for v in amounts if members((vip,), View({"value": v}, {}, {}, cuts), [])]
    boundary = sorted(amounts, reverse=True)[math.ceil(len(amounts) * pct / 100) - 1]
    assert len(inside) >= len(amounts) * pct / 100
    assert min(inside) >= boundary / 1.021
    assert (
        len(inside) <= len(amounts) * pct / 100 + sum(boundary / 1.021 <= v < boundary for v in amounts) + 1
    )
