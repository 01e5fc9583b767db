"""Commerce features: RFM (orders and revenue), the open cart, and product-level purchase intent."""

from __future__ import annotations

from features.buckets import DAY_MS, HOUR_MS, add, prune
from features.contract import Event
from features.state import FeatureParams, UserState

ORDER_DAYS = 90
VIEW_HOURS = 24
BOUGHT_MS = 30 * DAY_MS
MAX_CART_LINES = 200
MAX_PRODUCTS = 100


def update(state: UserState, ev: Event) -> None:
    t = ev.type
    ts = ev.ts_ms
    if t == "product_view":
        if ev.product_id is not None:
            latest_h = max(state.last_ms, ts) // HOUR_MS
            h = ts // HOUR_MS
            if h > latest_h - VIEW_HOURS:
                per = state.views.get(ev.product_id)
                if per is None:
                    per = state.views[ev.product_id] = {}
                add(per, h)
    elif t == "add_to_cart" or t == "remove_from_cart":
        if t == "add_to_cart" and ts > state.last_cart_ms:
            state.last_cart_ms = ts
        if ts > state.last_purchase_ms and ev.product_id is not None:
            dq = ev.quantity if t == "add_to_cart" else -ev.quantity
            state.cart.append((ts, ev.product_id, dq, ev.price or 0.0))
    elif t == "purchase":
        d = ts // DAY_MS
        if d > max(state.last_ms, ts) // DAY_MS - ORDER_DAYS:
            o = state.orders.get(d)
            if o is None:
                state.orders[d] = [1.0, ev.revenue or 0.0]
            else:
                o[0] += 1.0
                o[1] += ev.revenue or 0.0
        if ts > state.last_purchase_ms:
            state.last_purchase_ms = ts
            state.cart = [line for line in state.cart if line[0] > ts]
        if ev.product_id is not None and ts > state.bought.get(ev.product_id, 0):
            state.bought[ev.product_id] = ts


def finalize(state: UserState, since_ms: int | None = None) -> None:
    """Drop orders, views and purchases no window reaches, and cap the rest; the day and hour
    buckets are skipped when their floor has not moved since ``since_ms`` (``features.user.finalize``)."""
    last_d = state.last_ms // DAY_MS
    if since_ms is None or since_ms // DAY_MS != last_d:
        for d in [d for d in state.orders if d <= last_d - ORDER_DAYS]:
            del state.orders[d]
    last_h = state.last_ms // HOUR_MS
    views = state.views
    if since_ms is None or since_ms // HOUR_MS != last_h:
        for pid in list(views):
            prune(views[pid], last_h, VIEW_HOURS)
            if not views[pid]:
                del views[pid]
    if len(views) > MAX_PRODUCTS:
        for pid, _ in sorted(views.items(), key=lambda kv: max(kv[1]))[: len(views) - MAX_PRODUCTS]:
            del views[pid]
    horizon = state.last_ms - BOUGHT_MS
    bought = state.bought
    for pid in [p for p, ts in bought.items() if ts <= horizon]:
        del bought[pid]
    if len(bought) > MAX_PRODUCTS:
        for pid, _ in sorted(bought.items(), key=lambda kv: kv[1])[: len(bought) - MAX_PRODUCTS]:
            del bought[pid]
    if len(state.cart) > MAX_CART_LINES:
        state.cart.sort()
        del state.cart[: len(state.cart) - MAX_CART_LINES]


def _cart(state: UserState) -> tuple[int, float, int]:
    """(items, value, latest add) of the open cart: lines after the latest purchase, netted per product."""
    if not state.cart:
        return 0, 0.0, 0
    qty: dict[str, int] = {}
    price: dict[str, tuple[int, float]] = {}
    for ts, pid, dq, p in state.cart:
        qty[pid] = qty.get(pid, 0) + dq
        if dq > 0 and ts >= price.get(pid, (0, 0.0))[0]:
            price[pid] = (ts, p)
    items = 0
    value = 0.0
    latest_add = 0
    for pid, q in qty.items():
        if q > 0:
            items += q
            ts, p = price.get(pid, (0, 0.0))
            value += q * p
            latest_add = max(latest_add, ts)
    return items, value, latest_add


class OpenCart:
    """The open cart's episode: continuously non-empty since ``start_ms``, last changed at ``changed_ms``."""

    __slots__ = ("changed_ms", "items", "lines", "start_ms", "value")

    def __init__(
        self, start_ms: int, changed_ms: int, items: int, value: float, lines: list[tuple[str, int, float]]
    ) -> None:
        self.start_ms = start_ms
        self.changed_ms = changed_ms
        self.items = items
        self.value = value
        self.lines = lines  # (product, quantity, price), quantity > 0


def open_cart(state: UserState) -> OpenCart | None:
    """The cart episode in progress, or None when the cart is empty (never filled, emptied, bought).

    An episode starts at the change that made an empty cart non-empty; a purchase (which drops the
    lines before it) or removes down to zero end it. Netted per product, at each product's latest
    added price, as ``cart_items``/``cart_value`` are.

    >>> st = UserState(cart=[(10, "a", 1, 5.0), (20, "a", -1, 0.0), (30, "b", 2, 3.0), (40, "a", 1, 4.0)])
    >>> c = open_cart(st)
    >>> (c.start_ms, c.changed_ms, c.items, c.value, sorted(c.lines))
    (30, 40, 3, 10.0, [('a', 1, 4.0), ('b', 2, 3.0)])
    >>> open_cart(UserState(cart=[(10, "a", 1, 5.0), (20, "a", -1, 0.0)])) is None
    True
    """
    qty: dict[str, int] = {}
    price: dict[str, float] = {}
    total = 0
    start = changed = 0
    for ts, pid, dq, p in sorted(state.cart):
        before = qty.get(pid, 0)
        after = before + dq
        qty[pid] = after
        was_empty = total <= 0
        total += max(after, 0) - max(before, 0)
        if dq > 0:
            price[pid] = p
        if was_empty and total > 0:
            start = ts  # a new episode
        changed = ts
    if total <= 0:
        return None
    lines = [(pid, q, price.get(pid, 0.0)) for pid, q in qty.items() if q > 0]
    return OpenCart(start, changed, total, round(sum(q * p for _, q, p in lines), 6), lines)


def result(state: UserState, as_of_ms: int, params: FeatureParams) -> dict[str, float | int | bool | None]:
    today = as_of_ms // DAY_MS
    n30 = r30 = n90 = r90 = 0.0
    for d, (n, r) in state.orders.items():
        if today - 90 < d <= today:
            n90 += n
            r90 += r
            if d > today - 30:
                n30 += n
                r30 += r
    items, value, latest_add = _cart(state)
    hour = as_of_ms // HOUR_MS
    distinct = 0
    max_unbought = 0
    lo = hour - VIEW_HOURS
    for pid, buckets in state.views.items():
        v = 0  # window_sum(buckets, hour, VIEW_HOURS), inlined: runs per product on every event
        for i, c in buckets.items():
            if lo < i <= hour:
                v += c
        if v:
            distinct += 1
            if v > max_unbought and state.bought.get(pid, 0) <= as_of_ms - BOUGHT_MS:
                max_unbought = v
    return {
        "purchases_30d": int(n30),
        "purchases_90d": int(n90),
        "revenue_30d": round(r30, 6),
        "revenue_90d": round(r90, 6),
        "aov_90d": round(r90 / n90, 6) if n90 else 0.0,
        "cart_items": items,
        "cart_value": round(value, 6),
        "cart_abandoned": items > 0 and as_of_ms - latest_add >= params.abandon_after_ms,
        "distinct_products_viewed_24h": distinct,
        "max_views_one_product_unbought_24h": max_unbought,
    }
