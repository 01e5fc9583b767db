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

  The few minutes between ``t`` and the end of the current session are ignored (against days).

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
import heapq
import itertools
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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

    def __post_init__(self) -> None:
        problems = [
            text
            for bad, text in (
                (self.users < 0, "users must be >= 0"),
                (not self.days > 0, "days must be > 0"),
                (self.max_events is not None and self.max_events < 0, "max_events must be >= 0"),
                (not self.churn_rate_per_day >= 0, "churn_rate_per_day must be >= 0"),
                (self.horizon_purchase_s <= 0 or self.horizon_churn_s <= 0, "horizons must be > 0"),
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


class _Catalogue:
    """Products with a category, a price (lognormal around the category's level) and Zipf popularity."""

    def __init__(self, rng: random.Random, n: int = 2000, n_categories: int = 30) -> None:
        level = [rng.gauss(3.2, 0.7) for _ in range(n_categories)]
        self.ids = [f"p{i:05d}" for i in range(n)]
        cats = [rng.randrange(n_categories) for _ in range(n)]
        self.category = [f"c{c:02d}" for c in cats]
        self.price = [round(math.exp(level[c] + rng.gauss(0.0, 0.4)), 2) for c in cats]
        self.cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(n)))

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


# One planned event: (ts_ms, type, product index or -1, quantity, revenue, p_now, p_end).
_Step = tuple[int, str, int, int, float, float, float]


class _Session:
    """A session planned step by step from its Markov chain; each step carries p_now and p_end."""

    __slots__ = ("campaign", "channel", "later", "pos", "quiet", "sid", "steps")

    def __init__(
        self, rng: random.Random, cat: _Catalogue, u: _User, start_ms: int, horizons_days: tuple[float, float]
    ) -> None:
        q = _sigmoid(u.z)
        u.z = u.mu + DRIFT_KEEP * (u.z - u.mu) + rng.gauss(0.0, DRIFT_SD)  # the next session's intent
        u.sessions += 1
        self.sid = f"{u.uid}-s{u.sessions}"
        self.later = p_purchase_later(u.lam, _sigmoid(u.z), u.hazard, horizons_days[0])
        self.quiet = p_quiet(u.lam, u.hazard, horizons_days[1])
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

        def add(kind: str, product: int, qty: int, revenue: float, p_now: float, p_end: float) -> None:
            nonlocal ts
            if steps:
                ts += GAP_MIN_MS + int(rng.expovariate(1.0 / GAP_MEAN_MS))
            steps.append((ts, kind, product, qty, revenue, p_now, p_end))

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
        kind = "add_to_cart"
        while True:
            if kind == "add_to_cart":
                fresh = [p for p in viewed if p not in basket]
                product = fresh[rng.randrange(len(fresh))] if fresh else cat.pick(rng)
                qty = 1 + (rng.random() < 0.2) + (rng.random() < 0.05)
                basket[product] = basket.get(product, 0) + qty
            else:
                lines = list(basket)
                product = lines[rng.randrange(len(lines))]
                qty = basket.pop(product)
            p_more = ADD_MORE if len(basket) < MAX_LINES else 0.0
            p_remove = REMOVE if len(basket) >= 2 else 0.0
            add(kind, product, qty, 0.0, p_after_cart, (1.0 - p_more - p_remove) * (1.0 - p_checkout))
            r = rng.random()
            if r < p_more:
                kind = "add_to_cart"
            elif r < p_more + p_remove:
                kind = "remove_from_cart"
            else:
                break
        if rng.random() < p_checkout:
            add("checkout_start", -1, 0, 0.0, p_buy, 1.0 - p_buy)
            if rng.random() < p_buy:
                first = next(iter(basket))
                revenue = round(sum(cat.price[p] * n for p, n in basket.items()), 2)
                add("purchase", first, 0, revenue, 0.0, 1.0)
        self.steps = steps


def _run(cfg: SimConfig, with_truth: bool) -> Iterator[tuple[dict[str, object], Truth | None]]:
    rng = random.Random(cfg.seed)
    cat = _Catalogue(rng)
    start = cfg.start_ms if cfg.start_ms is not None else int(time.time() * 1000 - cfg.days * DAY_MS)
    end = start + int(cfg.days * DAY_MS)
    users = [_User(i, rng, cfg.churn_rate_per_day, start, end) for i in range(cfg.users)]
    horizons = (cfg.horizon_purchase_s / 86400, cfg.horizon_churn_s / 86400)
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
        steps = s.steps
        # Emit this user's events while none of another user's comes earlier (saves heap work).
        while True:
            ts, kind, product, qty, revenue, p_now, p_end = steps[s.pos]
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
                ev["currency"] = "EUR"
            if s.channel is not None:
                ev["channel"] = s.channel
                if s.campaign is not None:
                    ev["campaign"] = s.campaign
            ev["consent"] = {"personalization": u.consent}
            truth = None
            if with_truth:
                if ts >= u.churn_ms:
                    truth = Truth(u.uid, ts, p_now, p_end)
                else:
                    later = s.later
                    truth = Truth(u.uid, ts, p_now + later - p_now * later, p_end * s.quiet)
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


TRUTH_HEADER = ("user_id", "ts_ms", "p_purchase", "p_churn")


def write_truth(rows: Iterable[Truth], path: Path) -> int:
    """Write truth rows as CSV (floats in shortest round-trip form); returns the number of rows."""
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(TRUTH_HEADER)
        for r in rows:
            w.writerow((r.user_id, r.ts_ms, repr(r.p_purchase), repr(r.p_churn)))
            n += 1
    return n


def read_truth(path: Path) -> list[Truth]:
    """Read a file written by :func:`write_truth`."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader, ()))
        if header != TRUTH_HEADER:
            msg = f"{path}: header {','.join(header)!r} is not {','.join(TRUTH_HEADER)!r}"
            raise ValueError(msg)
        return [Truth(u, int(t), float(p), float(c)) for u, t, p, c in reader]
