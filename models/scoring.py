"""Per-user scoring: snapshots into the ledger, labels out at the horizon, scores and change events.

One pure core shared by the worker (``streams/score_stage.py``) and ``propstream eval``, so both
sample the same snapshots, assign the same labels and compute the same scores from the same events
and model. Per user it keeps a small :class:`ScoreState` (read every batch) and a larger
:class:`~models.ledger.UserLedger` (read only when an event could label a pending snapshot, a
snapshot is due, or a horizon has passed: :class:`LazyLedger`).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from features.catalogue import NAMES
from features.contract import Event
from features.state import Corrupt, FeatureParams, UserState, decode_versioned
from features.user import FeatureValue, Finalizer, compute
from models.audiences import Audience, Cut, View, members
from models.changes import Announced, ChangeRules, detect, tier_of, value_rules
from models.fastscore import FastScorer
from models.ledger import (
    LEDGER_VERSION,
    READABLE_LEDGERS,
    VALUE,
    Matured,
    Snapshot,
    Target,
    UserLedger,
    due,
    expire,
    next_deadline,
    observe,
    offer,
    open_from,
    upgrade_v1,
)
from models.online import INPUT_NAMES, input_vector, inputs
from models.timers import (
    CART_ABANDONED,
    CART_EVENTS,
    REPEAT_VIEW,
    SILENCE,
    TimerConfig,
    cart_due,
    next_due,
    repeat_view,
    silence_done,
    silence_due,
)
from models.trust import NO_GATE, Verdict, combine, labels
from models.value import AnyModel, ValueModel

SCORE_STATE_VERSION = 1


def input_names() -> tuple[str, ...]:
    """The model inputs in one fixed order: the order of snapshot vectors and training examples."""
    return INPUT_NAMES


@dataclass
class TargetModel:
    """The model a process scores a target with: the live version, or the in-process one in eval."""

    model: AnyModel
    version: int
    min_positives: int = 200
    min_negatives: int = 200
    verdict: Verdict = NO_GATE  # the trust gate's verdict on this version's quality (models/trust.py)

    @property
    def warming_up(self) -> bool:
        """Not trusted: too few matured labels learnt, or the quality gate refuses the served scores.

        Scores are marked and no change is announced. Read per user and target on the hot path, so
        it compares numbers and builds no reason (that is :attr:`trust`).
        """
        return (
            self.model.positives < self.min_positives
            or self.model.negatives < self.min_negatives
            or not self.verdict.trusted
        )

    @property
    def trust(self) -> Verdict:
        """Whether the model is trusted and why (lookups, ``/models``): the counts, then the gate."""
        m = self.model
        return combine(labels(m.positives, m.negatives, self.min_positives, self.min_negatives), self.verdict)


class TargetState(msgspec.Struct, array_like=True):
    sampled_ms: int = -1  # time of the last snapshot sampled (-1: never)
    open_ms: int = -1  # oldest pending snapshot an event could still label (-1: none)
    announced: Announced | None = None  # what downstream systems were last told
    features: bytes = b""  # raw features at that announcement (float64, catalogue order)
    score: float = -1.0  # the latest score, kept only when audiences are defined (-1: none)


class ScoreState(msgspec.Struct, array_like=True):
    """The per-user model-side state read on every batch; small on purpose.

    The timer fields come last, so states written before timers existed read with no timer.
    """

    v: int = SCORE_STATE_VERSION
    targets: dict[str, TargetState] = msgspec.field(default_factory=dict)
    deadline_ms: int = 0  # earliest horizon among pending snapshots (0: none)
    timer_ms: int = 0  # next timer due (models/timers.py; 0: none)
    quiet_from_ms: int = 0  # the last event the silence points fired so far count from
    quiet_done: int = 0  # silence points fired since ``quiet_from_ms``
    cart_done_ms: int = 0  # start of the last cart episode whose trigger fired
    cart_due_ms: int = 0  # when the open cart is abandoned (0: none), kept between cart events
    viewed: dict[str, int] = msgspec.field(default_factory=dict)  # product -> day a repeat view fired
    # the audiences the user is in, in definition order, and when each last moved (recent ones)
    audiences: list[str] = msgspec.field(default_factory=list)
    moved_ms: dict[str, int] = msgspec.field(default_factory=dict)


@dataclass
class Fired:
    """What firing a user's due timers produced: change events, trigger events, snapshots."""

    changes: list[dict[str, Any]] = field(default_factory=list)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    offered: list[tuple[Target, Snapshot]] = field(default_factory=list)
    audiences: list[dict[str, Any]] = field(default_factory=list)  # entered / left


class Rescored(NamedTuple):
    """What rescoring a user produced: every target's score, change events, audience moves."""

    scores: dict[str, float]
    changes: list[dict[str, Any]]
    audiences: list[dict[str, Any]]


_ss_enc = msgspec.msgpack.Encoder()
_ss_dec = msgspec.msgpack.Decoder(ScoreState)
_led_dec = msgspec.msgpack.Decoder(UserLedger)


def encode(obj: ScoreState | UserLedger) -> bytes:
    return _ss_enc.encode(obj)


def decode_state(raw: bytes | None) -> ScoreState:
    """The stored score state (a fresh one when absent); :class:`Corrupt` for garbage or another version."""
    return decode_versioned(_ss_dec, raw, "scores", SCORE_STATE_VERSION, ScoreState)


def decode_ledger(raw: bytes | None) -> UserLedger:
    """The stored ledger (an empty one when absent; one of layout 2 as it is, its snapshots dense;
    one of layout 1 upgraded); :class:`Corrupt` for garbage or another version."""
    if not raw:
        return UserLedger()
    try:
        led = _led_dec.decode(raw)
    except msgspec.DecodeError as exc:
        old = upgrade_v1(raw)
        if old is None:
            raise Corrupt(what="ledger", detail=str(exc)) from None
        return old
    if led.v in READABLE_LEDGERS:
        led.v = LEDGER_VERSION  # written back in today's layout
        return led
    old = upgrade_v1(raw)  # a layout-1 ledger with nothing pending decodes as either
    if old is None:
        msg = f"layout version {led.v}, this version reads {', '.join(map(str, READABLE_LEDGERS))}"
        raise Corrupt(what="ledger", detail=msg)
    return old


class LazyLedger:
    """A user's ledger, loaded on first use only; ``dirty`` once changed.

    An unreadable stored ledger raises :class:`Corrupt`, or, given ``on_corrupt`` (the worker),
    is reported there and replaced by an empty one that is written back (``dirty``): its pending
    snapshots are lost, the user's stream is not.
    """

    __slots__ = ("_ledger", "_load", "_on_corrupt", "dirty")

    def __init__(
        self, load: Callable[[], bytes | None], on_corrupt: Callable[[Corrupt], None] | None = None
    ) -> None:
        self._load = load
        self._on_corrupt = on_corrupt
        self._ledger: UserLedger | None = None
        self.dirty = False

    def get(self) -> UserLedger:
        if self._ledger is None:
            try:
                self._ledger = decode_ledger(self._load())
            except Corrupt as exc:
                if self._on_corrupt is None:
                    raise
                self._on_corrupt(exc)
                self._ledger = UserLedger()
                self.dirty = True
        return self._ledger

    @property
    def loaded(self) -> UserLedger | None:
        return self._ledger


def _pack(feats: Mapping[str, FeatureValue]) -> bytes:
    return array("d", [math.nan if feats[n] is None else float(feats[n]) for n in NAMES]).tobytes()  # type: ignore[arg-type]


def _unpack(raw: bytes) -> dict[str, float]:
    if not raw:
        return {}
    values = array("d")
    values.frombytes(raw)
    return dict(zip(NAMES, values, strict=True))


def source_feature(input_name: str) -> str:
    """The served feature an input derives from (inputs such as ``never_x`` explain ``x``)."""
    if input_name.startswith("never_"):
        return input_name[6:]
    return input_name


def top_factors(
    model: AnyModel,
    x: Mapping[str, float],
    feats: Mapping[str, FeatureValue],
    previous: Mapping[str, float],
    k: int,
) -> list[dict[str, Any]]:
    """The ``k`` features with the largest contribution to the logit, and how each moved."""
    contrib, _ = model.contributions(x)
    by_feature: dict[str, float] = {}
    for name, c in contrib.items():
        src = source_feature(name)
        by_feature[src] = by_feature.get(src, 0.0) + c
    out = []
    for name, c in sorted(by_feature.items(), key=lambda kv: -abs(kv[1]))[:k]:
        raw = feats.get(name, x.get(name))
        value = None if raw is None else float(raw)
        prev = previous.get(name)
        prev = None if prev is None or math.isnan(prev) else float(prev)
        out.append(
            {
                "feature": name,
                "contribution": round(c, 6),
                "value": value,
                "previous": prev,
                "change": None if value is None or prev is None else round(value - prev, 6),
            }
        )
    return out


def engaged(feats: Mapping[str, FeatureValue]) -> bool:
    """An engaged user: two sessions or more in the last 7 days (a purchase-score collapse is churn risk)."""
    return (feats.get("sessions_7d") or 0) >= 2


class ScoringCore:
    """Sampling, labelling and change detection for a set of targets; no I/O."""

    def __init__(
        self,
        targets: tuple[Target, ...],
        params: FeatureParams,
        rules: ChangeRules,
        models: Mapping[str, TargetModel],
        top_k: int = 5,
        timers: TimerConfig | None = None,
        audiences: tuple[Audience, ...] = (),
        audience_cooldown_ms: int = 0,
        currency: str = "USD",
    ) -> None:
        self.targets = targets
        self._names = tuple(t.name for t in targets)
        self.currency = currency  # the deployment's: value scores are amounts in it
        self.audiences = audiences
        # the percentile cuts in force and the targets not trusted yet, set by the caller per
        # partition and batch (models/audience_stats.py); models swap only between batches
        self.cuts: Mapping[Cut, tuple[int, int]] = {}
        self.untrusted: list[str] | None = None  # None: asked at each evaluation
        self.audience_cooldown_ms = audience_cooldown_ms
        self._audience_targets = tuple(t for t in targets if any(t.name in a.targets for a in audiences))
        self._tier_targets = tuple(t for t in targets if any(t.name in a.tiers for a in audiences))
        self.params = params
        self.timers = timers or TimerConfig(cart_after_ms=params.abandon_after_ms)
        self.rules = rules
        self._value_rules: tuple[object, int, ChangeRules] = (None, -1, rules)  # (model, labels, rules)
        self.has_value = any(t.name == VALUE for t in targets)
        self.models = models  # the caller may swap entries at any time (hot swap)
        self.top_k = top_k
        self.last_vector: list[float] = []  # inputs of the latest rescore, INPUT_NAMES order (drift)
        self.fast = FastScorer()
        self.finalize = Finalizer()  # the stage and the handler call this one too: one memo per core
        # features of the latest compute(), keyed by the state object and its clock: a rescore right
        # after sampling a snapshot (no event in between) reuses them instead of computing twice
        self._cached: tuple[UserState, int, int, int, dict[str, FeatureValue], list[float]]
        self._cached = (UserState(), -1, -1, -1, {}, [])

    @staticmethod
    def target_state(ss: ScoreState, name: str) -> TargetState:
        t = ss.targets.get(name)
        if t is None:
            t = ss.targets[name] = TargetState()
        return t

    def on_event(
        self,
        ss: ScoreState,
        ledger: LazyLedger,
        st: UserState,
        ev: Event,
        triggers: list[dict[str, Any]] | None = None,
    ) -> list[tuple[Target, Snapshot]]:
        """``ev`` was just folded into ``st``: label what it resolves, sample a snapshot if due.

        A product view that makes a repeat-view trigger appends it to ``triggers`` (when given).
        """
        for t in self.targets:
            ts = self.target_state(ss, t.name)
            if ts.open_ms >= 0 and ev.ts_ms > ts.open_ms + t.grace_ms and t.matches(ev.type):
                led = ledger.get()
                if observe(led, (t,), ev.type, ev.ts_ms, ev.revenue):
                    o = open_from(led, t)
                    ts.open_ms = -1 if o is None else o
                    ledger.dirty = True
        # features as of the user's newest event: nothing later is in them
        offered = self._sample(ss, ledger, st, st.last_ms)
        if triggers is not None and ev.type == "product_view" and ev.product_id is not None:
            views = repeat_view(self.timers, st, ss.viewed, ev.product_id, ev.ts_ms)
            if views:
                facts = {"product_id": ev.product_id, "views_24h": views, "price": ev.price}
                triggers.append(self._trigger(REPEAT_VIEW, st, max(ev.ts_ms, st.last_ms), ev.ts_ms, facts))
        self.schedule(ss, st, ev.type in CART_EVENTS)
        return offered

    def _sample(
        self, ss: ScoreState, ledger: LazyLedger, st: UserState, at_ms: int
    ) -> list[tuple[Target, Snapshot]]:
        """Offer a snapshot as of ``at_ms`` for every target whose sampling period has passed."""
        x: dict[str, float] | None = None
        scores: list[float] = []
        vec: list[float] = []
        offered: list[tuple[Target, Snapshot]] = []
        for t in self.targets:
            ts = self.target_state(ss, t.name)
            if due(ts.sampled_ms if ts.sampled_ms >= 0 else None, t, at_ms):
                ts.sampled_ms = at_ms
                if x is None:
                    self.finalize(st)  # free when the caller just finalised (the worker, per event)
                    _, vec = self._features(st, at_ms)
                    scores = self._scores(vec)
                m = self.models[t.name]
                snap = Snapshot.of(at_ms, vec, scores[self.targets.index(t)], m.version)
                if offer(ledger.get(), t, snap):
                    ledger.dirty = True
                    offered.append((t, snap))
                    if ts.open_ms < 0:
                        ts.open_ms = at_ms
                    end = at_ms + t.horizon_ms
                    if ss.deadline_ms == 0 or end < ss.deadline_ms:
                        ss.deadline_ms = end
        return offered

    # --- timers ----------------------------------------------------------------------------------
    def schedule(self, ss: ScoreState, st: UserState, cart_moved: bool = True) -> int:
        """Set and return the user's next timer (``ss.timer_ms``; 0: none).

        Called after every accepted event, so a user's own later event can never jump a timer:
        the silence point is cheap to derive; the cart's is derived again only when the cart can
        have moved (``cart_moved``: a cart event or a purchase, or a timer fired).
        """
        cfg = self.timers
        if cart_moved:
            ss.cart_due_ms = cart_due(cfg, st, ss.cart_done_ms)
        silence = silence_due(cfg, st, ss.quiet_from_ms, ss.quiet_done)
        cart = ss.cart_due_ms
        ss.timer_ms = min(silence, cart) if silence and cart else silence or cart
        return ss.timer_ms

    def fire(self, user_id: str, ss: ScoreState, ledger: LazyLedger, st: UserState, clock_ms: int) -> Fired:
        """Fire, in due order, every timer of the user due at or before ``clock_ms``.

        Each fires as of its own due time (a cart timer of a user with later events, as of the
        newest event: the state holds no earlier view), so the outputs depend only on the user's
        events and the due times, never on when the clock happened to pass them.
        """
        out = Fired()
        while True:
            d = next_due(self.timers, st, ss.quiet_from_ms, ss.quiet_done, ss.cart_done_ms)
            if d is None or d.ts_ms > clock_ms:
                break
            as_of = max(d.ts_ms, st.last_ms)
            if d.kind == SILENCE:
                ss.quiet_done = silence_done(ss.quiet_from_ms, ss.quiet_done, st.last_ms) + 1
                ss.quiet_from_ms = st.last_ms
                out.offered.extend(self._sample(ss, ledger, st, d.ts_ms))
                cause = {"trigger": SILENCE, "event_id": f"{SILENCE}:{d.ts_ms}", "event_ts_ms": d.ts_ms}
                done = self._rescore(user_id, ss, st, as_of, cause)
                out.changes.extend(done.changes)
                out.audiences.extend(done.audiences)
            elif d.kind == CART_ABANDONED and d.cart is not None:
                ss.cart_done_ms = d.cart.start_ms
                c = d.cart
                facts = {
                    "cart_value": c.value,
                    "cart_items": c.items,
                    "lines": [{"product_id": p, "quantity": q, "price": pr} for p, q, pr in sorted(c.lines)],
                    "cart_started_ms": c.start_ms,
                    "cart_changed_ms": c.changed_ms,
                }
                out.triggers.append(self._trigger(CART_ABANDONED, st, as_of, d.ts_ms, facts))
        self.schedule(ss, st)
        return out

    def _trigger(
        self, kind: str, st: UserState, as_of_ms: int, due_ms: int, facts: dict[str, Any]
    ) -> dict[str, Any]:
        """A trigger event's body: what fired, when, the facts a campaign needs, the scores then."""
        self.finalize(st)
        _, vec = self._features(st, as_of_ms)
        scores = {}
        for t, score in zip(self.targets, self._scores(vec), strict=True):
            m = self.models[t.name]
            scores[t.name] = {
                "score": round(score, 6),
                "warming_up": m.warming_up,
                "model_version": m.version,
            }
        key = facts.get("product_id") or ""
        return {
            "trigger": kind,
            "trigger_id": f"{kind}:{due_ms}" + (f":{key}" if key else ""),
            "event_ts_ms": due_ms,
            "facts": facts,
            "scores": scores,
        }

    def expire(self, user_id: str, ss: ScoreState, ledger: LazyLedger, clock_ms: int) -> list[Matured]:
        """Snapshots whose horizon is before ``clock_ms`` leave the ledger with their labels."""
        if ss.deadline_ms == 0 or clock_ms <= ss.deadline_ms:
            return []
        led = ledger.get()
        out = expire(led, user_id, self.targets, clock_ms)
        ss.deadline_ms = next_deadline(led, self.targets)
        for t in self.targets:
            o = open_from(led, t)
            self.target_state(ss, t.name).open_ms = -1 if o is None else o
        ledger.dirty = True
        return out

    def score_all(self, st: UserState, as_of_ms: int) -> tuple[dict[str, FeatureValue], dict[str, float]]:
        feats = compute(st, as_of_ms, self.params)
        return feats, inputs(feats)

    def _features(self, st: UserState, as_of_ms: int) -> tuple[dict[str, FeatureValue], list[float]]:
        """Features and the input vector of ``st`` as of ``as_of_ms`` (cached, see ``__init__``)."""
        c = self._cached
        if c[0] is st and c[1] == st.events and c[2] == st.last_ms and c[3] == as_of_ms:
            return c[4], c[5]
        feats = compute(st, as_of_ms, self.params)
        vec = input_vector(feats)
        self._cached = (st, st.events, st.last_ms, as_of_ms, feats, vec)
        return feats, vec

    def _scores(self, vec: list[float]) -> list[float]:
        """Every target's score, in target order: ``model.score(x)`` each, via ``models.fastscore``."""
        models = [self.models[t.name].model for t in self.targets]
        return self.fast.scores_of(models, input_names(), vec)

    def rules_of(self, target: str) -> ChangeRules:
        """The change rules of ``target``: the value target's tiers are amounts set from its live
        model (``models.changes.value_rules``), re-derived when the model changes."""
        if target != VALUE:
            return self.rules
        m = self.models[target].model
        n = m.positives + m.negatives
        cached, seen, rules = self._value_rules
        if cached is not m or seen != n:
            mean = m.mean_value if isinstance(m, ValueModel) else 0.0
            rules = value_rules(self.rules, mean)
            self._value_rules = (m, n, rules)
        return rules

    def expected_value(self, scores: Mapping[str, float]) -> float | None:
        """The value target's score for the signal of value-based bidding (None: none, or not trusted)."""
        if not self.has_value or self.models[VALUE].warming_up:
            return None
        return round(scores[VALUE], 2)

    def rescore(self, user_id: str, ss: ScoreState, st: UserState, trigger: Event) -> Rescored:
        """Score every target now (updating ``ss``): the scores, change events and audience moves."""
        cause = {"trigger": "event", "event_id": trigger.event_id, "event_ts_ms": trigger.ts_ms}
        return self._rescore(user_id, ss, st, st.last_ms, cause)

    def _rescore(
        self, user_id: str, ss: ScoreState, st: UserState, as_of_ms: int, cause: dict[str, Any]
    ) -> Rescored:
        feats, vec = self._features(st, as_of_ms)
        self.last_vector = vec
        values = self._scores(vec)
        scores = dict(zip(self._names, values, strict=True))
        out: list[dict[str, Any]] = []
        for t, score in zip(self.targets, values, strict=True):
            m = self.models[t.name]
            if m.warming_up:
                continue  # no baseline either: the first trusted score is not a "change"
            ts = self.target_state(ss, t.name)
            ann, change = detect(
                ts.announced,
                score,
                as_of_ms,
                self.rules_of(t.name),
                target=t.name,
                warming_up=False,
                engaged=engaged(feats),
            )
            if ann is ts.announced:
                continue
            if change is not None:
                x = dict(zip(INPUT_NAMES, vec, strict=True))  # by name, for the explanation (rare)
                body: dict[str, Any] = {}
                if self.has_value and t.name in ("purchase", VALUE):  # the value-based bidding signal
                    body = {"expected_value": self.expected_value(scores), "currency": self.currency}
                out.append(
                    {
                        "user_id": user_id,
                        "target": t.name,
                        "previous_score": round(change.previous_score, 6),
                        "score": round(change.score, 6),
                        "previous_tier": change.previous_tier,
                        "tier": change.tier,
                        "direction": change.direction,
                        "reason": change.reason,
                        "top_factors": top_factors(m.model, x, feats, _unpack(ts.features), self.top_k),
                        "model_version": m.version,
                        "horizon_s": t.horizon_ms // 1000,
                        **body,
                        **cause,
                    }
                )
            ts.announced = ann
            ts.features = _pack(feats)
        moves = self._regroup(user_id, ss, feats, scores, as_of_ms, cause) if self.audiences else []
        return Rescored(scores, out, moves)

    def _cooled(self, ss: ScoreState, was: list[str], now: list[str], as_of_ms: int) -> list[str]:
        """``now``, except the audiences the user entered or left within the cooldown keep ``was``;
        records the moves that happen (and forgets those older than the cooldown)."""
        cd = self.audience_cooldown_ms
        moved = {a: t for a, t in ss.moved_ms.items() if as_of_ms - t < cd}
        out = []
        for a in self.audiences:
            inside, before = a.name in now, a.name in was
            if inside != before:
                if a.name in moved:
                    inside = before  # too soon after its last move: as it was
                else:
                    moved[a.name] = as_of_ms
            if inside:
                out.append(a.name)
        ss.moved_ms = moved
        return out

    def untrusted_targets(self) -> list[str]:
        """The targets audiences read whose live model is still warming up."""
        return [t.name for t in self._audience_targets if self.models[t.name].warming_up]

    def _regroup(
        self,
        user_id: str,
        ss: ScoreState,
        feats: Mapping[str, FeatureValue],
        scores: dict[str, float],
        as_of_ms: int,
        cause: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """Keep the latest scores and evaluate every audience: the user's entered and left events.

        A user's membership of one audience changes at most once per ``audience_cooldown_ms`` of
        event time: a move sooner waits for the next evaluation after it (an event, a silence
        point), so a score hovering at a threshold does not send a user in and out at every event.
        """
        states = ss.targets
        for name, score in scores.items():
            ts = states.get(name)
            if ts is None:  # a target still warming up may have none yet
                ts = self.target_state(ss, name)
            ts.score = score
        tiers: dict[str, int] = {}
        for t in self._tier_targets:
            last = states[t.name].announced
            tiers[t.name] = tier_of(scores[t.name], last.tier if last else None, self.rules_of(t.name))
        untrusted = self.untrusted if self.untrusted is not None else self.untrusted_targets()
        was = ss.audiences
        now = members(self.audiences, View(scores, tiers, feats, self.cuts, was), untrusted)
        if now == was:
            return []
        if self.audience_cooldown_ms:
            now = self._cooled(ss, was, now, as_of_ms)
            if now == was:
                return []
        ss.audiences = now
        out: list[dict[str, Any]] = [
            {"event": "left", "audience": a, "reason": "condition"} for a in was if a not in now
        ]
        rounded = {t: round(s, 6) for t, s in scores.items()}
        out += [{"event": "entered", "audience": a, "scores": rounded} for a in now if a not in was]
        for ev in out:
            ev.update(user_id=user_id, **cause)
        return out
