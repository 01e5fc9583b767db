"""When a score change is worth telling downstream systems: tiers with hysteresis, deltas, cooldown.

Compared against the score *last announced* for the user and target, so a slow drift still adds up
to a ``large_move``, while a score hovering at a tier boundary does not flap: leaving a tier needs
the score to cross the boundary by ``hysteresis``. Nothing is announced while the target's model is
warming up, or within ``cooldown_ms`` of the previous announcement for the same user and target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import msgspec

from models.ledger import VALUE

TIERS = ("low", "medium", "high")


@dataclass(frozen=True)
class ChangeRules:
    thresholds: tuple[float, float] = (0.2, 0.5)  # low < 0.2 <= medium < 0.5 <= high
    hysteresis: float = 0.03
    min_delta: float = 0.15
    cooldown_ms: int = 900_000
    churn_drop: float = 0.25  # a purchase-score drop this large for an engaged user flags churn risk
    # value tiers: two amounts, or (third item true) two multiples of the model's mean revenue
    value_tiers: tuple[float, float, bool] = (1.0, 3.0, True)
    value_hysteresis: float = 0.1  # leaving a value tier takes a margin of this share of its boundary


def value_rules(rules: ChangeRules, mean_value: float) -> ChangeRules:
    """The rules of a value target, whose scores are amounts: tiers in money, and only tier changes
    are announced (a "large move" in money has no scale-free meaning). With relative tiers the
    boundaries are multiples of ``mean_value``, the model's mean revenue per snapshot, so the same
    setting fits any currency and shop; before any revenue is learnt everyone is low.

    >>> value_rules(ChangeRules(), 20.0).thresholds
    (20.0, 60.0)
    """
    a, b, relative = rules.value_tiers
    scale = (mean_value if mean_value > 0 else math.inf) if relative else 1.0
    low, high = a * scale, b * scale
    return replace(rules, thresholds=(low, high), hysteresis=rules.value_hysteresis * low, min_delta=math.inf)


class Announced(msgspec.Struct, array_like=True):
    """What downstream systems were last told for one user and target."""

    score: float
    tier: int
    ts_ms: int


class Change(msgspec.Struct):
    previous_score: float
    score: float
    previous_tier: str
    tier: str
    direction: str  # "up" | "down"
    reason: str


def tier_of(score: float, previous: int | None, rules: ChangeRules) -> int:
    """The tier of ``score``; from a known ``previous`` tier, boundaries must be crossed by the hysteresis.

    >>> r = ChangeRules()
    >>> tier_of(0.21, None, r), tier_of(0.21, 0, r), tier_of(0.24, 0, r)
    (1, 0, 1)
    """
    raw = sum(score >= t for t in rules.thresholds)
    if previous is None or raw == previous:
        return raw
    h = rules.hysteresis
    if raw > previous:  # climb only as far as the boundaries cleared by the margin
        return previous + sum(score >= t + h for t in rules.thresholds[previous:raw])
    return previous - sum(score < t - h for t in rules.thresholds[raw:previous])


def detect(
    last: Announced | None,
    score: float,
    ts_ms: int,
    rules: ChangeRules,
    *,
    target: str,
    warming_up: bool,
    engaged: bool = False,
) -> tuple[Announced, Change | None]:
    """The new announced state and the change to publish, if any."""
    if last is None:  # first score: the baseline, nothing to compare with
        return Announced(score, tier_of(score, None, rules), ts_ms), None
    if warming_up or ts_ms - last.ts_ms < rules.cooldown_ms:
        return last, None
    tier = tier_of(score, last.tier, rules)
    delta = score - last.score
    if tier == last.tier and abs(delta) < rules.min_delta:
        return last, None
    direction = "up" if delta > 0 else "down"
    if target == VALUE:
        reason = f"value_tier_{direction}"
    elif target == "churn":
        reason = "churn_risk_up" if direction == "up" else "churn_risk_down"
    elif target == "purchase" and direction == "down" and engaged and -delta >= rules.churn_drop:
        reason = "churn_risk_up"  # an engaged user whose purchase intent collapses
    elif target == "purchase":
        reason = f"purchase_intent_{direction}"
    else:
        reason = "tier_change" if tier != last.tier else "large_move"
    change = Change(last.score, score, TIERS[last.tier], TIERS[tier], direction, reason)
    return Announced(score, tier, ts_ms), change
