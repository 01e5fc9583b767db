"""Brute-force reference: every feature recomputed from the raw event list, straight from its definition.

Shares no code with ``features/``: it re-reads the documented definitions (docs/features.md)
and recounts from scratch, so a test comparing the two checks the streaming aggregates, the
bucketing and the pruning, not the definitions against themselves.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
TYPES = (
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "checkout_start",
    "purchase",
)
WINDOWS = {"1h": (MIN, 60), "24h": (HOUR, 24), "7d": (HOUR, 168), "30d": (DAY, 30)}


def ts_of(ev: dict[str, Any]) -> int:
    t = ev["ts"]
    if isinstance(t, int):
        return t
    return int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000)


def unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First occurrence of each event id, in arrival order."""
    seen: set[str] = set()
    out = []
    for ev in events:
        if ev["event_id"] not in seen:
            seen.add(ev["event_id"])
            out.append(ev)
    return out


def in_window(ts: int, as_of: int, res: int, n: int) -> bool:
    return as_of // res - n < ts // res <= as_of // res


def sessions(events: list[dict[str, Any]], gap_ms: int) -> dict[str, list[int]]:
    """session id -> [start, end, count]; events without one get the inactivity-gap session (arrival order)."""
    out: dict[str, list[int]] = {}
    cur = None
    last = 0
    for ev in events:
        ts = ts_of(ev)
        sid = ev.get("session_id")
        if sid is None:
            if cur is None or ts - last > gap_ms:
                cur = f"derived-{ts}"
            sid = cur
        s = out.setdefault(sid, [ts, ts, 0, 0, 0])
        s[0], s[1], s[2] = min(s[0], ts), max(s[1], ts), s[2] + 1
        s[3] += ev["type"] == "add_to_cart"
        s[4] += ev["type"] == "checkout_start"
        last = max(last, ts)
    return out


def reference_features(
    raw_events: list[dict[str, Any]], as_of: int, *, gap_ms: int = 1_800_000, abandon_ms: int = 1_800_000
) -> dict[str, Any]:
    events = unique(raw_events)
    stamps = [ts_of(e) for e in events]
    as_of = max([as_of, *stamps])
    out: dict[str, Any] = {}
    for w, (res, n) in WINDOWS.items():
        total = 0
        for t in (*TYPES, "custom"):
            c = sum(
                1
                for e, ts in zip(events, stamps)
                if (e["type"] == t or (t == "custom" and e["type"] not in TYPES))
                and in_window(ts, as_of, res, n)
            )
            out[f"n_{t}_{w}"] = c
            total += c
        out[f"n_events_{w}"] = total

    def since(kind: str | None) -> float | None:
        xs = [ts for e, ts in zip(events, stamps) if kind is None or e["type"] == kind]
        return (as_of - max(xs)) / 1000 if xs else None

    out["s_since_last_event"] = since(None)
    out["s_since_last_add_to_cart"] = since("add_to_cart")
    out["s_since_last_purchase"] = since("purchase")
    out["tenure_days"] = (as_of - min(stamps)) / DAY
    a = sum(1 for ts in stamps if as_of // DAY - 7 < ts // DAY <= as_of // DAY)
    b = sum(1 for ts in stamps if as_of // DAY - 14 < ts // DAY <= as_of // DAY - 7)
    out["engagement_trend"] = (a - b) / (a + b) if a + b else 0.0
    all_sessions = list(sessions(events, gap_ms).values())
    latest = max(all_sessions, key=lambda s: s[1])
    live = as_of - latest[1] <= gap_ms
    out["in_session"] = live
    out["session_events"] = latest[2] if live else 0
    out["session_duration_s"] = (latest[1] - latest[0]) / 1000 if live else 0.0
    out["session_add_to_cart"] = latest[3] if live else 0
    out["session_checkout_start"] = latest[4] if live else 0
    recent = [s for s in all_sessions if s[1] > as_of - 7 * DAY]
    out["sessions_7d"] = len(recent)
    out["events_per_session_7d"] = sum(s[2] for s in recent) / len(recent) if recent else 0.0
    out["mean_session_duration_s_7d"] = (
        sum(s[1] - s[0] for s in recent) / len(recent) / 1000 if recent else 0.0
    )

    purchases = [(e, ts) for e, ts in zip(events, stamps) if e["type"] == "purchase"]
    for days in (30, 90):
        sel = [(e, ts) for e, ts in purchases if in_window(ts, as_of, DAY, days)]
        out[f"purchases_{days}d"] = len(sel)
        out[f"revenue_{days}d"] = sum(revenue(e) for e, _ in sel)
    out["aov_90d"] = out["revenue_90d"] / out["purchases_90d"] if out["purchases_90d"] else 0.0

    last_purchase = max((ts for _, ts in purchases), default=0)
    qty: dict[str, int] = {}
    price: dict[str, tuple[int, float]] = {}
    for e, ts in zip(events, stamps):
        if e["type"] in ("add_to_cart", "remove_from_cart") and ts > last_purchase and e.get("product_id"):
            q = e.get("quantity", 1)
            qty[e["product_id"]] = qty.get(e["product_id"], 0) + (q if e["type"] == "add_to_cart" else -q)
            if e["type"] == "add_to_cart" and ts >= price.get(e["product_id"], (0, 0.0))[0]:
                price[e["product_id"]] = (ts, e.get("price") or 0.0)
    open_lines = {p: q for p, q in qty.items() if q > 0}
    out["cart_items"] = sum(open_lines.values())
    out["cart_value"] = sum(q * price.get(p, (0, 0.0))[1] for p, q in open_lines.items())
    latest_add = max((price.get(p, (0, 0.0))[0] for p in open_lines), default=0)
    out["cart_abandoned"] = bool(open_lines) and as_of - latest_add >= abandon_ms

    views: dict[str, int] = {}
    for e, ts in zip(events, stamps):
        if e["type"] == "product_view" and e.get("product_id") and in_window(ts, as_of, HOUR, 24):
            views[e["product_id"]] = views.get(e["product_id"], 0) + 1
    bought = {e["product_id"] for e, ts in purchases if e.get("product_id") and ts > as_of - 30 * DAY}
    out["distinct_products_viewed_24h"] = len(views)
    out["max_views_one_product_unbought_24h"] = max(
        (v for p, v in views.items() if p not in bought), default=0
    )
    return out


def revenue(e: dict[str, Any]) -> float:
    if e.get("revenue") is not None:
        return float(e["revenue"])
    if e.get("price") is not None:
        return float(e["price"]) * e.get("quantity", 1)
    return 0.0


def assert_features_equal(got: dict[str, Any], want: dict[str, Any], context: str = "") -> None:
    """Exact for counts and flags, 1e-6 relative for money and means."""
    assert set(got) == set(want), f"{context} names differ: {set(got) ^ set(want)}"
    for k, w in want.items():
        g = got[k]
        if w is None or isinstance(w, bool) or (isinstance(w, int) and not isinstance(g, float)):
            assert g == w, f"{context} {k}: got {g!r}, want {w!r}"
        else:
            assert abs(float(g) - float(w)) <= 1e-6 * max(1.0, abs(float(w))), (
                f"{context} {k}: got {g!r}, want {w!r}"
            )


def random_events(
    seed: int, users: int, per_user: int, start_ms: int, span_ms: int, *, with_sessions: bool = True
) -> list[dict[str, Any]]:
    """Varied canonical events in global time order: every type, products, carts, orders, sessions."""
    rng = random.Random(seed)
    out = []
    kinds = [*TYPES, "sign_up"]
    weights = [20, 30, 8, 10, 3, 4, 4, 1]
    for u in range(users):
        ts = start_ms + rng.randrange(span_ms // 4)
        session = 0
        for i in range(per_user):
            gap = rng.randrange(1_000, 120_000) if rng.random() < 0.8 else rng.randrange(1_800_001, 3 * DAY)
            if gap > 1_800_000:
                session += 1
            ts = min(ts + gap, start_ms + span_ms)
            kind = rng.choices(kinds, weights)[0]
            ev: dict[str, Any] = {
                "event_id": f"e{seed}-{u}-{i}",
                "user_id": f"user-{u}",
                "type": kind,
                "ts": ts,
            }
            if with_sessions:
                ev["session_id"] = f"s{u}-{session}"
            if kind in ("product_view", "add_to_cart", "remove_from_cart", "purchase"):
                ev["product_id"] = f"p{rng.randrange(12)}"
                ev["price"] = round(rng.uniform(1, 200), 2)
                ev["quantity"] = rng.randint(1, 3)
            if kind == "purchase":
                ev["order_id"] = f"o{u}-{i}"
                ev["revenue"] = round(ev["price"] * ev["quantity"], 2)
            out.append(ev)
    out.sort(key=lambda e: e["ts"])
    return out
