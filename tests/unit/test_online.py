"""The online model and the in-process evaluation: explanations, learning, report keys, determinism."""

from __future__ import annotations

import math
import random

import pytest

from features.state import FeatureParams, UserState
from features.user import compute
from models.evaluate import run, summary
from models.ledger import make_target
from models.online import ModelConfig, OnlineModel, decay, inputs, per_day
from traffic.simulator import SimConfig, simulate_with_truth

START = 1_700_000_000_000


def test_contributions_plus_intercept_reproduce_the_logit() -> None:
    rng = random.Random(0)
    model = OnlineModel()
    for _ in range(3000):
        x = {"a": rng.random(), "b": rng.random() * 10}
        model.learn(x, int(x["a"] + 0.2 * rng.random() > 0.7))
    for _ in range(20):
        x = {"a": rng.random(), "b": rng.random() * 10}
        contrib, intercept = model.contributions(x)
        assert sum(contrib.values()) + intercept == pytest.approx(model.logit(x), abs=1e-9)
    # and it learnt the direction: feature a raises the score
    assert model.score({"a": 0.95, "b": 5}) > model.score({"a": 0.05, "b": 5})


def test_inputs_are_finite_and_flag_never_seen() -> None:
    x = inputs(compute(UserState(), START, FeatureParams()))
    assert all(math.isfinite(v) for v in x.values())
    assert x["never_s_since_last_purchase"] == 1.0 and x["s_since_last_purchase"] == 0.0


def test_rate_and_decay_transforms_by_hand() -> None:
    assert per_day(6, 2.5, 0.5) == pytest.approx(math.log(6.5 / 3.0))  # (6 + 0.5) / (2.5 + 0.5)
    assert per_day(0, 0.0, 1.0) == pytest.approx(math.log(2.0))  # a brand-new user: 1 / 0.5
    assert decay(7 * 86400.0, 7 * 86400.0) == pytest.approx(math.exp(-1.0))
    assert decay(0.0, 60.0) == 1.0 and decay(None, 60.0) == 0.0


def a_regular() -> dict[str, float | int | bool | None]:
    f = compute(UserState(), START, FeatureParams())
    f.update(
        tenure_days=3.0,
        sessions_7d=4,
        n_events_30d=19,
        n_page_view_30d=9,
        n_add_to_cart_30d=2,
        n_events_7d=15,
        n_add_to_cart_1h=1,
        s_since_last_add_to_cart=86400.0,
        s_since_last_purchase=0.0,
        cart_abandoned=True,
    )
    return f


def test_inputs_of_a_user_by_hand() -> None:
    x = inputs(a_regular())
    # windows still filling: rates are per day of tenure (3 days, smoothed by half a day)
    assert x["sessions_7d"] == pytest.approx(math.log(4.5 / 3.5))
    assert x["n_events_30d"] == pytest.approx(math.log(20 / 3.5))
    assert x["n_add_to_cart_30d"] == pytest.approx(math.log(2.5 / 3.5))
    # a difference of two rates is the funnel ratio: adds per page view
    assert x["n_add_to_cart_30d"] - x["n_page_view_30d"] == pytest.approx(math.log(2.5 / 10))
    assert x["n_events_7d"] == pytest.approx(math.log(16))
    assert x["n_add_to_cart_1h"] == pytest.approx(math.log(2))
    assert x["never_s_since_last_add_to_cart"] == 0.0
    assert x["s_since_last_add_to_cart"] == pytest.approx(math.exp(-1.0))  # tau 1 day
    assert x["s_since_last_purchase"] == 1.0 and x["never_s_since_last_purchase"] == 0.0
    assert x["cart_abandoned"] == 1.0
    # a 40-day regular: the 30-day rate divides by the window, not the tenure
    f = a_regular()
    f["tenure_days"] = 40.0
    assert inputs(f)["n_events_30d"] == pytest.approx(math.log(20 / 30.5))


def test_inputs_have_the_same_keys_in_the_same_order_every_call() -> None:
    new = list(inputs(compute(UserState(), START, FeatureParams())))
    assert list(inputs(a_regular())) == new
    assert len(set(new)) == len(new)


def test_an_untrained_model_scores_its_prior() -> None:
    x = inputs(a_regular())
    assert OnlineModel().score(x) == pytest.approx(0.3)
    assert OnlineModel(ModelConfig(prior=0.02)).score(x) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="prior"):
        ModelConfig(prior=1.0)


@pytest.fixture(scope="module")
def sim_run() -> tuple[list[dict[str, object]], dict[tuple[str, int], float]]:
    pairs = list(simulate_with_truth(SimConfig(users=600, seed=3, days=40, start_ms=START)))
    truth = {(t.user_id, t.ts_ms): t.p_purchase for _, t in pairs}
    return [e for e, _ in pairs], truth


def test_eval_report_has_the_documented_keys_and_learns(sim_run: tuple) -> None:
    events, truth = sim_run
    result = run(events, make_target("purchase", 7 * 86400), oracle=lambda u, ts: truth.get((u, ts)))
    rep = summary(result, baseline=True)
    for key in (
        "target",
        "horizon_s",
        "matured",
        "positives",
        "roc_auc",
        "pr_auc",
        "log_loss",
        "brier",
        "ece",
        "oracle_roc_auc",
    ):
        assert key in rep, key
    for name in ("logreg", "gbdt"):
        assert {"roc_auc", "pr_auc"} <= set(rep["baselines"][name])
    assert rep["matured"] > 2000 and 0 < rep["positives"] < rep["matured"]
    # every matured snapshot was scored before its label was learnt: early scores are the untrained prior
    assert result.outcomes[0].score == pytest.approx(ModelConfig().prior)
    late = result.outcomes[len(result.outcomes) // 2 :]
    assert len({round(o.score, 6) for o in late}) > 100  # the model moved
    assert rep["oracle_roc_auc"] > rep["roc_auc"] > 0.6


def test_eval_is_deterministic(sim_run: tuple) -> None:
    events, _ = sim_run
    a = run(events[:20000], make_target("purchase", 7 * 86400))
    b = run(events[:20000], make_target("purchase", 7 * 86400))
    assert [(o.ts_ms, o.score, o.label) for o in a.outcomes] == [
        (o.ts_ms, o.score, o.label) for o in b.outcomes
    ]
