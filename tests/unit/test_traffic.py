"""The simulator's determinism and ground truth, and the dataset readers on hand-made and real files."""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from features.contract import Rejected, Rules, parse
from tests.conftest import SHARED_DATA
from traffic.datasets import DatasetError, read_events
from traffic.simulator import SimConfig, read_truth, simulate, simulate_with_truth, write_truth

START = 1_700_000_000_000
DAY = 86_400_000


def test_same_seed_same_events_other_seed_other_events() -> None:
    cfg = SimConfig(users=50, seed=7, days=5, start_ms=START)
    a, b = list(simulate(cfg)), list(simulate(cfg))
    assert a == b and len(a) > 100
    assert list(simulate(SimConfig(users=50, seed=8, days=5, start_ms=START))) != a


def test_events_ordered_valid_and_within_span() -> None:
    cfg = SimConfig(users=300, seed=3, days=10, start_ms=START, max_events=5000)
    events = list(simulate(cfg))
    assert len(events) == 5000
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps)
    assert stamps[0] >= START and stamps[-1] <= START + 10 * DAY
    assert len({e["event_id"] for e in events}) == len(events)
    for e in events:
        parse(json.dumps(e).encode(), Rules(), START + 11 * DAY)  # raises on any contract breach


def test_funnel_order_within_sessions() -> None:
    sessions: dict[object, list[str]] = defaultdict(list)
    for e in simulate(SimConfig(users=200, seed=5, days=10, start_ms=START)):
        sessions[e["session_id"]].append(str(e["type"]))
    for kinds in sessions.values():
        if "purchase" in kinds:
            assert kinds.index("add_to_cart") < kinds.index("checkout_start") < kinds.index("purchase")
            assert kinds[-1] == "purchase"


def test_truth_is_calibrated_against_realised_outcomes() -> None:
    """Realised purchase-within-7d, recounted from the events, matches the oracle's probabilities."""
    cfg = SimConfig(users=600, seed=11, days=30, start_ms=START)
    rows = list(simulate_with_truth(cfg))
    buys: dict[str, list[int]] = defaultdict(list)
    for e, _ in rows:
        if e["type"] == "purchase":
            buys[str(e["user_id"])].append(int(e["ts"]))  # type: ignore[call-overload]
    horizon, end = 7 * DAY, START + 30 * DAY
    pairs = []
    for e, t in rows:
        ts = int(e["ts"])  # type: ignore[call-overload]
        if ts + horizon <= end:
            b = buys[t.user_id]
            i = bisect.bisect_right(b, ts)
            pairs.append((t.p_purchase, i < len(b) and b[i] <= ts + horizon))
    pairs.sort()
    n = len(pairs)
    assert all(0.0 <= p <= 1.0 for p, _ in pairs)
    deciles = [pairs[k * n // 10 : (k + 1) * n // 10] for k in range(10)]
    rates = [sum(y for _, y in d) / len(d) for d in deciles]
    means = [sum(p for p, _ in d) / len(d) for d in deciles]
    assert rates[9] - rates[0] > 0.5, rates
    assert max(abs(r - m) for r, m in zip(rates, means)) < 0.08, list(zip(means, rates))


def test_churn_truth_orders_users() -> None:
    cfg = SimConfig(users=400, seed=12, days=40, start_ms=START, churn_rate_per_day=0.03)
    rows = [(e, t) for e, t in simulate_with_truth(cfg) if t.p_churn > 0]  # session ends
    last_seen: dict[str, int] = {}
    for e, _ in simulate_with_truth(cfg):
        last_seen[str(e["user_id"])] = int(e["ts"])  # type: ignore[call-overload]
    horizon, end = 14 * DAY, START + 40 * DAY
    nexts: dict[str, list[int]] = defaultdict(list)
    for e, _ in simulate_with_truth(cfg):
        nexts[str(e["user_id"])].append(int(e["ts"]))  # type: ignore[call-overload]
    pairs = []
    for e, t in rows:
        ts = int(e["ts"])  # type: ignore[call-overload]
        if ts + horizon <= end:
            b = nexts[t.user_id]
            i = bisect.bisect_right(b, ts)
            pairs.append((t.p_churn, not (i < len(b) and b[i] <= ts + horizon)))
    pairs.sort()
    lo, hi = pairs[: len(pairs) // 4], pairs[-len(pairs) // 4 :]
    rate_lo, rate_hi = (sum(y for _, y in q) / len(q) for q in (lo, hi))
    mean_hi = sum(p for p, _ in hi) / len(hi)
    assert rate_hi > 3 * rate_lo, (rate_lo, rate_hi)
    assert abs(mean_hi - rate_hi) < 0.05, (mean_hi, rate_hi)


def test_truth_file_roundtrip(tmp_path: Path) -> None:
    rows = [t for _, t in simulate_with_truth(SimConfig(users=10, seed=1, days=2, start_ms=START))]
    assert write_truth(rows, tmp_path / "t.csv") == len(rows)
    back = read_truth(tmp_path / "t.csv")
    assert [(r.user_id, r.ts_ms) for r in back] == [(r.user_id, r.ts_ms) for r in rows]
    assert max(abs(a.p_purchase - b.p_purchase) for a, b in zip(back, rows)) < 1e-6


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_taobao_mapping_sorting_and_sessions(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "t.csv",
        "user_id,item_id,category_id,behavior,timestamp\n"
        "1,100,9,buy,1511600000\n"
        "1,100,9,pv,1511500000\n"
        "2,200,8,cart,1511500100\n"
        "1,101,9,fav,1511500600\n",
    )
    got = list(read_events(p, "taobao"))
    assert [(e["user_id"], e["type"], e["ts"]) for e in got] == [
        ("1", "product_view", 1511500000000),
        ("2", "add_to_cart", 1511500100000),
        ("1", "add_to_wishlist", 1511500600000),
        ("1", "purchase", 1511600000000),
    ]
    # 600 s apart: same session; 99,400 s later: a new one
    assert [e["session_id"] for e in got] == ["1-0", "2-0", "1-0", "1-1"]
    assert got[0]["event_id"] == "taobao-3" and got[0]["product_id"] == "100"


def test_rees46_and_retailrocket(tmp_path: Path) -> None:
    r = write(
        tmp_path,
        "r.csv",
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:05 UTC,purchase,7,55,electronics.phone,acme,99.50,42,sess-a\n"
        "2019-10-01 00:00:01 UTC,view,7,55,,acme,99.50,42,sess-a\n",
    )
    got = list(read_events(r, "rees46"))
    assert [(e["type"], e["ts"], e["category"]) for e in got] == [
        ("product_view", 1569888001000, "55"),
        ("purchase", 1569888005000, "electronics.phone"),
    ]
    assert got[1]["revenue"] == 99.5 and got[1]["session_id"] == "sess-a"
    rr = write(
        tmp_path,
        "rr.csv",
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433221332000,257597,transaction,355908,4000\n",
    )
    got = list(read_events(rr, "retailrocket"))
    assert [(e["type"], e["ts"], e.get("order_id")) for e in got] == [
        ("purchase", 1433221332000, "4000"),
        ("product_view", 1433221332117, None),
    ]


def test_errors_are_clear(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.csv", "user,item\n1,2\n")
    with pytest.raises(DatasetError, match="missing columns"):
        list(read_events(p, "taobao"))
    with pytest.raises(DatasetError, match="unknown format"):
        list(read_events(p, "parquet"))
    j = write(tmp_path, "e.jsonl", '{"ts": 5, "event_id": "b"}\nnot json\n{"ts": 1, "event_id": "a"}\n')
    got = list(read_events(j, "jsonl"))
    assert [e.get("event_id") for e in got] == ["a", "b", None]  # unparseable lines kept, last


def test_real_taobao_sample_maps_to_valid_events() -> None:
    path = SHARED_DATA / "taobao" / "user_behavior_sample.csv"
    if not path.exists():
        pytest.skip("../shared/data absent")
    reasons: Counter[str] = Counter()
    n = 0
    for e in read_events(path, "taobao"):
        n += 1
        try:
            parse(json.dumps(e).encode(), Rules(), 1_800_000_000_000)
        except Rejected as r:
            reasons[r.reason] += 1
    assert n == 59_263 and not reasons, reasons
