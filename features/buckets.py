"""Sparse time buckets: the bounded building block of every sliding-window feature.

A window of width ``W`` at resolution ``R`` counts the events whose bucket index
``ts // R`` lies in ``(now // R - W/R, now // R]``: the current, partial bucket and the
``W/R - 1`` full buckets before it. State per window is at most ``W/R`` integers.
"""

from __future__ import annotations

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def add(buckets: dict[int, int], idx: int, n: int = 1) -> None:
    buckets[idx] = buckets.get(idx, 0) + n


def window_sum(buckets: dict[int, int], now_idx: int, width: int) -> int:
    """Sum of buckets with index in ``(now_idx - width, now_idx]``.

    >>> window_sum({1: 2, 5: 1, 9: 4}, now_idx=9, width=5)
    5
    """
    lo = now_idx - width
    return sum(n for i, n in buckets.items() if lo < i <= now_idx)


def prune(buckets: dict[int, int], latest_idx: int, keep: int) -> None:
    """Drop buckets that no window ending at or after ``latest_idx`` can reach."""
    lo = latest_idx - keep
    if buckets and min(buckets) <= lo:  # the usual case, nothing to drop, without building a list
        for i in [i for i in buckets if i <= lo]:
            del buckets[i]
