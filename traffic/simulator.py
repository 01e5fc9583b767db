"""Synthetic e-commerce traffic whose true purchase and churn probabilities are known at every event.

Why a simulator: on real logs nobody knows a user's true propensity, so a model can only be compared
with noisy outcomes. Here the generating process is simple enough to state the truth in closed form,
so a model's scores can be compared with the oracle (:class:`Truth`) event by event.

The generative model (rates per day, times in integer ms, UTC):

- **Users.** Each user has a session rate ``lam`` (lognormal: heavy and light visitors), a churn
  hazard ``h`` (lognormal with mean ``churn_rate_per_day``, running from the user's first visit; at
  the churn time the user goes quiet for good, after finishing a session already under way) and a
  purchase intent ``z`` (a logit) that drifts from session to session as a mean-reverting random walk
  around the user's own level ``mu``. Every 100th user denies consent for personalisation.
- **Sessions** arrive as a Poisson process (rate ``lam``) after the previous one ends. A session buys
  with probability ``q = sigmoid(z)`` and is a Markov chain, so the truth never peeks at the future:
  a landing ``page_view`` and a ``product_view``; then more browsing (page and product views, searches,
  rarely ``demo_request``) with probability ``c = 0.55 + 0.3*q`` per step (keen users look longer); then
  ``add_to_cart`` with probability ``q**0.4``, more adds or a ``remove_from_cart`` sometimes,
  ``checkout_start`` with probability ``q**0.3`` and ``purchase`` with ``q**0.3``: the product is
  ``q``, and carts that stop short are abandonment. ``sign_up`` happens at most once, in one of a
  user's first two sessions. Events in a session are seconds to minutes apart; products come from a
  catalogue with categories, prices and a Zipf popularity skew.
- **Truth** at an event at time ``t``, given the latent state then (``q`` of this session, the
  already drawn intent ``q'`` of the next one, ``lam``, ``h``, churned or not) and holding ``q'``
  constant over the horizon ``H`` (the drift makes it an approximation beyond the next session):

  * ``p_now``: the chance that this session still ends in a purchase (``q``, ``q**0.6`` after a cart
    action, ``q**0.3`` after ``checkout_start``, 0 after ``purchase``); ``p_end``: the chance that
    it has no further event.
  * ``p_purchase = 1 - (1 - p_now)(1 - p_later)`` with
    ``p_later = lam*q'/(lam*q'+h) * (1 - exp(-(lam*q'+h)*H))``: buying sessions (rate ``lam*q'``)
    race against churn (rate ``h``).
  * ``p_churn = p_end * (exp(-(lam+h)*H) + h/(lam+h) * (1 - exp(-(lam+h)*H)))``: no next session
    within ``H``, or churn before it.
  * A user already churned at ``t`` has ``p_later = 0`` and ``p_churn = p_end``.
  * ``expected_revenue``: E[revenue in ``(t, t + H_value]``]. An expectation is additive, so unlike
    ``p_later`` it needs no frozen intent. This session adds ``p_now`` times its expected order value
    given the step: the catalogue's mean order value (:func:`mean_order_value`) while browsing; at a
    cart step, the basket so far plus the adds and removals still to come; at ``checkout_start``, the
    basket. Later sessions add ``mean_order_value * sum_k w_k E[sigmoid(z_k)]``
    (:func:`expected_buying_sessions`), ``w_k = (lam/(lam+h))**k P(Poisson((lam+h)H) >= k)`` being
    the chance that the k-th next session starts within ``H`` and before churn, and ``z_k`` the
    intent drifting from ``q'`` (freezing it, as ``p_later`` does, over-rates keen users' later
    sessions and under-rates reluctant ones'). A churned user has only this session's part.

  The few minutes between ``t`` and the end of the current session are ignored (against days), and so
  is the time sessions take (a heavy visitor's sessions come slightly less often than ``lam``).

Deterministic: the same :class:`SimConfig` gives the same events (pass ``start_ms`` to fix the clock
too; event ids are the seed and a counter).

>>> cfg = SimConfig(users=20, seed=1, days=3.0, start_ms=1_700_000_000_000)
>>> events = list(simulate(cfg))
>>> events == list(simulate(cfg))
True
>>> [e["ts"] for e in events] == sorted(e["ts"] for e in events)
True
"""

from __future__ import annotations

import bisect
import csv
import functools
import heapq
import itertools
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

DAY_MS = 86_400_000
# (channel, weight, campaigns it may carry); None: the session arrives without attribution.
CHANNELS: tuple[tuple[str | None, float, tuple[str, ...]], ...] = (
    (None, 0.30, ()),
    ("direct", 0.20, ()),
    ("organic", 0.20, ()),
    ("email", 0.12, ("newsletter-weekly", "winback", "cart-reminder")),
    ("paid_search", 0.10, ("brand-search", "generic-search")),
    ("social", 0.08, ("spring-sale", "influencer")),
)
_CHANNEL_CUM = list(itertools.accumulate(w for _, w, _ in CHANNELS))

# Intent, rate and funnel parameters (see the module docstring). In a default run about a third of the
# events, and about 15% of the users active so far, have a purchase within the next 7 days, with the
# truth spread from under 1% to over 95%; about 5 events per session, 2-3 sessions a week per user.
MU_MEAN, MU_SD = -3.6, 1.2  # users' long-run intent level (logit)
DRIFT_KEEP, DRIFT_SD = 0.97, 0.15  # per session: z' = mu + DRIFT_KEEP*(z - mu) + N(0, DRIFT_SD)
LAM_MEDIAN, LAM_SIGMA = 0.4, 1.0  # sessions per day, lognormal
ADD_MORE, REMOVE, MAX_LINES = 0.25, 0.10, 5  # cart steps: another add, a removal (from 2+ lines)
QTY_MEAN = 1.25  # an add's quantity: 1 + Bernoulli(0.2) + Bernoulli(0.05)
GAP_MIN_MS, GAP_MEAN_MS = 2_000, 40_000  # between events of a session: 2 s plus exponential


@dataclass(frozen=True)
class SimConfig:
    """What to simulate; every field has a default, so ``SimConfig()`` is a 30-day run of 1000 users."""

    users: int = 1000
    """Number of simulated users (ids ``u000000``, ``u000001``, ...)."""
    seed: int = 42
    """Random seed: same config, byte-identical events."""
    days: float = 30.0
    """Event-time span simulated; no event lies after ``start_ms + days``."""
    start_ms: int | None = None
    """Event time of the start (epoch ms); None: now minus ``days``, so no event lies in the future."""
    max_events: int | None = None
    """Stop after this many events (None: run to the end of the span)."""
    churn_rate_per_day: float = 0.01
    """Mean hazard of a user going quiet for good (per day)."""
    horizon_purchase_s: int = 7 * 86400
    """Horizon of the purchase truth: a purchase within this many seconds after the event."""
    horizon_churn_s: int = 14 * 86400
    """Horizon of the churn truth: no event at all within this many seconds after the event."""
    horizon_value_s: int = 90 * 86400
    """Horizon of the value truth: revenue of the purchases within this many seconds after the event."""

    def __post_init__(self) -> None:
        problems = [
            text
            for bad, text in (
                (self.users < 0, "users must be >= 0"),
                (not self.days > 0, "days must be > 0"),
                (self.max_events is not None and self.max_events < 0, "max_events must be >= 0"),
                (not self.churn_rate_per_day >= 0, "churn_rate_per_day must be >= 0"),
                (
                    min(self.horizon_purchase_s, self.horizon_churn_s, self.horizon_value_s) <= 0,
                    "horizons must be > 0",
                ),
            )
            if bad
        ]
        if problems:
            msg = "invalid SimConfig: " + "; ".join(problems)
            raise ValueError(msg)


class Truth(NamedTuple):
    """The oracle at one event: the user's true probabilities at that event's time."""

    user_id: str
    ts_ms: int
    p_purchase: float
    """P(a purchase in (ts, ts + horizon_purchase_s])."""
    p_churn: float
    """P(no event at all in (ts, ts + horizon_churn_s])."""
    expected_revenue: float = 0.0
    """E[revenue of the purchases in (ts, ts + horizon_value_s]] (NaN: read from a file without it)."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def p_purchase_later(lam: float, q: float, hazard: float, horizon_days: float) -> float:
    """P(a buying session, rate ``lam*q`` per day, starts within the horizon before churn, rate ``hazard``).

    >>> round(p_purchase_later(1.0, 0.1, 0.0, 7.0), 4)  # 1 - exp(-0.7)
    0.5034
    """
    rate = lam * q + hazard
    return lam * q / rate * (1.0 - math.exp(-rate * horizon_days)) if rate > 0 else 0.0


def p_quiet(lam: float, hazard: float, horizon_days: float) -> float:
    """P(no session within the horizon) when sessions come at rate ``lam`` and churn at rate ``hazard``.

    >>> round(p_quiet(0.5, 0.0, 14.0), 6) == round(math.exp(-7.0), 6)
    True
    >>> p_quiet(0.0, 0.1, 14.0)
    1.0
    """
    rate = lam + hazard
    if rate <= 0:
        return 1.0
    decay = math.exp(-rate * horizon_days)
    return decay + hazard / rate * (1.0 - decay)


def _reach(lam: float, hazard: float, horizon_days: float) -> np.ndarray:
    """``w[k-1]``: P(the k-th next session starts within the horizon and before churn), k = 1, 2, ...

    Session k starts at a Gamma(k, lam) time S and churn at an Exp(hazard) time C, so
    P(S <= H, S < C) = E[1{S <= H} exp(-hazard S)] = (lam/rate)**k P(Poisson(rate H) >= k).
    """
    rate = lam + hazard
    mean = rate * horizon_days
    if lam <= 0 or mean <= 0:
        return np.zeros(1)
    n = mean + 10.0 * math.sqrt(mean) + 20.0  # beyond: P(Poisson >= k) < 1e-20
    if hazard > 0:
        n = min(n, 50.0 / math.log(rate / lam) + 2.0)  # beyond: (lam/rate)**k < exp(-50)
    k = np.arange(1, int(n))
    log_pmf = np.concatenate(([-mean], -mean + np.cumsum(np.log(mean / k))))  # P(Poisson = 0..len(k))
    at_least = np.clip(1.0 - np.cumsum(np.exp(log_pmf[:-1])), 0.0, 1.0)  # P(Poisson >= k)
    return np.exp(k * math.log(lam / rate)) * at_least


# Gauss-Hermite rule for E[f(N(0, 1))]: for E[sigmoid(N(m, s))] with s <= 0.62 its relative error is < 1e-6.
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(6)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


class _LaterSessions:
    """One user's later sessions within the value horizon, prepared once: then each session costs one pass.

    ``buying(z_next, mu)`` is ``sum_k w_k E[sigmoid(z_k)]``, where ``z_k ~ N(mu + keep**(k-1) (z_next - mu),
    DRIFT_SD**2 (1 - keep**(2k-2)) / (1 - keep**2))`` is the intent k sessions on (``keep = DRIFT_KEEP``),
    and ``sigmoid(x) = (1 + tanh(x/2))/2`` (no overflow), so the arrays below are pre-halved.
    """

    __slots__ = ("half", "keep", "spread", "weights")

    def __init__(self, lam: float, hazard: float, horizon_days: float) -> None:
        w = _reach(lam, hazard, horizon_days)
        w = w[: int(np.flatnonzero(w >= 1e-15 * w.max())[-1]) + 1] if w.any() else w[:1]
        keep = DRIFT_KEEP ** np.arange(len(w))
        sd = DRIFT_SD * np.sqrt((1.0 - keep**2) / (1.0 - DRIFT_KEEP**2))
        self.keep = 0.5 * keep
        self.spread = 0.5 * sd[:, None] * _NODES
        self.weights = 0.5 * w[:, None] * _WEIGHTS
        self.half = 0.5 * float(w.sum())

    def buying(self, z_next: float, mu: float) -> float:
        x = (0.5 * mu + self.keep * (z_next - mu))[:, None] + self.spread
        return self.half + float((self.weights * np.tanh(x)).sum())


def expected_buying_sessions(
    lam: float, hazard: float, horizon_days: float, z_next: float, mu: float
) -> float:
    """E[number of buying sessions starting within the horizon before churn], the intent drifting.

    The expected number of sessions is ``lam/hazard*(1 - exp(-hazard*H))`` (``lam*H`` without churn);
    at ``z_next = mu = 0`` the drift is symmetric, so each of them buys with probability 1/2:

    >>> round(expected_buying_sessions(0.5, 0.0, 7.0, 0.0, 0.0), 9)  # 0.5 * 7 * 1/2
    1.75
    """
    return _LaterSessions(lam, hazard, horizon_days).buying(z_next, mu)


def _cart_coefficients() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(keep, adds)`` by lines L after a cart step: E[final basket] = keep[L]*value + adds[L]*next_add.

    ``next_add`` is the expected value of the next add (price over the viewed products not in the cart,
    times QTY_MEAN). Exact if every later add were a new line worth that too; a removal takes a uniformly
    drawn line, V/L on average. Over 100,000 simulated carts per catalogue the prediction after the first
    add came within 0.3% of the realised mean. Solved by fixed-point iteration (the chain stops with
    probability >= 0.65 at every step).
    """
    keep, adds = [0.0] * (MAX_LINES + 2), [0.0] * (MAX_LINES + 2)
    for _ in range(80):
        for n in range(1, MAX_LINES + 1):
            more, remove = (ADD_MORE if n < MAX_LINES else 0.0), (REMOVE if n >= 2 else 0.0)
            keep[n] = more * keep[n + 1] + remove * keep[n - 1] * (n - 1) / n + 1.0 - more - remove
            adds[n] = more * (keep[n + 1] + adds[n + 1]) + remove * adds[n - 1]
    return tuple(keep), tuple(adds)


CART_KEEP, CART_ADDS = _cart_coefficients()


def _cart_move(lines: int, u: float) -> int:
    """The cart chain's next move from a uniform draw: +1 another add, -1 a removal, 0 on to checkout."""
    more = ADD_MORE if lines < MAX_LINES else 0.0
    return 1 if u < more else -1 if u < more + (REMOVE if lines >= 2 else 0.0) else 0


@functools.lru_cache(maxsize=16)
def mean_order_value(prices: tuple[float, ...], samples: int = 1 << 14) -> float:
    """E[revenue of a purchase] for a catalogue (Zipf popularity over ``prices`` in rank order).

    The cart chain is the same for every session, and buying does not depend on the basket, so this is
    one number per catalogue. Fixed-seed Monte Carlo with its own rng (the simulation's is untouched),
    made precise (standard error under 0.1%) by three reductions: the first add is a popularity draw,
    so worth exactly ``QTY_MEAN * mean price``; every add and removal counts its expectation given the
    basket (quantities never steer the chain); and a control chain that ignores repeat picks, driven by
    the same draws, has the known mean ``(keep[1] + adds[1]) * first``, so only the small difference is
    sampled, and only where the first move is another add (else both chains end at once, and equal).
    The view count uses a typical buyer's intent (q = 0.1): over q in [0.01, 0.5] this moves by < 0.2%.
    """
    rng = random.Random(20240611)
    cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(prices))))
    first = QTY_MEAN * sum(p / (i + 1) for i, p in enumerate(prices)) / cum[-1]
    cont = 0.55 + 0.3 * 0.1
    total = 0.0
    for _ in range(samples):
        views = 1
        while rng.random() < cont:
            views += rng.random() >= 0.42  # a browse step is a product view with probability 0.58
        viewed = [bisect.bisect(cum, rng.random() * cum[-1]) for _ in range(views)]
        moves = [rng.random() * ADD_MORE] + [rng.random() for _ in range(15)]  # the first: an add
        lines = 1
        for u in moves:
            step = _cart_move(lines, u)
            if not step:
                break
            lines += step
        product = viewed[rng.randrange(views)]
        basket = {product: QTY_MEAN * prices[product]}  # product -> expected line value
        estimate = first
        for u in moves:
            step = _cart_move(len(basket), u)
            if not step:
                break
            if step < 0:
                estimate -= sum(basket.values()) / len(basket)
                del basket[list(basket)[rng.randrange(len(basket))]]
                continue
            fresh = [p for p in viewed if p not in basket]
            if fresh:
                estimate += QTY_MEAN * sum(prices[p] for p in fresh) / len(fresh)
                product = fresh[rng.randrange(len(fresh))]
            else:
                estimate += first
                product = bisect.bisect(cum, rng.random() * cum[-1])
            basket[product] = basket.get(product, 0.0) + QTY_MEAN * prices[product]
        total += estimate - first * lines
    return (CART_KEEP[1] + CART_ADDS[1]) * first + ADD_MORE * total / samples


class _Catalogue:
    """Products with a category, a price (lognormal around the category's level) and Zipf popularity."""

    def __init__(self, rng: random.Random, n: int = 2000, n_categories: int = 30) -> None:
        level = [rng.gauss(3.2, 0.7) for _ in range(n_categories)]
        self.ids = [f"p{i:05d}" for i in range(n)]
        cats = [rng.randrange(n_categories) for _ in range(n)]
        self.category = [f"c{c:02d}" for c in cats]
        self.price = [round(math.exp(level[c] + rng.gauss(0.0, 0.4)), 2) for c in cats]
        self.cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(n)))
        self.mean_add = QTY_MEAN * sum(p / (i + 1) for i, p in enumerate(self.price)) / self.cum[-1]

    def pick(self, rng: random.Random) -> int:
        return bisect.bisect(self.cum, rng.random() * self.cum[-1])


class _User:
    """One user's latent state; the oracle reads it, the event stream only shows its effects."""

    __slots__ = (
        "churn_ms",
        "consent",
        "first_ms",
        "hazard",
        "lam",
        "mu",
        "sessions",
        "signed_up",
        "uid",
        "z",
    )

    def __init__(self, i: int, rng: random.Random, churn_rate: float, start_ms: int, end_ms: int) -> None:
        self.uid = f"u{i:06d}"
        self.lam = LAM_MEDIAN * math.exp(rng.gauss(0.0, LAM_SIGMA))
        self.hazard = churn_rate * math.exp(rng.gauss(0.0, 1.0) - 0.5)  # lognormal, mean churn_rate
        self.first_ms = start_ms + int(rng.expovariate(self.lam) * DAY_MS)
        # The churn clock starts at the first visit: a user who never came cannot leave.
        gone = rng.expovariate(self.hazard) * DAY_MS if self.hazard > 0 else math.inf
        self.churn_ms = self.first_ms + int(gone) if gone < math.inf else end_ms + 1
        self.mu = rng.gauss(MU_MEAN, MU_SD)
        self.z = self.mu + rng.gauss(0.0, 0.5)
        self.consent = i % 100 != 99  # exactly every 100th user denies consent
        self.signed_up = False
        self.sessions = 0


# One planned event: (ts_ms, type, product index or -1, quantity, revenue, p_now, p_end, order), where
# order is the expected revenue of this session's purchase should it come (0.0: not known from the
# cart yet, so the catalogue's mean order value).
_Step = tuple[int, str, int, int, float, float, float, float]


class _Session:
    """A session planned step by step from its Markov chain; each step carries p_now, p_end and order."""

    __slots__ = ("campaign", "channel", "later", "later_value", "pos", "quiet", "sid", "steps")

    def __init__(
        self, rng: random.Random, cat: _Catalogue, u: _User, start_ms: int, horizons_days: tuple[float, float]
    ) -> None:
        q = _sigmoid(u.z)
        u.z = u.mu + DRIFT_KEEP * (u.z - u.mu) + rng.gauss(0.0, DRIFT_SD)  # the next session's intent
        u.sessions += 1
        self.sid = f"{u.uid}-s{u.sessions}"
        self.later = p_purchase_later(u.lam, _sigmoid(u.z), u.hazard, horizons_days[0])
        self.quiet = p_quiet(u.lam, u.hazard, horizons_days[1])
        self.later_value = 0.0  # expected revenue of later sessions: set by the caller that wants it
        self.pos = 0
        r = rng.random() * _CHANNEL_CUM[-1]
        channel, _, campaigns = CHANNELS[bisect.bisect(_CHANNEL_CUM, r)]
        self.channel = channel
        self.campaign = campaigns[rng.randrange(len(campaigns))] if campaigns and rng.random() < 0.7 else None

        p_cart, p_checkout = q**0.4, q**0.3
        p_buy = p_checkout
        p_after_cart = p_checkout * p_buy
        cont = 0.55 + 0.3 * q  # browsing goes on longer when intent is high
        p_demo = 0.005 + 0.05 * q
        browse_end = (1.0 - cont) * (1.0 - p_cart)
        steps: list[_Step] = []
        ts = start_ms

        def add(
            kind: str, product: int, qty: int, revenue: float, p_now: float, p_end: float, order: float = 0.0
        ) -> None:
            nonlocal ts
            if steps:
                ts += GAP_MIN_MS + int(rng.expovariate(1.0 / GAP_MEAN_MS))
            steps.append((ts, kind, product, qty, revenue, p_now, p_end, order))

        viewed = [cat.pick(rng)]
        add("page_view", -1, 0, 0.0, q, 0.0)
        if not u.signed_up and u.sessions <= 2 and rng.random() < 0.2 + 0.5 * q:
            u.signed_up = True
            add("sign_up", -1, 0, 0.0, q, 0.0)
        add("product_view", viewed[0], 0, 0.0, q, browse_end)
        while rng.random() < cont:
            r = rng.random()
            if r < p_demo:
                add("demo_request", -1, 0, 0.0, q, browse_end)
            elif r < 0.30:
                add("page_view", -1, 0, 0.0, q, browse_end)
            elif r < 0.42:
                add("search", -1, 0, 0.0, q, browse_end)
            else:
                viewed.append(cat.pick(rng))
                add("product_view", viewed[-1], 0, 0.0, q, browse_end)
        if rng.random() >= p_cart:
            self.steps = steps
            return
        basket: dict[int, int] = {}  # product -> quantity
        fresh = viewed  # viewed products not in the basket: the next add picks among them
        kind = "add_to_cart"
        while True:
            if kind == "add_to_cart":
                product = fresh[rng.randrange(len(fresh))] if fresh else cat.pick(rng)
                qty = 1 + (rng.random() < 0.2) + (rng.random() < 0.05)
                basket[product] = basket.get(product, 0) + qty
            else:
                lines = list(basket)
                product = lines[rng.randrange(len(lines))]
                qty = basket.pop(product)
            p_more = ADD_MORE if len(basket) < MAX_LINES else 0.0
            p_remove = REMOVE if len(basket) >= 2 else 0.0
            fresh = [p for p in viewed if p not in basket]
            next_add = QTY_MEAN * sum(cat.price[p] for p in fresh) / len(fresh) if fresh else cat.mean_add
            value = sum(cat.price[p] * n for p, n in basket.items())
            order = CART_KEEP[len(basket)] * value + CART_ADDS[len(basket)] * next_add
            add(kind, product, qty, 0.0, p_after_cart, (1.0 - p_more - p_remove) * (1.0 - p_checkout), order)
            r = rng.random()
            if r < p_more:
                kind = "add_to_cart"
            elif r < p_more + p_remove:
                kind = "remove_from_cart"
            else:
                break
        if rng.random() < p_checkout:
            revenue = round(sum(cat.price[p] * n for p, n in basket.items()), 2)
            add("checkout_start", -1, 0, 0.0, p_buy, 1.0 - p_buy, revenue)
            if rng.random() < p_buy:
                add("purchase", next(iter(basket)), 0, revenue, 0.0, 1.0)
        self.steps = steps


def _run(cfg: SimConfig, with_truth: bool) -> Iterator[tuple[dict[str, object], Truth | None]]:
    rng = random.Random(cfg.seed)
    cat = _Catalogue(rng)
    start = cfg.start_ms if cfg.start_ms is not None else int(time.time() * 1000 - cfg.days * DAY_MS)
    end = start + int(cfg.days * DAY_MS)
    users = [_User(i, rng, cfg.churn_rate_per_day, start, end) for i in range(cfg.users)]
    horizons = (cfg.horizon_purchase_s / 86400, cfg.horizon_churn_s / 86400)
    horizon_value_days = cfg.horizon_value_s / 86400
    mean_order = mean_order_value(tuple(cat.price)) if with_truth else 0.0
    ahead_of: dict[int, _LaterSessions] = {}  # by user index
    limit = cfg.max_events if cfg.max_events is not None else -1
    # One heap entry per live user: (time of its next event or session start, user index).
    heap = [(u.first_ms, i) for i, u in enumerate(users) if u.first_ms <= end]
    heapq.heapify(heap)
    sessions: list[_Session | None] = [None] * len(users)
    prefix, orders = f"sim{cfg.seed}-", f"o{cfg.seed}-"
    ids, prices, cats = cat.ids, cat.price, cat.category
    n = 0
    while heap and n != limit:
        ts, i = heap[0]
        u = users[i]
        s = sessions[i]
        if s is None:
            s = sessions[i] = _Session(rng, cat, u, ts, horizons)
            if with_truth:  # u.z is now the next session's intent
                ahead = ahead_of.get(i)
                if ahead is None:
                    ahead = ahead_of[i] = _LaterSessions(u.lam, u.hazard, horizon_value_days)
                s.later_value = mean_order * ahead.buying(u.z, u.mu)
        steps = s.steps
        # Emit this user's events while none of another user's comes earlier (saves heap work).
        while True:
            ts, kind, product, qty, revenue, p_now, p_end, order = steps[s.pos]
            if ts > end:
                heapq.heappop(heap)
                break
            n += 1
            ev: dict[str, object] = {
                "event_id": f"{prefix}{n}",
                "user_id": u.uid,
                "type": kind,
                "ts": ts,
                "session_id": s.sid,
            }
            if product >= 0:
                ev["product_id"] = ids[product]
                ev["category"] = cats[product]
                if kind != "purchase":
                    ev["price"] = prices[product]
                if qty:
                    ev["quantity"] = qty
            if kind == "purchase":
                ev["order_id"] = f"{orders}{n}"
                ev["revenue"] = revenue
                ev["currency"] = "USD"
            if s.channel is not None:
                ev["channel"] = s.channel
                if s.campaign is not None:
                    ev["campaign"] = s.campaign
            ev["consent"] = {"personalization": u.consent}
            truth = None
            if with_truth:
                value_now = p_now * (order or mean_order)
                if ts >= u.churn_ms:
                    truth = Truth(u.uid, ts, p_now, p_end, value_now)
                else:
                    later = s.later
                    truth = Truth(
                        u.uid, ts, p_now + later - p_now * later, p_end * s.quiet, value_now + s.later_value
                    )
            yield ev, truth
            s.pos += 1
            if s.pos == len(steps):  # session over: schedule the next one unless churn comes first
                sessions[i] = None
                nxt = ts + int(rng.expovariate(u.lam) * DAY_MS)
                if nxt < u.churn_ms and nxt <= end:
                    heapq.heapreplace(heap, (nxt, i))
                else:
                    heapq.heappop(heap)
                break
            nxt = steps[s.pos][0]
            if n == limit:
                break
            entry = (nxt, i)
            if (len(heap) > 1 and heap[1] < entry) or (len(heap) > 2 and heap[2] < entry):
                heapq.heapreplace(heap, entry)
                break
            heap[0] = entry  # still below both children of the root: the heap invariant holds


def simulate(cfg: SimConfig) -> Iterator[dict[str, object]]:
    """Events in global non-decreasing event-time order, each a dict in our event contract."""
    for ev, _ in _run(cfg, with_truth=False):
        yield ev


def simulate_with_truth(cfg: SimConfig) -> Iterator[tuple[dict[str, object], Truth]]:
    """The events of :func:`simulate` (the same sequence), each with the user's :class:`Truth` then."""
    for ev, truth in _run(cfg, with_truth=True):
        assert truth is not None
        yield ev, truth


TRUTH_HEADER = ("user_id", "ts_ms", "p_purchase", "p_churn", "expected_revenue")
_OLD_TRUTH_HEADER = TRUTH_HEADER[:4]  # files written before the value truth existed


def write_truth(rows: Iterable[Truth], path: Path) -> int:
    """Write truth rows as CSV (floats in shortest round-trip form); returns the number of rows."""
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(TRUTH_HEADER)
        for r in rows:
            w.writerow((r.user_id, r.ts_ms, repr(r.p_purchase), repr(r.p_churn), repr(r.expected_revenue)))
            n += 1
    return n


def read_truth(path: Path) -> list[Truth]:
    """Read a file written by :func:`write_truth`.

    A file of the old four-column header still reads, with ``expected_revenue`` NaN: not known, which
    no sum or metric can mistake for "no revenue expected" (0.0 would be a valid, and wrong, value).
    """
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader, ()))
        if header == _OLD_TRUTH_HEADER:
            return [Truth(u, int(t), float(p), float(c), math.nan) for u, t, p, c in reader]
        if header != TRUTH_HEADER:
            msg = f"{path}: header {','.join(header)!r} is not {','.join(TRUTH_HEADER)!r}"
            raise ValueError(msg)
        return [Truth(u, int(t), float(p), float(c), float(v)) for u, t, p, c, v in reader]
