"""Publish canonical events to their topics, keyed by user, with pacing and progress output.

Used by ``simulate``, ``replay`` and the demo: the same producer code path an outside system
would follow (kafka-python, key = user id, JSON value).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import TextIO

import msgspec
from kafka import KafkaProducer

from streams.settings import Settings

CART_TYPES = frozenset({"add_to_cart", "remove_from_cart", "checkout_start"})


def topic_for(etype: object, settings: Settings) -> str:
    """Route by type: orders to the purchase topic, cart actions to the cart topic, rest to clickstream."""
    if etype == "purchase":
        return settings.topic_purchase
    if etype in CART_TYPES:
        return settings.topic_cart
    return settings.topic_clickstream


def make_producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=10,
        batch_size=256 * 1024,
        compression_type=None,
        max_in_flight_requests_per_connection=1,  # keeps per-partition order across retries
        retries=10,
    )


class Progress:
    """One status line per ``every_s`` on stderr: count, rate, and an optional total."""

    def __init__(
        self, label: str, total: int | None = None, every_s: float = 2.0, out: TextIO = sys.stderr
    ) -> None:
        self.label, self.total, self.every_s, self.out = label, total, every_s, out
        self.start = self.last = time.monotonic()
        self.n = 0

    def tick(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.label}: {self.n:,}{of} events{pct}, {rate:,.0f}/s", file=self.out, flush=True)

    def done(self) -> None:
        self._print(time.monotonic())


def publish(
    events: Iterable[Mapping[str, object]],
    settings: Settings,
    *,
    bootstrap: str | None = None,
    rate: float = 0.0,
    progress: Progress | None = None,
    producer: KafkaProducer | None = None,
) -> int:
    """Send events in order (``rate`` events/s wall clock, 0 = as fast as possible). Returns the count."""
    own = producer is None
    prod = producer or make_producer(bootstrap or settings.broker_url)
    enc = msgspec.json.Encoder()
    start = time.monotonic()
    n = 0
    try:
        for ev in events:
            user = ev.get("user_id")
            key = str(user).encode() if user is not None else None
            prod.send(topic_for(ev.get("type"), settings), key=key, value=enc.encode(ev))
            n += 1
            if progress is not None:
                progress.tick()
            if rate > 0 and n % 50 == 0:
                ahead = n / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        prod.flush()
    finally:
        if own:
            prod.close()
    return n
