"""Dataset readers: hand-worked tiny files per format, ordering, derived sessions, errors, and the real samples."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from features.contract import Rejected, Rules, parse
from traffic.datasets import FORMATS, DatasetError, read_events

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
NOW = 1_800_000_000_000  # 2027: every sample lies in the past
TAOBAO_HEADER = "user_id,item_id,category_id,behavior,timestamp\n"
REES46_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
)
RR_HEADER = "timestamp,visitorid,event,itemid,transactionid\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def reason(ev: dict[str, object]) -> str | None:
    """The worker's verdict on one event: None if accepted, else the rejection reason."""
    try:
        parse(json.dumps(ev).encode(), Rules(), NOW)
    except Rejected as r:
        return r.reason
    return None


def ms(ev: dict[str, object]) -> int:
    value = ev["ts"]
    assert type(value) is int, ev
    return value


# --- taobao -------------------------------------------------------------------------------------


def test_taobao_rows_map_sort_and_get_sessions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.csv",
        TAOBAO_HEADER + "1,100,9,buy,1511603400\n"  # line 2
        "1,100,9,pv,1511600000\n"  # line 3
        "2,200,8,cart,1511600000\n"  # line 4: same second as line 3, keeps file order
        "1,101,9,fav,1511601800\n",  # line 5: exactly 1800 s after line 3: same session
    )
    got = list(read_events(path, "taobao"))
    assert got == [
        {
            "event_id": "taobao-3",
            "user_id": "1",
            "type": "product_view",
            "ts": 1_511_600_000_000,
            "product_id": "100",
            "category": "9",
            "session_id": "1-0",
        },
        {
            "event_id": "taobao-4",
            "user_id": "2",
            "type": "add_to_cart",
            "ts": 1_511_600_000_000,
            "product_id": "200",
            "category": "8",
            "session_id": "2-0",
        },
        {
            "event_id": "taobao-5",
            "user_id": "1",
            "type": "add_to_wishlist",
            "ts": 1_511_601_800_000,
            "product_id": "101",
            "category": "9",
            "session_id": "1-0",
        },
        {  # 1600 s later than line 5, but the gap is 1800: same session with the default
            "event_id": "taobao-2",
            "user_id": "1",
            "type": "purchase",
            "ts": 1_511_603_400_000,
            "product_id": "100",
            "category": "9",
            "session_id": "1-0",
        },
    ]
    assert all(reason(e) is None for e in got)
    # a shorter gap splits user 1: 1800 s > 1000 s starts session 1, 1600 s > 1000 s session 2
    short = list(read_events(path, "taobao", session_gap_s=1000))
    assert [e["session_id"] for e in short] == ["1-0", "2-0", "1-1", "1-2"]


def test_taobao_bad_rows_are_kept_for_the_worker_to_reject(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.csv",
        TAOBAO_HEADER + "1,100,9,pv,yesterday\n"  # unparseable time: kept, as text, last
        ",100,9,pv,1511600000\n"  # no user
        "3,100,9,share,1511600001\n"  # not in the vocabulary
        "\n"  # a blank line: no event
        "4,100\n"  # a short row
        "5,100,9,pv,1511600\n",  # seconds of 1970: the worker says too_old
    )
    got = list(read_events(path, "taobao"))
    assert [(e["event_id"], e["ts"]) for e in got] == [
        ("taobao-7", 1_511_600_000),
        ("taobao-3", 1_511_600_000_000),
        ("taobao-4", 1_511_600_001_000),
        ("taobao-2", "yesterday"),  # unparseable times last, in file order
        ("taobao-6", None),
    ]
    assert got[4] == {"event_id": "taobao-6", "user_id": "4", "type": None, "ts": None, "product_id": "100"}
    assert "session_id" not in got[1] and "session_id" not in got[3]  # no user, no time: no session
    assert [reason(e) for e in got] == [
        "too_old",
        "missing_field",
        "unknown_type",
        "bad_time",
        "missing_field",
    ]


# --- rees46 -------------------------------------------------------------------------------------


def test_rees46_rows_map_with_prices_revenue_and_sessions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.csv",
        REES46_HEADER + "2019-10-01 00:00:05 UTC,purchase,7,55,electronics.phone,acme,99.50,42,sess-a\n"
        "2019-10-01 00:00:01 UTC,view,7,55,,acme,99.50,42,sess-a\n"
        "2019-10-01 00:00:03 UTC,cart,8,56,,,12,43,\n"
        "2019-10-01 00:00:04 UTC,remove_from_cart,8,56,,,n/a,43,sess-b\n",
    )
    got = list(read_events(path, "rees46"))
    t0 = int(datetime(2019, 10, 1, tzinfo=UTC).timestamp() * 1000)
    assert got == [
        {
            "event_id": "rees46-3",
            "user_id": "42",
            "type": "product_view",
            "ts": t0 + 1000,
            "session_id": "sess-a",
            "product_id": "7",
            "category": "55",  # no category_code: the id
            "price": 99.5,
        },
        {
            "event_id": "rees46-4",
            "user_id": "43",
            "type": "add_to_cart",
            "ts": t0 + 3000,
            "product_id": "8",
            "category": "56",
            "price": 12.0,
            "quantity": 1,
            "session_id": "43-0",  # no user_session: derived
        },
        {
            "event_id": "rees46-5",
            "user_id": "43",
            "type": "remove_from_cart",
            "ts": t0 + 4000,
            "session_id": "sess-b",
            "product_id": "8",
            "category": "56",
            "price": "n/a",  # kept for the worker: wrong_type
            "quantity": 1,
        },
        {
            "event_id": "rees46-2",
            "user_id": "42",
            "type": "purchase",
            "ts": t0 + 5000,
            "session_id": "sess-a",
            "product_id": "7",
            "category": "electronics.phone",
            "price": 99.5,
            "revenue": 99.5,
            "quantity": 1,
        },
    ]
    assert [reason(e) for e in got] == [None, None, "wrong_type", None]
    bad_time = write(tmp_path, "b.csv", REES46_HEADER + "2019-10-01 00:00:05,view,7,55,,,1,42,s\n")
    [ev] = read_events(bad_time, "rees46")
    assert ev["ts"] == "2019-10-01 00:00:05" and reason(ev) == "bad_time"  # naive time: refused


# --- retailrocket -------------------------------------------------------------------------------


def test_retailrocket_rows_map_with_orders_and_sessions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "rr.csv",
        RR_HEADER + "1433221332117,257597,view,355908,\n"
        "1433221332000,257597,transaction,355908,4000\n"
        "1433223132118,257597,addtocart,355909,\n",  # 1800.001 s after the view: a new session
    )
    got = list(read_events(path, "retailrocket"))
    assert got == [
        {
            "event_id": "retailrocket-3",
            "user_id": "257597",
            "type": "purchase",
            "ts": 1433221332000,
            "product_id": "355908",
            "order_id": "4000",
            "session_id": "257597-0",
        },
        {
            "event_id": "retailrocket-2",
            "user_id": "257597",
            "type": "product_view",
            "ts": 1433221332117,
            "product_id": "355908",
            "session_id": "257597-0",
        },
        {
            "event_id": "retailrocket-4",
            "user_id": "257597",
            "type": "add_to_cart",
            "ts": 1433223132118,
            "product_id": "355909",
            "session_id": "257597-1",
        },
    ]
    assert all(reason(e) is None for e in got)


# --- jsonl --------------------------------------------------------------------------------------


def test_jsonl_passes_objects_through_sorted_and_wraps_the_rest(tmp_path: Path) -> None:
    a = {"event_id": "a", "user_id": "u", "type": "page_view", "ts": "2024-01-01T00:00:02Z", "x": [1]}
    b = {"event_id": "b", "user_id": "u", "type": "page_view", "ts": 1704067201000}
    c = {"event_id": "c", "user_id": "u", "type": "page_view", "ts": "2024-01-01T01:00:00+01:00"}
    d = {"event_id": "d", "ts": "soon"}
    e = {"event_id": "e", "timestamp": 1704067200500}  # the contract's fallback field
    lines = [
        json.dumps(d),
        json.dumps(a),
        "not json",
        "",
        json.dumps(b),
        "[1, 2]",
        json.dumps(c),
        json.dumps(e),
    ]
    path = write(tmp_path, "e.jsonl", "\n".join(lines) + "\n")
    got = list(read_events(path, "jsonl"))
    # c is 00:00:00Z (tie-free), e 00:00:00.5, b 00:00:01, a 00:00:02; then d and the wrapped lines in file order
    assert got == [c, e, b, a, d, {"_raw": "not json", "_line": 3}, {"_raw": "[1, 2]", "_line": 6}]
    assert "session_id" not in got[0]  # jsonl is passed through: no derived sessions
    assert reason(got[-2]) == "missing_field"  # the worker dead-letters the wrapped line


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path: Path) -> None:
    wrong = write(tmp_path, "bad.csv", "user_id,item,behavior\n1,2,pv\n")
    with pytest.raises(DatasetError) as info:
        read_events(wrong, "taobao")
    text = str(info.value)
    assert "missing columns item_id, category_id, timestamp" in text
    assert "expected header user_id,item_id,category_id,behavior,timestamp" in text
    with pytest.raises(DatasetError, match="missing columns"):
        read_events(wrong, "retailrocket")
    with pytest.raises(DatasetError, match=r"empty file"):
        read_events(write(tmp_path, "empty.csv", ""), "rees46")
    with pytest.raises(DatasetError, match="unknown format 'parquet': choose one of jsonl, taobao"):
        read_events(wrong, "parquet")
    with pytest.raises(DatasetError, match="cannot read"):
        read_events(tmp_path / "absent.csv", "taobao")
    with pytest.raises(DatasetError, match="cannot read"):
        read_events(tmp_path, "jsonl")  # a directory
    with pytest.raises(DatasetError, match="session_gap_s"):
        read_events(wrong, "taobao", session_gap_s=0)
    assert FORMATS == ("jsonl", "taobao", "rees46", "retailrocket")


def test_header_with_bom_spaces_and_reordered_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("\ufefftimestamp, behavior,user_id,item_id,category_id\n1511600000,pv,1,2,3\n".encode())
    [ev] = read_events(path, "taobao")
    assert (ev["user_id"], ev["type"], ev["ts"], ev["product_id"], ev["category"]) == (
        "1",
        "product_view",
        1_511_600_000_000,
        "2",
        "3",
    )


# --- the real samples (skipped without ../shared/data) ----------------------------------------------


def sample(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} absent (no ../shared/data on this machine)")
    return path


def test_taobao_sample_every_row_is_a_valid_event_and_the_stray_dates_come_first() -> None:
    path = sample("taobao", "user_behavior_sample.csv")
    events = list(read_events(path, "taobao"))
    assert len(events) == 59_263
    reasons = Counter(reason(e) for e in events)
    print("taobao sample verdicts:", dict(reasons))
    assert reasons == {None: 59_263}  # nothing rejected, stray dates included
    assert Counter(e["type"] for e in events) == {
        "product_view": 53_202,
        "add_to_cart": 3_289,
        "add_to_wishlist": 1_507,
        "purchase": 1_265,
    }
    # The window is 25 Nov - 3 Dec 2017 in Beijing time (UTC+8); rows outside it are kept, and sorted first.
    lo = int(datetime(2017, 11, 24, 16, tzinfo=UTC).timestamp() * 1000)
    hi = int(datetime(2017, 12, 3, 16, tzinfo=UTC).timestamp() * 1000)
    stray = [e for e in events if not lo <= ms(e) < hi]
    print("stray dates:", [(e["event_id"], e["user_id"], e["ts"]) for e in stray])
    assert len(stray) == 24 and events[:24] == stray
    assert {e["type"] for e in stray} == {"product_view"}
    assert stray[0]["ts"] == 1_505_117_799_000  # 2017-09-11, 74 days early (user 1000169)
    assert all(ms(e) < lo for e in stray)  # none after the window
    assert all(isinstance(e.get("session_id"), str) for e in events)


def test_taobao_timeslice_is_time_ordered_and_valid() -> None:
    path = sample("taobao_timeslice", "user_behavior_timeslice.csv")
    events = list(read_events(path, "taobao"))
    stamps = [ms(e) for e in events]
    assert len(events) == 110_300 and stamps == sorted(stamps)
    assert (stamps[0], stamps[-1]) == (1_511_658_000_000, 1_511_665_811_000)  # 01:00 - 03:10 UTC
    assert all(reason(e) is None for e in events[::50])


def test_rees46_sample_is_valid_including_the_truncated_last_row() -> None:
    path = sample("rees46", "events_2019_10_head.csv")
    events = list(read_events(path, "rees46"))
    assert len(events) == 17_435
    assert Counter(reason(e) for e in events) == {None: 17_435}
    last = next(e for e in events if e["event_id"] == "rees46-17436")  # 8 of 9 cells: no user_session
    assert last["session_id"] == f"{last['user_id']}-0" and last["price"] == 25.71
    buys = [e for e in events if e["type"] == "purchase"]
    assert len(buys) == 214 and all(e["revenue"] == e["price"] and e["quantity"] == 1 for e in buys)
