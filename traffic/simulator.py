"""Synthetic e-commerce traffic whose true purchase and churn probabilities are known at every event.

The generative model, kept simple enough to state its ground truth in closed form:

- Each user has a session rate ``lam`` (sessions/day, lognormal), a churn hazard ``h`` (per day; after
  the churn time the user goes quiet for good) and a latent purchase intent ``z`` (a logit) that
  drifts between sessions as a mean-reverting random walk.
- A session is a funnel. Page views, searches and product views come first (more views when intent
  is high); then the user adds to cart with probability ``q**0.4``, starts checkout with ``q**0.3``
  and buys with ``q**0.3``, where ``q = sigmoid(z)`` is the session's purchase probability.
  Carts that stop short are abandonment. A few users deny consent; some sign up or request demos.
- Truth at an event at time ``t`` (``Truth``), for purchases strictly after ``t`` within ``H``:
  ``p_now`` is the chance the current session still converts given how far its funnel got, and
  ``p_future = lam*q/(lam*q+h) * (1 - exp(-(lam*q+h)*H))`` the chance that a later session does,
  assuming the latent state stays put over the horizon (drift makes it an approximation);
  ``p_purchase = 1 - (1-p_now)(1-p_future)``. ``p_churn`` (no activity within ``H``) is 0 while the
  session goes on, else ``exp(-(lam+h)H) + h/(lam+h) * (1 - exp(-(lam+h)H))``.

Deterministic: the same ``SimConfig`` gives the same events (pass ``start_ms`` to fix the clock too).
"""

from __future__ import annotations

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
CHANNELS = ("direct", "organic", "email", "paid_search", "social")


@dataclass(frozen=True)
class SimConfig:
    users: int = 1000
    seed: int = 42
    days: float = 30.0
    start_ms: int | None = None  # None: now - days, so no event lies in the future
    max_events: int | None = None
    churn_rate_per_day: float = 0.01
    horizon_purchase_s: int = 7 * 86400
    horizon_churn_s: int = 14 * 86400


class Truth(NamedTuple):
    user_id: str
    ts_ms: int
    p_purchase: float
    p_churn: float


@dataclass
class _User:
    uid: str
    lam: float  # sessions per day
    hazard: float  # churn hazard per day
    mu: float  # long-run intent (logit)
    z: float  # current intent (logit)
    churn_ms: int
    consent: bool
    signed_up: bool = False
    sessions: int = 0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class _Catalogue:
    def __init__(self, rng: random.Random, n: int = 500) -> None:
        self.ids = [f"p{i:04d}" for i in range(n)]
        self.category = [f"c{rng.randrange(20):02d}" for _ in range(n)]
        self.price = [round(math.exp(rng.gauss(3.2, 0.8)), 2) for _ in range(n)]
        self.cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.9 for i in range(n)))

    def pick(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.ids)), cum_weights=self.cum)[0]


def _future_purchase(u: _User, q: float, horizon_days: float) -> float:
    rate = u.lam * q + u.hazard
    return u.lam * q / rate * (1.0 - math.exp(-rate * horizon_days)) if rate > 0 else 0.0


def _no_activity(u: _User, horizon_days: float) -> float:
    rate = u.lam + u.hazard
    decay = math.exp(-rate * horizon_days)
    return decay + u.hazard / rate * (1.0 - decay)


class _Session:
    """One session's events (built at its start) with the funnel stage of each."""

    def __init__(self, sim: _Sim, u: _User, start: int) -> None:
        rng, cat = sim.rng, sim.catalogue
        u.z = u.mu + 0.8 * (u.z - u.mu) + rng.gauss(0.0, 0.35)  # intent drifts between sessions
        q = _sigmoid(u.z)
        u.sessions += 1
        sid = f"{u.uid}-s{u.sessions}"
        channel = CHANNELS[rng.randrange(len(CHANNELS))]
        steps: list[tuple[str, dict[str, object], float]] = []  # (type, fields, p_now after this event)

        def add(kind: str, p_now: float, **fields: object) -> None:
            steps.append((kind, fields, p_now))

        for _ in range(1 + min(5, int(rng.expovariate(0.6)))):
            add("page_view", q)
        if rng.random() < 0.3:
            add("search", q)
        viewed = [cat.pick(rng) for _ in range(1 + min(12, int(rng.expovariate(1.0 / (1.0 + 4.0 * q)))))]
        for p in viewed:
            add("product_view", q, product=p)
        if not u.signed_up and rng.random() < 0.5:
            u.signed_up = True
            add("sign_up", q)
        if rng.random() < 0.02:
            add("demo_request", q)
        pk, pb = q**0.3, q**0.3
        if rng.random() < q**0.4:
            basket = viewed[: 1 + int(rng.random() < 0.3)]
            for p in basket:
                add("add_to_cart", pk * pb, product=p, qty=1 + int(rng.random() < 0.2))
            if len(basket) > 1 and rng.random() < 0.3:
                basket = basket[:1]
                add("remove_from_cart", pk * pb, product=viewed[1], qty=1)
            if rng.random() < pk:
                add("checkout_start", pb)
                if rng.random() < pb:
                    add("purchase", 0.0, basket=basket)
        ts = start
        self.items: list[tuple[int, str, dict[str, object], float, bool]] = []
        for i, (kind, fields, p_now) in enumerate(steps):
            ts += 1000 + int(rng.expovariate(1 / 40_000))
            self.items.append((ts, kind, fields, p_now, i == len(steps) - 1))
        self.sid, self.channel, self.q = sid, channel, q


class _Sim:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.catalogue = _Catalogue(self.rng)
        self.start = cfg.start_ms if cfg.start_ms is not None else int(time.time() * 1000 - cfg.days * DAY_MS)
        self.end = self.start + int(cfg.days * DAY_MS)
        self.counter = 0

    def users(self) -> list[_User]:
        rng, cfg = self.rng, self.cfg
        out = []
        for i in range(cfg.users):
            hazard = cfg.churn_rate_per_day * math.exp(rng.gauss(0.0, 1.0) - 0.5)
            churn_ms = self.start + int(rng.expovariate(hazard) * DAY_MS) if hazard > 0 else self.end + 1
            mu = rng.gauss(-3.0, 1.0)
            out.append(
                _User(
                    uid=f"u{i:06d}",
                    lam=math.exp(rng.gauss(-0.4, 0.7)),
                    hazard=hazard,
                    mu=mu,
                    z=mu + rng.gauss(0.0, 0.5),
                    churn_ms=churn_ms,
                    consent=rng.random() >= 0.01,
                )
            )
        return out

    def event(
        self, u: _User, s: _Session, ts: int, kind: str, fields: dict[str, object]
    ) -> dict[str, object]:
        self.counter += 1
        ev: dict[str, object] = {
            "event_id": f"sim{self.cfg.seed}-{self.counter}",
            "user_id": u.uid,
            "type": kind,
            "ts": ts,
            "session_id": s.sid,
            "channel": s.channel,
        }
        cat = self.catalogue
        if "product" in fields:
            p = int(fields["product"])  # type: ignore[call-overload]
            ev.update(product_id=cat.ids[p], category=cat.category[p], price=cat.price[p])
            if kind != "product_view":
                ev["quantity"] = fields["qty"]
        if kind == "purchase":
            basket = [int(p) for p in fields["basket"]]  # type: ignore[attr-defined]
            ev.update(
                order_id=f"o{self.counter}",
                product_id=cat.ids[basket[0]],
                revenue=round(sum(cat.price[p] for p in basket), 2),
                currency="EUR",
            )
        if not u.consent:
            ev["consent"] = {"personalization": False}
        return ev


def simulate_with_truth(cfg: SimConfig) -> Iterator[tuple[dict[str, object], Truth]]:
    """Events in non-decreasing event-time order, each with the user's true probabilities then."""
    sim = _Sim(cfg)
    rng = sim.rng
    users = sim.users()
    h_purchase = cfg.horizon_purchase_s / 86400
    h_churn = cfg.horizon_churn_s / 86400
    seq = itertools.count()
    # heap of (ts, tie-break, user index, session or None, position in session)
    heap: list[tuple[int, int, int, _Session | None, int]] = []
    for i, u in enumerate(users):
        first = sim.start + int(rng.expovariate(u.lam) * DAY_MS)
        heapq.heappush(heap, (first, next(seq), i, None, 0))
    emitted = 0
    while heap:
        ts, _, i, session, pos = heapq.heappop(heap)
        u = users[i]
        if session is None:  # a session starts
            if ts >= u.churn_ms or ts >= sim.end:
                continue
            session = _Session(sim, u, ts)
            heapq.heappush(heap, (session.items[0][0], next(seq), i, session, 0))
            continue
        ev_ts, kind, fields, p_now, last = session.items[pos]
        if ev_ts > sim.end:
            continue
        ev = sim.event(u, session, ev_ts, kind, fields)
        p_future = _future_purchase(u, session.q, h_purchase)
        truth = Truth(
            u.uid,
            ev_ts,
            1.0 - (1.0 - p_now) * (1.0 - p_future),
            _no_activity(u, h_churn) if last else 0.0,
        )
        yield ev, truth
        emitted += 1
        if cfg.max_events is not None and emitted >= cfg.max_events:
            return
        if last:
            nxt = ev_ts + int(rng.expovariate(u.lam) * DAY_MS)
            heapq.heappush(heap, (nxt, next(seq), i, None, 0))
        else:
            heapq.heappush(heap, (session.items[pos + 1][0], next(seq), i, session, pos + 1))


def simulate(cfg: SimConfig) -> Iterator[dict[str, object]]:
    """The events of :func:`simulate_with_truth`, without the truth."""
    for ev, _ in simulate_with_truth(cfg):
        yield ev


def write_truth(rows: Iterable[Truth], path: Path) -> int:
    n = 0
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(Truth._fields)
        for r in rows:
            w.writerow((r.user_id, r.ts_ms, f"{r.p_purchase:.6f}", f"{r.p_churn:.6f}"))
            n += 1
    return n


def read_truth(path: Path) -> list[Truth]:
    with path.open(newline="") as fh:
        return [
            Truth(r["user_id"], int(r["ts_ms"]), float(r["p_purchase"]), float(r["p_churn"]))
            for r in csv.DictReader(fh)
        ]
