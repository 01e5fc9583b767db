"""Two workers share the partitions; one is SIGKILLed and comes back while traffic flows.

- the survivor takes over the dead worker's partitions and restores their state from the changelogs
  (every user's event count catches up with what was produced while only it runs);
- lookups keep answering through either worker, routed to the owner, during and after each
  rebalance, with a bearer token on every request: every 200 answer is *exactly* the recount of a
  prefix of that user's events (never a mix, never a count of events that were not produced); the
  errors in between are JSON;
- at the end both own partitions again and every user's features equal the reference recount.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import pytest

from streams.settings import Settings
from tests.integration.harness import FAST_FAILOVER, Traffic, WorkerProc, user_router, wait_until
from tests.reference import DAY, HOUR, assert_features_equal, random_events, reference_features

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Prober:
    """Looks users up through random live workers and checks each answer against the reference."""

    def __init__(self, users: dict[str, list[dict[str, Any]]], traffic: Traffic, as_of: int) -> None:
        self.users = users
        self.traffic = traffic
        self.as_of = as_of
        self.rng = random.Random(7)
        self.statuses: Counter[int] = Counter()
        self.errors: list[tuple[int, Any]] = []
        self.seen: dict[str, int] = {}  # most events seen per user in a 200 answer
        self.went_back = 0  # answers showing fewer events than an earlier answer (see docs/guarantees.md)

    def probe(self, workers: list[WorkerProc]) -> None:
        live = [w for w in workers if w.alive()]
        user = self.rng.choice(sorted(self.users))
        w = self.rng.choice(live)
        sent_before = self.traffic.sent
        try:
            status, body = w.get(f"/users/{user}/features?as_of={self.as_of}", headers=AUTH)
        except OSError as exc:  # the process died under the request, or the connection was refused
            self.statuses[-1] += 1
            self.errors.append((-1, repr(exc)))
            return
        self.statuses[status] += 1
        if status != 200:
            assert isinstance(body, dict) and "error" in body, (status, body)
            self.errors.append((status, body))
            self.went_back += status == 404 and user in self.seen
            return
        evs = self.users[user]
        n = body["events"]
        self.went_back += n < self.seen.get(user, 0)
        self.seen[user] = max(n, self.seen.get(user, 0))
        produced = sum(
            1 for e in self.traffic.events[: max(sent_before, self.traffic.sent)] if e["user_id"] == user
        )
        assert 1 <= n <= produced, (user, n, produced)
        want = reference_features(evs[:n], self.as_of)
        assert_features_equal(body["features"], want, f"user {user} via {w.url} ({n} events)")

    def run_until(self, workers: list[WorkerProc], answers: int, timeout_s: float = 60.0) -> None:
        """Probe until ``answers`` more lookups were answered 200 (and checked), however long that takes."""
        want = self.statuses[200] + answers

        def enough() -> bool:
            self.probe(workers)
            return self.statuses[200] >= want

        try:
            wait_until(enough, timeout_s, every_s=0.05, what=f"{answers} lookups answered 200")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; answers by status: {dict(self.statuses)}") from None


def owner(worker: WorkerProc, user: str) -> str | None:
    """The port of the worker that answered a lookup through ``worker`` (None: no answer)."""
    status, body = worker.get(f"/users/{user}/features", headers=AUTH)
    return str(body["served_by"]).rstrip("/").rsplit(":", 1)[1] if status == 200 else None


def test_survivor_takes_over_and_lookups_stay_correct(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    extra = {**FAST_FAILOVER, "PROPSTREAM_API_TOKEN": TOKEN}
    a = make_worker("a", **extra).launch()
    b = make_worker("b", **extra).launch()
    wait_until(lambda: a.ready() and b.ready(), 90, what="both workers ready after the first rebalance")

    now = int(time.time() * 1000)
    events = random_events(5, users=60, per_user=50, start_ms=now - 20 * DAY, span_ms=20 * DAY - HOUR)
    users: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        users.setdefault(e["user_id"], []).append(e)
    as_of = max(e["ts"] for e in events) + HOUR
    traffic = Traffic(kafka, user_router(settings.source_topics), events, rate=len(events) / 30)
    prober = Prober(users, traffic, as_of)
    traffic.start()

    wait_until(lambda: traffic.sent > 400, 30, what="traffic to flow")
    prober.run_until([a, b], 20)
    owners_before = Counter(owner(a, u) for u in sorted(users)[:20])  # None: no event of the user yet
    assert set(owners_before) - {None} == {str(a.port), str(b.port)}, (
        f"the partitions are not shared: {owners_before}"
    )

    b.kill()  # SIGKILL: no goodbye to the group; it leaves after the session timeout
    killed_at = time.monotonic()
    sent_at_kill = traffic.sent

    def a_owns_everything() -> bool:
        prober.probe([a])
        return all(owner(a, u) == str(a.port) for u in sorted(users)[:20])

    wait_until(a_owns_everything, 90, every_s=0.2, what="the survivor to own every partition")
    takeover_s = time.monotonic() - killed_at
    # the survivor restored the dead worker's partitions: users it never owned have everything produced
    expected = Counter(e["user_id"] for e in events[: traffic.sent])

    short: dict[str, tuple[int | None, int]] = {}

    def survivor_has_everything() -> bool:
        short.clear()
        for u, n in expected.items():
            status, body = a.get(f"/users/{u}/features", headers=AUTH)
            if status != 200 or body["events"] < n:
                short[u] = (body.get("events") if status == 200 else status, n)
        return not short

    try:
        wait_until(survivor_has_everything, 90, every_s=1.0, what="the survivor to hold every event so far")
    except AssertionError as exc:
        rejected = {r: a.metric("propstream_events_rejected_total", reason=r) for r in ("late", "duplicate")}
        raise AssertionError(
            f"{exc}; users (held, produced): {dict(list(short.items())[:8])} of {len(short)} short; "
            f"rejected {rejected}, stale records dropped {a.metric('propstream_stale_records_total')}"
        ) from None
    assert traffic.sent > sent_at_kill, "traffic stopped during the takeover"

    b.launch()  # same state folder; the group rebalances again while traffic flows
    wait_until(lambda: b.ready() and a.ready(), 120, every_s=0.2, what="both workers ready again")
    prober.run_until([a, b], 30)  # through both workers, after the rejoin
    traffic.hurry()  # both rebalances were mid-stream: the rest of the events need no pacing
    traffic.finish()

    def converged() -> bool:
        prober.probe([a, b])
        for u, evs in users.items():
            status, body = b.get(f"/users/{u}/features?as_of={as_of}", headers=AUTH)
            if status != 200 or body["events"] != len(evs):
                return False
        return True

    wait_until(converged, 120, every_s=0.5, what="every user's events counted after the rejoin")
    served = Counter()
    for u, evs in users.items():
        want = reference_features(evs, as_of)
        for w in (a, b):
            status, body = w.get(f"/users/{u}/features?as_of={as_of}", headers=AUTH)
            assert status == 200, (u, w.url, body)
            assert body["events"] == len(evs)
            assert_features_equal(body["features"], want, f"user {u} via {w.url}")
            served[body["served_by"]] += 1
    assert len(served) == 2, f"the restarted worker owns nothing: {served}"
    for w in (a, b):  # each answered its own users on its read thread, and routed the other's
        assert w.metric("propstream_lookups_total", served="thread") > 0, w.url
        assert w.metric("propstream_lookups_total", served="faust") > 0, w.url
    print(
        f"takeover after SIGKILL: {takeover_s:.1f}s; lookups during the run by status: "
        f"{dict(prober.statuses)}; answers older than one seen before: {prober.went_back}; "
        f"errors seen: {prober.errors[:5]}; records left for a re-read (stale): "
        f"{a.metric('propstream_stale_records_total')} + {b.metric('propstream_stale_records_total')}"
    )
