"""Growth through a live worker: per-event cost with 10k users stored against 1M, over Kafka.

The in-process growth phase (``streams.bench.growth``) times the handler over RocksDB alone. This
one runs the real worker: a fresh deployment is filled with one event for each of N users (so N
rows are stored, changelogged and in the timer heaps), then a sample of events of users drawn at
random among them is published and the worker's CPU time over that sample is divided by its size.
With N users a random draw mostly finds a user the outbox does not hold, so the sample reads
RocksDB as a large deployment would; that is the cost that must stay flat.

The sample's event times follow the fill's closely (seconds), so no silence point or horizon of the
N users comes due during it: the figure is the cost of an event, not of a wave of timers.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterator

from streams.bench.phases import live_events, preload
from streams.bench.proc import Proc, time_to_ready, wait_until
from streams.settings import Settings

Say = Callable[[str], None]
FILL_SPAN_MS = 10 * 60 * 1000  # the fill's events span ten minutes of event time, ending a minute ago


def fill_events(users: int, end_ms: int) -> Iterator[dict[str, object]]:
    """One page view per user, in time order over the ten minutes before ``end_ms``."""
    step = FILL_SPAN_MS / max(users, 1)
    start = end_ms - FILL_SPAN_MS
    for i in range(users):
        yield {
            "event_id": f"fill-{i}",
            "user_id": f"g{i:07d}",
            "type": "page_view",
            "ts": int(start + i * step),
            "session_id": f"g{i:07d}-s1",
            "consent": {"personalization": True},
        }


def sample_events(users: int, n: int, start_ms: int, seed: int) -> list[dict[str, object]]:
    """``n`` events of distinct users drawn uniformly among ``users``, a millisecond apart from
    ``start_ms`` (distinct: each is a row read from the store, and the sample's end is known)."""
    rng = random.Random(seed)
    ids = [f"g{i:07d}" for i in rng.sample(range(users), n)]
    out = live_events(ids, n, seed)
    for i, ev in enumerate(out):
        ev["user_id"] = ids[i]
        ev["ts"] = start_ms + i
        ev["consent"] = {"personalization": True}
    return out


def measure_size(
    settings: Settings, bootstrap: str, make_worker: Callable[[str], Proc], users: int, events: int, say: Say
) -> dict[str, float]:
    """Fill ``users`` users through a fresh worker, then time ``events`` more (per-event CPU cost);
    then a worker with an empty disk restores the deployment from its changelogs (recovery time)."""
    now = int(time.time() * 1000)
    say(f"  live growth: {users:,} users: publishing the fill ...")
    preload(fill_events(users, now - 60_000), settings, bootstrap, users)
    w = make_worker("filled")
    w.start()
    try:
        w.wait_ready()
        consumed = functools.partial(w.metric, "propstream_events_consumed_total")
        t0, cpu0 = time.perf_counter(), w.cpu_s()
        last = time.monotonic()

        def filled() -> bool:
            nonlocal last
            n = consumed()
            if time.monotonic() - last > 10:
                last = time.monotonic()
                say(f"  live growth: {users:,} users: {n:,.0f} filled")
            return n >= users

        # filled: every user's row written by a checkpoint (the one after the last event included)
        rows = functools.partial(w.metric, "propstream_checkpoint_rows_total")
        wait_until(lambda: filled() and rows() >= users, 3600, every_s=0.5, what=f"{users:,} users filled")
        fill_cpu, fill_s = w.cpu_s() - cpu0, time.perf_counter() - t0
        cpu1, rows1 = w.cpu_s(), rows()
        preload(sample_events(users, events, now - 30_000, seed=users), settings, bootstrap, events)
        wait_until(
            lambda: consumed() >= users + events and rows() >= rows1 + events,
            600,
            every_s=0.2,
            what="live growth: the sample processed and checkpointed",
        )
        sample_cpu = w.cpu_s() - cpu1
        rss = w.rss_mb()
    finally:
        w.stop()
    recovery_s = time_to_ready(make_worker("restored"))
    row = {
        "users": float(users),
        "events": float(events),
        "us_per_event": sample_cpu / events * 1e6,
        "fill_us_per_user": fill_cpu / users * 1e6,
        "fill_s": fill_s,
        "rss_mb": rss,
        "recovery_s": recovery_s,
    }
    say(
        f"  live growth: {users:,} users: {row['us_per_event']:.0f} us of worker CPU per event "
        f"(the fill: {row['fill_us_per_user']:.0f} us per new user), RSS {rss:.0f} MiB, "
        f"restored by an empty worker in {recovery_s:.1f} s"
    )
    return row


def growth_live(
    sizes: list[int],
    events: int,
    deployment: Callable[[str], tuple[Settings, Callable[[str], Proc]]],
    bootstrap: str,
    say: Say,
) -> list[dict[str, float]]:
    """Each size in a fresh deployment (``deployment(tag)``: its settings and a factory of its
    workers by name, each with a state folder of its own)."""
    out = []
    for users in sizes:
        settings, make_worker = deployment(f"grow{users}")
        out.append(measure_size(settings, bootstrap, make_worker, users, events, say))
    return out
