"""The batch handler without Kafka: lateness against the watermark, consent, coalesced writes."""

from __future__ import annotations

import json
from itertools import pairwise

from features.state import decode
from streams.ingest import DeadLetter, IngestHandler, MemoryStore, Record
from streams.settings import Settings

NOW_S = 1_800_000_000.0
T = int(NOW_S * 1000) - 86_400_000


def rec(topic: str, ev: dict, offset: int = 0, partition: int = 0) -> Record:
    return Record(topic, partition, offset, str(ev["user_id"]).encode(), json.dumps(ev).encode())


def handler(**overrides: object) -> tuple[IngestHandler, MemoryStore, list[DeadLetter]]:
    store = MemoryStore()
    dead: list[DeadLetter] = []
    s = Settings(**{"allowed_lateness_s": 3600, **overrides})  # type: ignore[arg-type]
    return IngestHandler(s, store, dead.append, clock=lambda: NOW_S), store, dead


def pv(i: int, ts: int, user: str = "u", **kw: object) -> dict:
    return {"event_id": f"e{i}", "user_id": user, "type": "page_view", "ts": ts, **kw}


def test_one_write_per_user_per_batch() -> None:
    h, store, dead = handler()
    batch = [rec("events.clickstream", pv(i, T + i, user=f"u{i % 3}")) for i in range(30)]
    h.process(batch)
    assert store.writes == 3 and not dead
    assert sum(decode(v).events for v in store.data.values()) == 30


def test_late_only_once_every_topic_has_a_watermark() -> None:
    h, store, dead = handler()
    # only clickstream has data: no watermark yet, an old event is still accepted
    h.process([rec("events.clickstream", pv(1, T)), rec("events.clickstream", pv(2, T - 5 * 3_600_000))])
    assert not dead
    h.process(
        [
            rec("events.cart", {**pv(3, T), "type": "add_to_cart"}),
            rec("events.purchase", {**pv(4, T), "type": "purchase"}),
        ]
    )
    # watermark is now T on all three topics: 2 hours behind is late, 30 minutes behind is not
    h.process(
        [rec("events.clickstream", pv(5, T - 2 * 3_600_000)), rec("events.clickstream", pv(6, T - 1_800_000))]
    )
    assert [d.reason for d in dead] == ["late"]
    assert decode(store.data["u"]).events == 5


def test_a_topic_consumed_ahead_does_not_make_others_late() -> None:
    h, _, dead = handler()
    ahead = T + 10 * 3_600_000
    h.process(
        [
            rec("events.purchase", {**pv(1, ahead), "type": "purchase"}),
            rec("events.cart", {**pv(2, ahead), "type": "add_to_cart"}),
            rec("events.clickstream", pv(3, T)),
        ]
    )
    h.process([rec("events.clickstream", pv(4, T + 1000))])  # 10 h behind the other topics, not late
    assert not dead


def test_consent_denied_is_not_used_and_not_dead_lettered() -> None:
    h, store, dead = handler()
    h.process([rec("events.clickstream", pv(1, T, consent={"personalization": False}))])
    assert not dead and not store.data
    assert h.metrics.no_consent.labels("events.clickstream")._value.get() == 1


def test_dead_letter_keeps_original_bytes_and_source() -> None:
    h, _, dead = handler()
    r = Record("events.cart", 3, 42, b"u", b"\x00garbage")
    h.process([r])
    [d] = dead
    assert d.record.value == b"\x00garbage"
    headers = dict(d.headers())
    assert headers["propstream.reason"] == b"not_json"
    assert (headers["propstream.source.partition"], headers["propstream.source.offset"]) == (b"3", b"42")


def test_watermark_survives_a_restart_through_the_store() -> None:
    h, store, dead = handler()
    h.process(
        [
            rec(t, {**pv(i, T), "type": k})
            for i, (t, k) in enumerate(
                [
                    ("events.clickstream", "page_view"),
                    ("events.cart", "add_to_cart"),
                    ("events.purchase", "purchase"),
                ]
            )
        ]
    )
    restarted = IngestHandler(Settings(allowed_lateness_s=3600), store, dead.append, clock=lambda: NOW_S)
    restarted.process([rec("events.clickstream", pv(9, T - 2 * 3_600_000))])
    assert [d.reason for d in dead] == ["late"]


def test_retention_evicts_inactive_users_a_slice_at_a_time() -> None:
    day = 86_400_000
    h, store, dead = handler(user_ttl_days=1, retention_sweep_batch=2, retention_sweep_every_s=0)
    idle = [f"idle{i}" for i in range(5)]
    h.process([rec("events.clickstream", pv(i, T - 3 * day + i, user=u)) for i, u in enumerate(idle)])
    assert sorted(store.data) == idle  # the clock is the users' own time: nobody is idle yet
    sizes = [len(store.data)]
    for i in range(6):  # an active user moves the partition's event-time clock three days on
        h.process([rec("events.clickstream", pv(100 + i, T + i, user="active"))])
        sizes.append(len(store.data))
    assert sorted(store.data) == ["active"]  # every user idle past the TTL is gone, the active one stays
    assert all(a - b <= 2 for a, b in pairwise(sizes))  # at most one slice of 2 per batch
    assert h.metrics.evicted._value.get() == 5 and not dead


def test_retention_reads_only_the_head_of_a_recent_state_and_never_evicts_an_unreadable_one() -> None:
    """The sweep judges most users by the head of their state; an old one is read in full first,
    and one that cannot be read stays (it is counted when the user's next event reads it)."""
    import msgspec

    from features.state import STATE_VERSION, last_ms_of

    day = 86_400_000
    h, store, dead = handler(user_ttl_days=1, retention_sweep_batch=10, retention_sweep_every_s=0)
    h.process([rec("events.clickstream", pv(1, T - 3 * day, user="old"))])
    # an old state whose head reads but whose body does not (ids must be a map)
    store.data["broken"] = msgspec.msgpack.encode([STATE_VERSION, T - 3 * day, T - 3 * day, 1, 0, "x"])
    assert last_ms_of(store.data["broken"]) == T - 3 * day
    store.data["garbage"] = b"\xc1\xc1"
    for i in range(3):
        h.process([rec("events.clickstream", pv(100 + i, T + i, user="active"))])
    assert sorted(store.data) == ["active", "broken", "garbage"] and not dead


def test_a_partition_is_swept_at_most_once_per_sweep_interval_of_wall_time() -> None:
    """Live batches are small and many: the sweep runs on the wall clock, not after every batch."""
    day = 86_400_000
    now = [NOW_S]
    store = MemoryStore()
    s = Settings(
        allowed_lateness_s=3600, user_ttl_days=1, retention_sweep_batch=1, retention_sweep_every_s="2s"
    )
    h = IngestHandler(s, store, lambda dl: None, clock=lambda: now[0])
    h.process([rec("events.clickstream", pv(i, T - 3 * day + i, user=f"idle{i}")) for i in range(3)])
    sizes = []
    for i in range(6):  # half a second apart: a sweep (of one user) every fourth batch
        h.process([rec("events.clickstream", pv(100 + i, T + i, user="active"))])
        sizes.append(len(store.data))
        now[0] += 0.5
    # the idle users' own batch swept (nobody idle then); the next four batches fall within 2 s of
    # it and do not sweep; the one 2 s after it evicts one user
    assert sizes == [4, 4, 4, 4, 3, 3], sizes
    # no more batches: the last one was too soon to sweep, so an idle tick sweeps once it is due
    now[0] += 0.5  # 1.0 s after the last sweep: not yet
    h.tick()
    assert len(store.data) == 3
    now[0] += 1.0
    h.tick()
    assert len(store.data) == 2, "a quiet partition kept the sweep a batch skipped"
    assert h.metrics.evicted._value.get() == 2  # the tick's eviction is counted too


def test_retention_off_keeps_everyone() -> None:
    h, store, _ = handler(user_ttl_days=0)
    h.process([rec("events.clickstream", pv(1, T - 500 * 86_400_000, user="a"))])
    h.process([rec("events.clickstream", pv(2, T, user="b"))])
    assert sorted(store.data) == ["a", "b"]
