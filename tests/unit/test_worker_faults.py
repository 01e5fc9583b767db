"""The worker's batch over the real row store: retention, watermarks across owners, failures, bad bytes.

Each test drives the ingest handler and score stage exactly as the worker wires them
(``streams.bench.core.build`` over :class:`streams.rows.RowStore`), with in-memory tables.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest

from features.state import UserState, decode
from features.state import encode as encode_state
from models.ledger import Snapshot, UserLedger
from models.scoring import ScoreState, decode_state, encode
from streams.bench.core import build
from streams.ingest import DeadLetter, IngestHandler, MemoryStore, Record
from streams.rows import FEATURES, LEDGER, SCORES, PartKV, RowStore, UserRows, decode_row, encode_row
from streams.score_stage import MemoryKV
from streams.settings import Settings

DAY = 86_400_000
HOUR = 3_600_000
T = (int(time.time() * 1000) // HOUR) * HOUR - 2 * DAY  # two days ago, on the hour
SOURCES = (
    ("events.clickstream", "page_view"),
    ("events.cart", "add_to_cart"),
    ("events.purchase", "purchase"),
)


def rec(topic: str, ev: dict[str, Any], offset: int = 0, partition: int = 0) -> Record:
    return Record(topic, partition, offset, str(ev["user_id"]).encode(), json.dumps(ev).encode())


def pv(i: int, ts: int, user: str = "u", kind: str = "page_view") -> dict[str, Any]:
    return {"event_id": f"e{i}", "user_id": user, "type": kind, "ts": ts}


class Worker:
    """A handler and score stage over one rows table, as ``streams/app.py`` wires them."""

    def __init__(self, table: MemoryKV | None = None, marks: MemoryStore | None = None, **overrides: Any):
        s = Settings(**{"min_positives": 0, "min_negatives": 0, "allowed_lateness_s": 3600, **overrides})
        self.table = table if table is not None else MemoryKV()
        self.marks = marks if marks is not None else MemoryStore()
        rows = UserRows(self.table)
        self.changes: list[bytes] = []
        self.dead: list[DeadLetter] = []
        self.handler: IngestHandler = build(
            s, RowStore(rows, self.marks), PartKV(rows, SCORES), PartKV(rows, LEDGER), self.changes
        )
        self.handler.dead_letter = self.dead.append

    def process(self, records: list[Record]) -> None:
        self.handler.process(records)

    def features(self, user: str) -> UserState:
        return decode(decode_row(self.table.data[user])[FEATURES])

    def metric(self, name: str, **labels: str) -> float:
        value = self.handler.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def everywhere(ts: int, first_id: int, user: str = "clock") -> list[Record]:
    """One event on each source topic of partition 0: every topic has a watermark at ``ts``."""
    return [rec(topic, pv(first_id + i, ts, user, kind)) for i, (topic, kind) in enumerate(SOURCES)]


# --- retention ----------------------------------------------------------------------------------


def test_a_returning_user_in_the_swept_slice_keeps_what_this_batch_wrote() -> None:
    w = Worker(user_ttl_days=1, retention_sweep_every_s=0)
    w.process(
        [
            rec("events.clickstream", pv(1, T - 3 * DAY, "idle")),
            rec("events.clickstream", pv(2, T - 3 * DAY, "back")),
        ]
    )
    assert sorted(w.table.data) == ["back", "idle"]
    # "back" returns in the batch that moves the clock three days on: the sweep covers both users
    w.process([rec("events.clickstream", pv(3, T, "active")), rec("events.clickstream", pv(4, T, "back"))])
    assert sorted(w.table.data) == ["active", "back"]  # idle past the TTL is gone, the returning user is not
    assert w.features("back").events == 2 and w.features("back").last_ms == T
    assert w.metric("propstream_users_evicted_total") == 1


# --- watermarks across owners -------------------------------------------------------------------


def test_a_partition_that_comes_back_uses_the_watermark_its_other_owner_advanced() -> None:
    marks = MemoryStore()  # the persisted watermarks table, shared through its changelog
    table = MemoryKV()
    a, b = Worker(table, marks), Worker(table, marks)
    a.process(everywhere(T - 10 * HOUR, 0))  # a owns partition 0, watermark T - 10h
    a.handler.forget_partitions({0})  # rebalance: partition 0 moves to b
    b.process(everywhere(T, 10))  # b moves the watermark to T and persists it
    b.handler.forget_partitions({0})  # and back to a
    a.process([rec("events.clickstream", pv(20, T - 2 * HOUR, "late"))])  # 2h behind T: late
    assert [d.reason for d in a.dead] == ["late"]
    assert marks.get_mark("events.clickstream", 0) == T  # never written back lower


def test_a_persisted_watermark_is_never_lowered() -> None:
    marks = MemoryStore()
    marks.set_mark("events.clickstream", 0, T)  # e.g. restored from the changelog meanwhile
    w = Worker(marks=marks)
    w.handler.loaded.add(0)  # as if loaded before the restore: the handler's own copy is older
    w.process([rec("events.clickstream", pv(1, T - 5 * HOUR))])
    assert marks.get_mark("events.clickstream", 0) == T


# --- a failure while processing one user ----------------------------------------------------------


def test_a_failure_inside_one_user_dead_letters_that_users_events_and_nothing_else_changes() -> None:
    w = Worker()
    w.process([*everywhere(T, 0, "good"), rec("events.clickstream", pv(5, T, "bad"))])
    before = w.table.data["bad"]
    changes_before = len(w.changes)
    stage = w.handler.stage
    assert stage is not None
    real = stage.on_event

    def fails_for_bad(u: Any, st: UserState, ev: Any) -> None:
        real(u, st, ev)
        if ev.user_id == "bad" and ev.type == "purchase":
            raise RuntimeError("injected")

    stage.on_event = fails_for_bad  # type: ignore[method-assign]
    bad = [
        rec("events.clickstream", pv(6, T + HOUR, "bad"), offset=7),
        rec("events.purchase", pv(7, T + 3 * HOUR, "bad", "purchase"), offset=8),  # the newest event
        rec("events.clickstream", pv(6, T + HOUR, "bad"), offset=9),  # a duplicate inside the batch
    ]
    good = [rec("events.clickstream", pv(8, T + HOUR, "good"), offset=10)]
    w.process(bad + good)
    stage.on_event = real  # type: ignore[method-assign]

    # every record of the failed user is a dead letter with the reason, each record once
    assert [(d.reason, d.record.offset) for d in w.dead] == [("processing_error", o) for o in (7, 8, 9)]
    assert "RuntimeError: injected" in w.dead[0].detail
    assert (
        w.metric("propstream_events_rejected_total", topic="events.purchase", reason="processing_error") == 1
    )
    assert w.metric("propstream_processing_errors_total", stage="user") == 1
    # the failed user's stored row is what it was; the other user's events are in
    assert w.table.data["bad"] == before
    assert w.features("good").events == 4
    assert w.metric("propstream_events_accepted_total", topic="events.purchase", type="purchase") == 1
    # event time moves as records arrive (docs/guarantees.md), whatever then happens to them
    assert w.marks.get_mark("events.purchase", 0) == T + 3 * HOUR
    assert not [c for c in w.changes[changes_before:] if json.loads(c)["user_id"] == "bad"]
    # the stream goes on: the same events processed again (a replay from the dead letters) are taken
    w.process(bad)
    assert w.features("bad").events == 3


def test_a_failure_outside_any_user_propagates_and_writes_nothing() -> None:
    w = Worker()
    w.process(everywhere(T, 0, "u"))
    before = dict(w.table.data)

    def broken(*args: Any) -> None:
        raise OSError("disk full")

    w.table.set = broken  # type: ignore[method-assign,assignment]  # the flush of the partition's rows fails
    with pytest.raises(OSError):
        w.process([rec("events.clickstream", pv(9, T + HOUR, "u"))])
    assert w.table.data == before and not w.dead


# --- bad stored bytes -----------------------------------------------------------------------------


def _row(features: bytes, scores: bytes = b"", ledger: bytes = b"") -> bytes:
    return encode_row([features, scores, ledger])


def test_corrupt_or_incompatible_stored_parts_are_counted_replaced_and_never_stop_the_batch() -> None:
    w = Worker(sample_every_s=0)  # a snapshot at every event: the ledger is read at once
    good_features = encode_state(UserState(first_ms=T, last_ms=T, events=1))
    w.table.data["f"] = _row(b"\x93\xff\x00garbage")
    w.table.data["fv"] = _row(msgspec.msgpack.encode(UserState(v=99, events=5)))  # another layout version
    w.table.data["s"] = _row(good_features, b"\xc1\xc1")
    w.table.data["l"] = _row(good_features, b"", b"\xde\xad\xbe\xef")
    w.table.data["lv"] = _row(good_features, b"", msgspec.msgpack.encode([{}, 99]))  # ledger version 99
    users = ["f", "fv", "s", "l", "lv", "ok"]
    w.process([rec("events.clickstream", pv(i, T + HOUR, u)) for i, u in enumerate(users)])
    assert not w.dead
    for u in users:  # every event was taken, and every row now reads cleanly
        st = w.features(u)
        assert st.last_ms == T + HOUR
        parts = decode_row(w.table.data[u])
        decode_state(parts[SCORES] or None)
        assert msgspec.msgpack.decode(parts[LEDGER], type=UserLedger).pending
    assert w.features("f").events == 1 and w.features("fv").events == 1  # unreadable: started afresh
    assert w.features("s").events == 2 and w.features("l").events == 2  # readable features are kept
    assert w.metric("propstream_decode_errors_total", what="features") == 2
    assert w.metric("propstream_decode_errors_total", what="scores") == 1
    assert w.metric("propstream_decode_errors_total", what="ledger") == 2


def test_a_corrupt_watermark_is_counted_and_the_stream_goes_on() -> None:
    marks = MemoryStore()
    marks.marks[("events.clickstream", 0)] = b"not a number"
    w = Worker(marks=marks)
    w.process([rec("events.clickstream", pv(1, T))])
    assert w.features("u").events == 1 and not w.dead
    assert w.metric("propstream_decode_errors_total", what="watermark") == 1


def test_every_part_decoder_names_what_it_could_not_read() -> None:
    from features.state import Corrupt
    from models.scoring import LazyLedger

    with pytest.raises(Corrupt, match="features"):
        decode(b"\xc1")
    with pytest.raises(Corrupt, match="scores"):
        decode_state(msgspec.msgpack.encode(ScoreState(v=7)))
    with pytest.raises(Corrupt, match="ledger"):
        LazyLedger(lambda: b"\xc1").get()
    led = UserLedger({"purchase": [Snapshot.of(1, [0.5], 0.25, 3)]})
    assert LazyLedger(lambda: encode(led)).get() == led
    assert (
        msgspec.msgpack.decode(encode(led))[-1] == 3
    )  # the ledger carries its layout version (3: sparse packed inputs)


# --- idle sources -----------------------------------------------------------------------------


def test_a_source_is_idle_only_once_everything_of_it_is_read() -> None:
    from streams.ingest import Watermarks

    read = {"b": False}
    w = Watermarks(("a", "b"), idle_ms=1_000, caught_up=lambda topic, p: read.get(topic, True))
    w.advance("b", 0, 100, now_ms=0)
    w.advance("a", 0, 5_000, now_ms=0)
    w.advance("a", 0, 9_000, now_ms=2_000)  # b has not moved for 2 s of wall time while a did
    assert w.of(0, now_ms=2_000) == 100  # but b still has unread messages: a catch-up, not idleness
    read["b"] = True
    assert w.of(0, now_ms=2_000) == 9_000  # everything of b is read: idle, it holds nothing back
    assert w.of(0) == 100  # pure event time (replay, eval): nothing is idle


def test_a_source_that_never_delivered_holds_back_until_read_and_idle() -> None:
    from streams.ingest import Watermarks

    read = {"b": False}
    w = Watermarks(("a", "b"), idle_ms=1_000, caught_up=lambda topic, p: read.get(topic, True))
    w.advance("a", 0, 5_000, now_ms=0)
    assert w.of(0, now_ms=500) == 0 and w.of(0, now_ms=5_000) == 0  # b may still be on its way
    read["b"] = True  # an orders-only deployment: b has nothing at all
    assert w.of(0, now_ms=500) == 0 and w.of(0, now_ms=5_000) == 5_000


# --- horizons passing ---------------------------------------------------------------------------


@pytest.mark.parametrize("fail", [False, True])
def test_horizons_passing_in_one_batch_go_out_in_horizon_order_and_a_failing_user_sends_none(
    fail: bool,
) -> None:
    examples: list[bytes] = []
    s = Settings(
        targets="purchase:2h", sample_every_s=600, rescore_after="", min_positives=0, min_negatives=0
    )
    table, marks = MemoryKV(), MemoryStore()
    rows = UserRows(table)
    h = build(s, RowStore(rows, marks), PartKV(rows, SCORES), PartKV(rows, LEDGER), examples=examples)
    # a and b each get three snapshots, 10 minutes apart, interleaved in time
    batch = []
    for k in range(3):
        for j, user in enumerate(("a", "b")):
            ts = T + k * 10 * 60_000 + j * 60_000
            batch += [
                rec(topic, pv(100 * k + 10 * j + i, ts, user, kind))
                for i, (topic, kind) in enumerate(SOURCES)
            ]
    h.process(batch)
    assert not examples
    stage = h.stage
    assert stage is not None
    real = stage.core.expire
    calls: list[str] = []

    def fails_on_bs_second(user: str, *args: Any) -> Any:
        calls.append(user)
        if fail and user == "b" and calls.count("b") == 2:
            raise RuntimeError("injected")
        return real(user, *args)

    stage.core.expire = fails_on_bs_second  # type: ignore[method-assign]
    b_before = table.data["b"]
    h.process(everywhere(T + 5 * HOUR, 900))  # every horizon (+2 h) has passed, and the lateness floor too
    stage.core.expire = real  # type: ignore[method-assign]
    sent = [msgspec.msgpack.decode(e) for e in examples]
    times = [ex[2] for ex in sent]  # [tag, target, snapshot time, ...]
    if not fail:  # both users' snapshots, interleaved by horizon across users
        assert times == [T + k * 10 * 60_000 + j * 60_000 for k in range(3) for j in range(2)]
        assert decode_row(table.data["b"])[LEDGER] == b""
        return
    # only a's three snapshots (b failed on its second horizon: none of b's), oldest horizon first
    assert times == [T, T + 10 * 60_000, T + 20 * 60_000]
    assert decode_row(table.data["b"])[LEDGER] == decode_row(b_before)[LEDGER]  # b's ledger as it was
    assert decode_row(table.data["a"])[LEDGER] == b""  # a's is empty: everything matured
    assert h.metrics.registry.get_sample_value("propstream_processing_errors_total", {"stage": "expire"}) == 1


def test_a_user_whose_events_failed_is_read_afresh_when_its_horizon_passes_in_the_same_batch() -> None:
    w = Worker(targets="purchase:2h", sample_every_s=600, rescore_after="")
    w.process([*everywhere(T, 0, "clock"), rec("events.clickstream", pv(5, T, "bad"))])
    stage = w.handler.stage
    assert stage is not None
    real = stage.on_event

    def fails_for_bad(u: Any, st: UserState, ev: Any) -> None:
        real(u, st, ev)  # the snapshot at this event is taken, then the user fails
        if ev.user_id == "bad":
            raise RuntimeError("injected")

    stage.on_event = fails_for_bad  # type: ignore[method-assign]
    # bad's snapshot at T matures in this batch (the clock passes T + 2 h + the 1 h lateness)
    w.process(
        [rec("events.clickstream", pv(6, T + 4 * HOUR, "bad"), offset=3), *everywhere(T + 4 * HOUR, 10)]
    )
    stage.on_event = real  # type: ignore[method-assign]
    assert [d.reason for d in w.dead] == ["processing_error"]
    row = decode_row(w.table.data["bad"])
    # the matured snapshot left; the one the failed event took was never written
    assert row[LEDGER] == b""
    assert decode_state(row[SCORES]).targets["purchase"].sampled_ms == T
    assert w.features("bad").events == 1
