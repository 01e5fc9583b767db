"""One row per user (features, score state, ledger): the same results as three tables, one write each."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from features.state import UserState
from features.state import encode as encode_state
from streams.bench.core import build, records_of
from streams.ingest import MemoryStore, Record
from streams.rows import FEATURES, LEDGER, SCORES, PartKV, RowStore, UserRows, decode_row, encode_row
from streams.score_stage import MemoryKV
from streams.settings import Settings
from traffic.simulator import SimConfig, simulate


class CountingKV(MemoryKV):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def set(self, key: str, value: bytes) -> None:
        self.writes += 1
        super().set(key, value)


def _without_wall_clock(raw: bytes) -> dict[str, Any]:
    ch: dict[str, Any] = msgspec.json.decode(raw)
    for k in ("emit_ts_ms", "emitted_at"):
        ch.pop(k)
    return ch


def test_rows_give_the_same_state_and_changes_as_three_tables_with_one_write_per_user() -> None:
    settings = Settings(min_positives=0, min_negatives=0)
    records = records_of(simulate(SimConfig(users=300, seed=5, max_events=12_000)), settings)
    features, scores, ledgers = MemoryStore(), CountingKV(), CountingKV()
    changes_apart: list[bytes] = []
    apart = build(settings, features, scores, ledgers, changes_apart)
    table = CountingKV()
    rows = UserRows(table)
    changes_rows: list[bytes] = []
    together = build(
        settings, RowStore(rows, MemoryStore()), PartKV(rows, SCORES), PartKV(rows, LEDGER), changes_rows
    )
    touched = 0
    for i in range(0, len(records), 500):
        batch = records[i : i + 500]
        apart.process(batch)
        touched += len(together.process(batch))
    assert set(table.data) == set(features.data)
    for user, raw in table.data.items():
        parts = decode_row(raw)
        assert parts[FEATURES] == features.data[user]
        assert parts[SCORES] == scores.data.get(user, b"")
        assert parts[LEDGER] == ledgers.data.get(user, b"")
    assert any(decode_row(raw)[LEDGER] for raw in table.data.values())  # the ledger part is exercised
    assert [_without_wall_clock(c) for c in changes_rows] == [_without_wall_clock(c) for c in changes_apart]
    # one write per user touched per batch (plus users whose horizon passed): about a third as many
    apart_writes = features.writes + scores.writes + ledgers.writes
    assert touched <= table.writes <= max(features.writes, scores.writes, ledgers.writes)
    assert table.writes < 0.5 * apart_writes


def test_a_features_only_value_of_the_old_table_is_read_as_the_features_part() -> None:
    old = encode_state(UserState(events=3))
    assert decode_row(old) == [old, b"", b""]
    assert decode_row(encode_row([b"f", b"s", b""])) == [b"f", b"s", b""]
    from streams.rows import features_of_row

    # the sweep's head-only read gives the same features part, of both layouts
    assert features_of_row(old) == old
    assert features_of_row(encode_row([b"f", b"s", b"ledger" * 1000])) == b"f"


def test_a_failed_partition_writes_nothing_and_reads_outside_keep_nothing() -> None:
    table = CountingKV()
    rows = UserRows(table)
    store = RowStore(rows, MemoryStore())
    rec = Record("t", 0, 0, b"u", b"")
    with store.partition(rec):
        store.set("u", b"f1")
        PartKV(rows, SCORES).set("u", b"s1")
    assert table.writes == 1 and decode_row(table.data["u"]) == [b"f1", b"s1", b""]
    with pytest.raises(RuntimeError), store.partition(rec):
        store.set("u", b"f2")
        raise RuntimeError
    assert table.writes == 1 and store.get("u") == b"f1"
    table.data["u"] = encode_row([b"f3", b"", b""])  # e.g. restored from the changelog meanwhile
    assert store.get("u") == b"f3" and PartKV(rows, SCORES).get("u") is None
