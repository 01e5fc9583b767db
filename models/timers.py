"""Per-user event-time timers: silence points and behavioural triggers, as pure code.

The signals propensity work exists for are mostly absences: a customer who stops coming, a cart
left behind. A user's next due time is derived from the feature state (last event, open cart) and
the small timer part of the score state (which silence points and which cart episode already
fired), so it survives restarts and moves with the user's row, and a replay derives the same
times. The caller fires what is due when the partition's event-time clock passes it
(``streams/score_stage.py``, ``models/evaluate.py``); this module only says what is due.

- **silence**: at ``last event + each of silence_ms`` (default 1h, 1d, 3d, 7d, 14d) every target is
  rescored as of that time, and label snapshots are sampled there too, so models learn quiet states.
  A new event restarts the schedule from the new last event. At most ``len(silence_ms)`` per quiet spell.
- **cart_abandoned**: ``cart_after_ms`` after the last change of a non-empty cart; a purchase or an
  emptied cart cancels it (nothing is due then), and it fires at most once per cart episode.
- **repeat_view_no_purchase** is not a timer: it fires on the product view that makes one product
  viewed ``repeat_views`` times within 24 h, unbought for 30 days, at most once per product and day.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from features.buckets import DAY_MS, HOUR_MS, window_sum
from features.commerce import BOUGHT_MS, VIEW_HOURS, OpenCart, open_cart
from features.state import UserState

SILENCE = "silence"
CART_ABANDONED = "cart_abandoned"
REPEAT_VIEW = "repeat_view_no_purchase"
TRIGGERS = (CART_ABANDONED, REPEAT_VIEW)  # what PROPSTREAM_TRIGGERS may name
MAX_VIEWED = 100  # per user: products a repeat-view trigger fired for recently (bounds the state)


@dataclass(frozen=True)
class TimerConfig:
    silence_ms: tuple[int, ...] = (3_600_000, 86_400_000, 3 * 86_400_000, 7 * 86_400_000, 14 * 86_400_000)
    cart_after_ms: int = 1_800_000
    triggers: frozenset[str] = field(default_factory=lambda: frozenset(TRIGGERS))
    repeat_views: int = 3

    def __post_init__(self) -> None:
        if list(self.silence_ms) != sorted(set(self.silence_ms)) or any(s <= 0 for s in self.silence_ms):
            msg = f"silence points must be positive and ascending, got {self.silence_ms}"
            raise ValueError(msg)
        unknown = self.triggers - set(TRIGGERS)
        if unknown:
            msg = f"unknown trigger {sorted(unknown)[0]!r}: choose from {', '.join(TRIGGERS)}"
            raise ValueError(msg)


@dataclass(frozen=True)
class Due:
    """One timer: when, what, and for a cart the episode it belongs to."""

    ts_ms: int
    kind: str
    cart: OpenCart | None = None


def silence_done(quiet_from_ms: int, quiet_done: int, last_ms: int) -> int:
    """Silence points already fired for the quiet spell that started at ``last_ms``.

    >>> silence_done(100, 2, 100), silence_done(100, 2, 250)
    (2, 0)
    """
    return quiet_done if quiet_from_ms == last_ms else 0


def next_due(
    cfg: TimerConfig, st: UserState, quiet_from_ms: int, quiet_done: int, cart_done_ms: int
) -> Due | None:
    """The user's earliest timer, or None; ties: silence before the cart.

    >>> st = UserState(last_ms=1_000, cart=[(900, "p", 1, 10.0)])
    >>> cfg = TimerConfig(silence_ms=(3_000,), cart_after_ms=1_000)
    >>> [(d.ts_ms, d.kind) for d in [next_due(cfg, st, 0, 0, 0), next_due(cfg, st, 0, 0, 900)]]
    [(1900, 'cart_abandoned'), (4000, 'silence')]
    >>> next_due(cfg, st, 1_000, 1, 900) is None  # the one silence point fired, the episode too
    True
    """
    best: Due | None = None
    done = silence_done(quiet_from_ms, quiet_done, st.last_ms)
    if st.last_ms and done < len(cfg.silence_ms):
        best = Due(st.last_ms + cfg.silence_ms[done], SILENCE)
    if CART_ABANDONED in cfg.triggers and st.cart:
        cart = open_cart(st)
        if cart is not None and cart.start_ms > cart_done_ms:
            at = cart.changed_ms + cfg.cart_after_ms
            if best is None or at < best.ts_ms:
                best = Due(at, CART_ABANDONED, cart)
    return best


CART_EVENTS = frozenset({"add_to_cart", "remove_from_cart", "purchase"})  # the only ones that move a cart


def silence_due(cfg: TimerConfig, st: UserState, quiet_from_ms: int, quiet_done: int) -> int:
    """The next silence point (0: none left for this quiet spell)."""
    done = silence_done(quiet_from_ms, quiet_done, st.last_ms)
    return st.last_ms + cfg.silence_ms[done] if st.last_ms and done < len(cfg.silence_ms) else 0


def cart_due(cfg: TimerConfig, st: UserState, cart_done_ms: int) -> int:
    """When the open cart's episode is abandoned (0: no open cart, or its trigger already fired)."""
    if CART_ABANDONED not in cfg.triggers or not st.cart:
        return 0
    cart = open_cart(st)
    if cart is None or cart.start_ms <= cart_done_ms:
        return 0
    return cart.changed_ms + cfg.cart_after_ms


def repeat_view(cfg: TimerConfig, st: UserState, viewed: dict[str, int], product_id: str, ts_ms: int) -> int:
    """Views of ``product_id`` in the 24 h up to ``ts_ms`` when they make a repeat-view trigger, else 0.

    Call after the view was folded into ``st``; records the firing in ``viewed`` (product -> day).

    >>> st = UserState(views={"p": {10: 2, 11: 1}})
    >>> viewed = {}
    >>> repeat_view(TimerConfig(), st, viewed, "p", 11 * 3_600_000), viewed
    (3, {'p': 0})
    >>> repeat_view(TimerConfig(), st, viewed, "p", 11 * 3_600_000 + 1)  # once per product and day
    0
    """
    if REPEAT_VIEW not in cfg.triggers:
        return 0
    buckets = st.views.get(product_id)
    if not buckets:
        return 0
    n = window_sum(buckets, ts_ms // HOUR_MS, VIEW_HOURS)
    bought = st.bought.get(product_id)
    if n < cfg.repeat_views or (bought is not None and bought > ts_ms - BOUGHT_MS):
        return 0
    day = ts_ms // DAY_MS
    if viewed.get(product_id) == day:
        return 0
    viewed[product_id] = day
    for pid in [p for p, d in viewed.items() if d < day - 1]:
        del viewed[pid]
    if len(viewed) > MAX_VIEWED:
        for pid, _ in sorted(viewed.items(), key=lambda kv: kv[1])[: len(viewed) - MAX_VIEWED]:
            del viewed[pid]
    return n
