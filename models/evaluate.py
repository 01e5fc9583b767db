"""``propstream eval``: the feature, labelling and model code run in-process, in event-time order.

No broker: events are validated by the same contract, folded by the same feature code, snapshotted
into the same ledger and learnt by the same online model as the worker uses, so the numbers here
are the numbers the stream produces for the same events. Scores are taken before the model learns
from a snapshot's label (test-then-train), so every figure is out-of-sample.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import msgspec

from features.contract import Rejected, Rules, parse
from features.state import FeatureParams, UserState
from features.user import apply, finalize
from models import quality, value_quality
from models.changes import ChangeRules
from models.ledger import Target
from models.online import ModelConfig
from models.scoring import Fired, LazyLedger, ScoreState, ScoringCore, TargetModel, input_names
from models.timers import TimerConfig
from models.trust import TrustGate, figures
from models.value import AnyModel, ValueConfig, ValueModel, fresh_model, learn_matured, matured_y
from models.value import figures as value_figures

DAY_MS = 86_400_000


@dataclass
class Outcome:
    """One matured snapshot as evaluation keeps it."""

    ts_ms: int
    resolved_ms: int
    score: float
    label: int
    x: list[float]
    oracle: float | None = None
    warm: bool = False  # scored by a model past warm-up: the scores that drive change events
    value: float = 0.0  # value targets: the revenue in the horizon


@dataclass
class EvalRun:
    target: Target
    outcomes: list[Outcome] = field(default_factory=list)
    events: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    first_ms: int = 0
    last_ms: int = 0
    input_names: list[str] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)  # change events by what rescored (event, silence)
    triggers: dict[str, int] = field(default_factory=dict)  # trigger events by trigger
    silence_snapshots: int = 0  # label snapshots sampled at silence points


def run(
    events: Iterable[Mapping[str, Any]],
    target: Target,
    *,
    rules: Rules | None = None,
    params: FeatureParams | None = None,
    change_rules: ChangeRules | None = None,
    model_config: ModelConfig | None = None,
    min_positives: int = 200,
    min_negatives: int = 200,
    trust: TrustGate | None = None,
    quality_window: int = 5000,
    judge_every: int = 100,
    model: AnyModel | None = None,
    learn: bool = True,
    oracle: Callable[[str, int], float | None] | None = None,
    now_ms: int | None = None,
    progress: Callable[[int], None] | None = None,
    timers: TimerConfig | None = None,
    value_config: ValueConfig | None = None,
) -> EvalRun:
    """Stream ``events`` (time-ordered canonical dicts) through features, ledger and model.

    Each snapshot is scored when sampled (test-then-train) and learnt when its horizon passes, in
    horizon order, exactly as the worker publishes it to the trainer. ``model`` starts from a given
    model (a published snapshot, say); ``learn=False`` keeps it fixed. ``rules``, ``params``,
    ``change_rules``, ``model_config`` and the warm-up counts are the worker's settings (the CLI
    builds them); the defaults are the settings' defaults. Without ``now_ms`` a log has no "now",
    so the future-time check is off. ``trust``: the quality gate, judged as the trainer does on the
    last ``quality_window`` (score, label) pairs, every ``judge_every`` matured labels (the trainer:
    once per batch), so "warm" means what it means on a worker; ``None``: counts only.
    """
    enc = msgspec.json.Encoder()
    rules = rules or Rules()
    if now_ms is None:
        rules = replace(rules, max_future_ms=10**15)
    clock_now = now_ms if now_ms is not None else 0
    params = params or FeatureParams()
    online = model or fresh_model(target.name, model_config or ModelConfig(), value_config)
    live = TargetModel(online, 0, min_positives=min_positives, min_negatives=min_negatives)
    window: deque[tuple[float, float]] = deque(maxlen=quality_window)  # (served score, label or revenue)

    def judged() -> dict[str, float]:
        scores = [s for s, _ in window]
        if isinstance(online, ValueModel):
            return value_figures(scores, [y for _, y in window]) if window else {}
        return figures((s, int(y)) for s, y in window)

    if trust is not None:
        live.verdict = trust.judge(judged(), value=target.value)
    core = ScoringCore((target,), params, change_rules or ChangeRules(), {target.name: live}, timers=timers)
    timer_heap: list[tuple[int, str]] = []  # (due, user): at or before each user's next timer
    clock = 0  # event time so far: a worker's watermark over one in-order stream
    states: dict[str, UserState] = {}
    scores: dict[str, ScoreState] = {}
    ledgers: dict[str, LazyLedger] = {}
    deadlines: list[tuple[int, str]] = []  # (horizon, user): may hold stale entries, checked on pop
    oracle_at: dict[tuple[str, int], float] = {}
    warm_at: set[tuple[str, int]] = set()
    out = EvalRun(target, input_names=list(input_names()))

    def mature(user: str, clock_ms: int) -> None:
        ss = scores[user]
        for m in core.expire(user, ss, ledgers[user], clock_ms):
            snap = m.snapshot
            vec = snap.features  # unpacked once, for the outcome and the learner
            out.outcomes.append(
                Outcome(
                    snap.ts_ms,
                    m.resolved_ms,
                    snap.score,
                    m.label,
                    vec,
                    oracle_at.pop((user, snap.ts_ms), None),
                    (user, snap.ts_ms) in warm_at,
                    snap.value,
                )
            )
            warm_at.discard((user, snap.ts_ms))
            if learn:
                learn_matured(online, dict(zip(out.input_names, vec, strict=True)), m.label, snap.value)
            window.append((snap.score, matured_y(online, m.label, snap.value)))
            if trust is not None and len(out.outcomes) % judge_every == 0:
                live.verdict = trust.judge(judged(), value=target.value)
        if ss.deadline_ms:
            heapq.heappush(deadlines, (ss.deadline_ms, user))

    def note(user: str, offered: list[Any]) -> None:
        for _, snap in offered:
            if not live.warming_up:
                warm_at.add((user, snap.ts_ms))
            if oracle is not None:
                p = oracle(user, snap.ts_ms)
                if p is not None:
                    oracle_at[(user, snap.ts_ms)] = p

    def published(fired: Fired | None, changes: list[dict[str, Any]]) -> None:
        for ch in changes:
            out.changes[ch["trigger"]] = out.changes.get(ch["trigger"], 0) + 1
        for tr in fired.triggers if fired is not None else ():
            out.triggers[tr["trigger"]] = out.triggers.get(tr["trigger"], 0) + 1

    def fire(user: str, at_ms: int) -> None:
        """The user's timers due by ``at_ms``, as the worker fires them."""
        ss = scores[user]
        before = ss.deadline_ms
        fired = core.fire(user, ss, ledgers[user], states[user], at_ms)
        note(user, fired.offered)
        out.silence_snapshots += len(fired.offered)
        published(fired, fired.changes)
        if ss.deadline_ms != before:
            heapq.heappush(deadlines, (ss.deadline_ms, user))
        if ss.timer_ms:
            heapq.heappush(timer_heap, (ss.timer_ms, user))

    for raw in events:
        out.events += 1
        if progress is not None and out.events % 10_000 == 0:
            progress(out.events)
        try:
            parsed = parse(enc.encode(raw), rules, clock_now)
        except Rejected as r:
            out.rejected[r.reason] = out.rejected.get(r.reason, 0) + 1
            continue
        for ev in parsed:
            if not ev.personalization:
                continue
            ts = ev.ts_ms
            out.first_ms = out.first_ms or ts
            out.last_ms = max(out.last_ms, ts)
            while timer_heap and timer_heap[0][0] <= clock:  # every user's timers the clock passed
                due, u = heapq.heappop(timer_heap)
                now = scores[u].timer_ms
                if now and now > due:
                    heapq.heappush(timer_heap, (now, u))
                elif now:
                    fire(u, clock)
            while deadlines and deadlines[0][0] < ts:
                end, u = heapq.heappop(deadlines)
                if scores[u].deadline_ms == end:
                    mature(u, end + 1)  # exactly the snapshots whose horizon is ``end``: horizon order
            user = ev.user_id
            st = states.get(user)
            if st is None:
                st = states[user] = UserState()
                scores[user] = ScoreState()
                ledgers[user] = LazyLedger(lambda: None)
            ss = scores[user]
            at = clock if clock >= ts else ts - 1
            if ss.timer_ms and ss.timer_ms <= at:  # passed before this event: fire as of then
                fire(user, at)
            clock = max(clock, ts)
            if apply(st, ev, params) is not None:
                continue
            finalize(st)
            before, timer_before = ss.deadline_ms, ss.timer_ms
            triggers: list[dict[str, Any]] = []
            note(user, core.on_event(ss, ledgers[user], st, ev, triggers))
            published(Fired(triggers=triggers), core.rescore(user, ss, st, ev)[1])
            if ss.deadline_ms != before:
                heapq.heappush(deadlines, (ss.deadline_ms, user))
            if ss.timer_ms and (not timer_before or ss.timer_ms < timer_before):
                heapq.heappush(timer_heap, (ss.timer_ms, user))
    return out


def why_nothing_matured(result: EvalRun) -> str | None:
    """Why no snapshot matured, in terms a data scientist can act on; ``None`` when some did.

    A snapshot matures when an event later than its horizon arrives, so the accepted events must
    span more than one horizon.
    """
    if result.outcomes:
        return None
    horizon_s = result.target.horizon_ms / 1000
    rejected = sum(result.rejected.values())
    if result.events and rejected == result.events:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
        hints = [hint for reason, hint in _REJECT_HINTS.items() if reason in result.rejected]
        return f"no snapshot matured: all {result.events:,} events were rejected ({reasons})" + "".join(
            f"; {h}" for h in hints
        )
    if not result.last_ms:
        return f"no snapshot matured: no event to evaluate ({result.events:,} read)"
    span_s = (result.last_ms - result.first_ms) / 1000
    return (
        f"no snapshot matured: the accepted events span {_days(span_s)} ({_utc(result.first_ms)} to "
        f"{_utc(result.last_ms)}), the horizon is {_days(horizon_s)}; labels mature one horizon after "
        "their snapshot, so give data longer than the horizon or a shorter --horizon"
    )


_REJECT_HINTS = {
    "too_old": "events before PROPSTREAM_EARLIEST_EVENT_TIME are refused: set it earlier for old logs",
    "unknown_type": "PROPSTREAM_CUSTOM_EVENTS adds event types",
    "oversize": "PROPSTREAM_MAX_EVENT_BYTES raises the size limit",
}


def _days(seconds: float) -> str:
    return f"{round(seconds / 86400, 1):g} d" if seconds >= 86400 else f"{round(seconds / 3600, 1):g} h"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%MZ")


def summary(result: EvalRun, *, baseline: bool = False, bootstrap: int = 0) -> dict[str, Any]:
    """The report: online quality on every matured snapshot, oracle and offline baselines when asked."""
    if result.target.value:
        return value_summary(result, baseline=baseline)
    o = result.outcomes
    scores = [x.score for x in o]
    labels = [x.label for x in o]
    rep: dict[str, Any] = {**_head(result), **quality.report(scores, labels)}
    if bootstrap and labels:
        rep["roc_auc_ci95"] = quality.bootstrap_ci(quality.roc_auc, scores, labels, rounds=bootstrap)
        rep["pr_auc_ci95"] = quality.bootstrap_ci(quality.pr_auc, scores, labels, rounds=bootstrap)
    with_oracle = [x for x in o if x.oracle is not None]
    if with_oracle:
        ys = [x.label for x in with_oracle]
        rep["oracle_roc_auc"] = quality.roc_auc([x.oracle for x in with_oracle], ys)  # type: ignore[misc]
        rep["oracle_ece"] = quality.ece([x.oracle for x in with_oracle], ys)  # type: ignore[misc]
        rep["online_roc_auc_same_snapshots"] = quality.roc_auc([x.score for x in with_oracle], ys)
        rep["ratio_to_oracle"] = rep["online_roc_auc_same_snapshots"] / rep["oracle_roc_auc"]
    warm = [x for x in o if x.warm]
    if warm:
        ys = [x.label for x in warm]
        after: dict[str, Any] = quality.report([x.score for x in warm], ys)
        warm_oracle = [x for x in warm if x.oracle is not None]
        if warm_oracle:
            yo = [x.label for x in warm_oracle]
            after["oracle_roc_auc"] = quality.roc_auc([x.oracle for x in warm_oracle], yo)  # type: ignore[misc]
            after["ratio_to_oracle"] = (
                quality.roc_auc([x.score for x in warm_oracle], yo) / after["oracle_roc_auc"]
            )
        rep["after_warmup"] = after
    if baseline:
        rep["baselines"] = baselines(result, bootstrap=bootstrap)
    return rep


def split(result: EvalRun) -> tuple[list[Outcome], list[Outcome], dict[str, Any]]:
    """The point-in-time split of the offline baselines: snapshots whose window closed before 70%
    of the event-time span, and those taken after it; and the report's figures of the split."""
    times = sorted(x.ts_ms for x in result.outcomes)
    lo, hi = times[int(0.001 * (len(times) - 1))], times[int(0.999 * (len(times) - 1))]
    cutoff = lo + 0.7 * (hi - lo)
    horizon = result.target.horizon_ms
    train = [x for x in result.outcomes if x.ts_ms + horizon < cutoff]
    test = [x for x in result.outcomes if x.ts_ms >= cutoff]
    return train, test, {"cutoff_ms": int(cutoff), "train": len(train), "test": len(test)}


def baselines(result: EvalRun, *, bootstrap: int = 0) -> dict[str, Any]:
    """Offline models on the first 70% of event time, tested on the last 30%.

    Training takes only snapshots whose whole label window closed before the cutoff: taking every
    label *known* by then would over-sample positives near the cutoff (they resolve early). The
    span runs between the 0.1% and 99.9% quantiles of snapshot times, so a few stray timestamps
    (the Taobao sample has one 74 days early) cannot move the cutoff.
    """
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not result.outcomes:
        return {"error": "no matured snapshots"}
    train, test, out = split(result)
    if len({x.label for x in train}) < 2 or len({x.label for x in test}) < 2:
        out["error"] = "not enough of both labels on each side of the 70% cutoff"
        return out
    xtr = np.array([x.x for x in train])
    ytr = np.array([x.label for x in train])
    xte = np.array([x.x for x in test])
    yte = [x.label for x in test]

    def figures(scores: list[float]) -> dict[str, Any]:
        f: dict[str, Any] = {"roc_auc": quality.roc_auc(scores, yte), "pr_auc": quality.pr_auc(scores, yte)}
        if bootstrap:
            f["roc_auc_ci95"] = quality.bootstrap_ci(quality.roc_auc, scores, yte, rounds=bootstrap)
            f["pr_auc_ci95"] = quality.bootstrap_ci(quality.pr_auc, scores, yte, rounds=bootstrap)
        return f

    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    gbdt = HistGradientBoostingClassifier(random_state=0).fit(xtr, ytr)
    out["logreg"] = figures([float(p) for p in logreg.predict_proba(xte)[:, 1]])
    out["gbdt"] = figures([float(p) for p in gbdt.predict_proba(xte)[:, 1]])
    out["online"] = figures([x.score for x in test])
    return out


def format_report(rep: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        if isinstance(v, tuple | list) and len(v) == 2:
            return f"[{fmt(v[0])}, {fmt(v[1])}]"
        return str(v)

    lines = [f"target {rep['target']}, horizon {rep['horizon_s'] / 86400:g} d, {rep['events']:,} events"]
    if "gini" in rep:
        return "\n".join(lines + _value_lines(rep, fmt))
    for k in (
        "matured",
        "positives",
        "base_rate",
        "roc_auc",
        "roc_auc_ci95",
        "pr_auc",
        "pr_auc_ci95",
        "log_loss",
        "brier",
        "ece",
        "oracle_roc_auc",
        "online_roc_auc_same_snapshots",
        "ratio_to_oracle",
        "oracle_ece",
        "silence_snapshots",
        "changes",
        "triggers",
    ):
        if k in rep:
            lines.append(f"  {k:<30} {fmt(rep[k])}")
    w = rep.get("after_warmup")
    if w:
        extra = f"  ratio_to_oracle {fmt(w['ratio_to_oracle'])}" if "ratio_to_oracle" in w else ""
        lines.append(
            f"  after warm-up ({w['matured']:,} matured): roc_auc {fmt(w['roc_auc'])}  "
            f"pr_auc {fmt(w['pr_auc'])}  ece {fmt(w['ece'])}{extra}"
        )
    if rep.get("rejected"):
        lines.append(f"  rejected by reason             {rep['rejected']}")
    b = rep.get("baselines")
    if b and "train" not in b:
        lines.append(f"  baselines: {b.get('error', 'not computed')}")
    elif b:
        lines.append(
            f"  baselines: train {b['train']:,} snapshots closed before 70% of event time, test {b['test']:,}"
        )
        for name in ("online", "logreg", "gbdt"):
            if name in b:
                f = b[name]
                ci = f" {fmt(f['roc_auc_ci95'])} / {fmt(f['pr_auc_ci95'])}" if "roc_auc_ci95" in f else ""
                lines.append(f"    {name:<8} roc_auc {fmt(f['roc_auc'])}  pr_auc {fmt(f['pr_auc'])}{ci}")
        if "error" in b:
            lines.append(f"    {b['error']}")
    return "\n".join(lines)


def _head(result: EvalRun) -> dict[str, Any]:
    """What every report starts with: the target, the data and what the run published."""
    return {
        "target": result.target.name,
        "horizon_s": result.target.horizon_ms // 1000,
        "events": result.events,
        "rejected": result.rejected,
        "silence_snapshots": result.silence_snapshots,
        "changes": result.changes,
        "triggers": result.triggers,
    }


def value_summary(result: EvalRun, *, baseline: bool = False) -> dict[str, Any]:
    """A value target's report: ``models.value_quality`` figures of the online scores against the
    revenue that came, the oracle's on the same snapshots, and offline baselines when asked."""
    o = result.outcomes
    rep = {**_head(result), **value_quality.report([x.score for x in o], [x.value for x in o])}
    with_oracle = [x for x in o if x.oracle is not None]
    if with_oracle:
        actual = [x.value for x in with_oracle]
        oracle = [float(x.oracle or 0.0) for x in with_oracle]
        rep["oracle_gini"] = value_quality.gini(oracle, actual)
        rep["oracle_top_decile_capture"] = value_quality.top_decile_capture(oracle, actual)
        rep["oracle_mae"] = value_quality.mae(oracle, actual)
        rep["online_gini_same_snapshots"] = value_quality.gini([x.score for x in with_oracle], actual)
        rep["ratio_to_oracle"] = rep["online_gini_same_snapshots"] / rep["oracle_gini"]
    warm = [x for x in o if x.warm]
    if warm:
        rep["after_warmup"] = value_figures([x.score for x in warm], [x.value for x in warm])
    if baseline:
        rep["baselines"] = value_baselines(result)
    return rep


def value_baselines(result: EvalRun) -> dict[str, Any]:
    """Offline value baselines on the point-in-time split of :func:`baselines` (train on snapshots
    closed before 70% of event time, test on the last 30%), each with the same figures:
    - ``mean``: the user's historical revenue per day times the horizon (revenue_90d over
      min(90 days, tenure), read back from the snapshot's inputs): what a rule of thumb predicts;
    - ``gbdt``: gradient-boosted trees with a Poisson loss (non-negative, zero-inflated targets)
      on the same inputs;
    - ``online``: the online model's served scores on the same test snapshots.
    """
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor

    if not result.outcomes:
        return {"error": "no matured snapshots"}
    train, test, out = split(result)
    if not any(x.value > 0 for x in train) or not any(x.value > 0 for x in test):
        out["error"] = "no revenue on one side of the 70% cutoff"
        return out
    actual = [x.value for x in test]
    names = result.input_names
    rev, tenure = names.index("revenue_90d"), names.index("tenure_days")
    days = result.target.horizon_ms / DAY_MS

    def historical(x: list[float]) -> float:  # the inputs are log1p of the features
        return math.expm1(x[rev]) / (min(90.0, math.expm1(x[tenure])) + 1.0) * days

    gbdt = HistGradientBoostingRegressor(loss="poisson", random_state=0)
    gbdt.fit(np.array([x.x for x in train]), np.array([x.value for x in train]))
    out["mean"] = value_quality.report([historical(x.x) for x in test], actual)
    out["gbdt"] = value_quality.report(
        [float(v) for v in gbdt.predict(np.array([x.x for x in test]))], actual
    )
    out["online"] = value_quality.report([x.score for x in test], actual)
    return out


VALUE_FIGURES: tuple[str, ...] = (
    *("matured", "positives", "mean_actual", "mean_predicted", "mae", "rmse", "gini"),
    *("top_decile_capture", "calibration_ratio", "oracle_gini", "online_gini_same_snapshots"),
    *("ratio_to_oracle", "oracle_top_decile_capture", "silence_snapshots", "changes"),
)


def _value_lines(rep: Mapping[str, Any], fmt: Callable[[Any], str]) -> list[str]:
    lines = [f"  {k:<30} {fmt(rep[k])}" for k in VALUE_FIGURES if k in rep]
    for d in rep.get("decile_calibration", ()):
        lines.append(
            f"  decile {d['decile']:>2}: n {d['n']:>6,}  predicted {fmt(d['mean_predicted'])}  "
            f"actual {fmt(d['mean_actual'])}"
        )
    if rep.get("rejected"):
        lines.append(f"  rejected by reason             {rep['rejected']}")
    b = rep.get("baselines")
    if b and ("train" not in b or "error" in b):
        lines.append(f"  baselines: {b.get('error', 'not computed')}")
    elif b:
        lines.append(
            f"  baselines: train {b['train']:,} snapshots closed before 70% of event time, test {b['test']:,}"
        )
        for name in ("online", "mean", "gbdt"):
            f = b[name]
            lines.append(
                f"    {name:<8} gini {fmt(f['gini'])}  top_decile_capture {fmt(f['top_decile_capture'])}  "
                f"mae {fmt(f['mae'])}  rmse {fmt(f['rmse'])}  calibration_ratio {fmt(f['calibration_ratio'])}"
            )
    return lines
