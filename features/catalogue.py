"""The feature catalogue: name, meaning, window and unit of every feature served.

``docs/features.md`` is generated from this list (``propstream features --catalogue``) and a test
checks that :func:`features.user.compute` returns exactly these names.
"""

from __future__ import annotations

from typing import NamedTuple

from features.counts import COUNTED_TYPES, WINDOWS


class Feature(NamedTuple):
    name: str
    meaning: str
    window: str
    unit: str


def _count_features() -> list[Feature]:
    out = []
    for window, (_, width, n) in WINDOWS.items():
        res = {60_000: "minute", 3_600_000: "hour", 86_400_000: "day"}[width]
        for t in COUNTED_TYPES:
            what = "custom business events" if t == "custom" else f"{t} events"
            out.append(
                Feature(f"n_{t}_{window}", f"Number of {what}", f"{window} ({n} {res} buckets)", "count")
            )
        out.append(Feature(f"n_events_{window}", "Number of accepted events of any type", window, "count"))
    return out


CATALOGUE: tuple[Feature, ...] = (
    *_count_features(),
    Feature("s_since_last_event", "Time since the latest event", "all time", "seconds"),
    Feature(
        "s_since_last_add_to_cart", "Time since the latest add_to_cart (null: never)", "all time", "seconds"
    ),
    Feature("s_since_last_purchase", "Time since the latest purchase (null: never)", "all time", "seconds"),
    Feature("tenure_days", "Time since the first event seen", "all time", "days"),
    Feature(
        "engagement_trend",
        "(a-b)/(a+b) with a = events in the last 7 days, b = the 7 days before; 0 when both are 0",
        "14d (day buckets)",
        "ratio in [-1, 1]",
    ),
    Feature(
        "in_session", "A session is in progress: the latest event is within the session gap", "now", "boolean"
    ),
    Feature(
        "session_events", "Events so far in the session in progress (0: none in progress)", "session", "count"
    ),
    Feature(
        "session_duration_s", "First-to-latest event span of the session in progress", "session", "seconds"
    ),
    Feature("session_add_to_cart", "add_to_cart events in the session in progress", "session", "count"),
    Feature("session_checkout_start", "checkout_start events in the session in progress", "session", "count"),
    Feature("sessions_7d", "Sessions with an event in the window", "7d (exact)", "count"),
    Feature("events_per_session_7d", "Mean events per session of those sessions", "7d", "events"),
    Feature("mean_session_duration_s_7d", "Mean first-to-last event span of those sessions", "7d", "seconds"),
    Feature("purchases_30d", "Purchase events", "30d (day buckets)", "count"),
    Feature("purchases_90d", "Purchase events", "90d (day buckets)", "count"),
    Feature(
        "revenue_30d", "Sum of order revenue (any currency, as sent)", "30d (day buckets)", "currency units"
    ),
    Feature(
        "revenue_90d", "Sum of order revenue (any currency, as sent)", "90d (day buckets)", "currency units"
    ),
    Feature(
        "aov_90d", "Average order value: revenue_90d / purchases_90d (0: no orders)", "90d", "currency units"
    ),
    Feature(
        "cart_items",
        "Items in the open cart: adds minus removes after the latest purchase",
        "open cart",
        "items",
    ),
    Feature(
        "cart_value",
        "Value of the open cart at each product's latest added price",
        "open cart",
        "currency units",
    ),
    Feature(
        "cart_abandoned",
        "Open cart not empty and its latest add at least abandon_after_s ago (no purchase since)",
        "open cart",
        "boolean",
    ),
    Feature(
        "distinct_products_viewed_24h", "Distinct products with a product_view", "24h (hour buckets)", "count"
    ),
    Feature(
        "max_views_one_product_unbought_24h",
        "Most product_views of a single product the user has not bought in 30 days",
        "24h (hour buckets)",
        "count",
    ),
)

NAMES: tuple[str, ...] = tuple(f.name for f in CATALOGUE)


def as_markdown() -> str:
    rows = ["| feature | meaning | window | unit |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {f.meaning} | {f.window} | {f.unit} |" for f in CATALOGUE]
    return "\n".join(rows) + "\n"
