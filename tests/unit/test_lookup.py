"""Scores as of an event time (streams/lookup.py): partitions, the as-of rule, scores, pages and cursors."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from features.contract import Event
from features.state import FeatureParams, UserState
from features.state import encode as encode_state
from features.user import compute, fold
from models.changes import ChangeRules
from models.ledger import Snapshot, UserLedger, make_target
from models.online import ModelConfig, OnlineModel, inputs
from models.scoring import ScoreState, ScoringCore, TargetModel, encode, input_names
from streams.faults import Faults
from streams.lookup import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    YIELD_EVERY,
    BadQuery,
    Lookups,
    PageQuery,
    as_of_for,
    decode_cursor,
    encode_cursor,
    page_query,
    partition_of,
    user_scores,
)
from streams.metrics import Metrics
from streams.rows import LEDGER, SCORES, PartKV, UserRows, encode_row
from streams.score_stage import MemoryKV

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY
PARAMS = FeatureParams()
TARGETS = (make_target("purchase", 7 * 86400), make_target("churn", 14 * 86400))


def model(seed: int, recency_weight: float) -> OnlineModel:
    """A model whose score depends on recency (weight ``recency_weight`` on log seconds since the last event)."""
    rng = random.Random(seed)
    m = OnlineModel(ModelConfig(optimizer="sgd", learning_rate=0.05))
    for _ in range(400):
        x = {k: rng.uniform(0, 3) for k in input_names()}
        z = x["n_page_view_24h"] + recency_weight * x["s_since_last_event"] - 0.5
        m.learn(x, int(z + rng.gauss(0, 0.5) > 0))
    return m


PURCHASE, CHURN = model(1, -1.0), model(2, 1.0)


def core() -> ScoringCore:
    models = {"purchase": TargetModel(PURCHASE, 5, 0, 0), "churn": TargetModel(CHURN, 7, 0, 0)}
    return ScoringCore(TARGETS, PARAMS, ChangeRules(), models)


def state(user: str, n: int, start_ms: int) -> UserState:
    evs = [
        Event(event_id=f"{user}-{i}", user_id=user, type="page_view", ts_ms=start_ms + i * MIN)
        for i in range(n)
    ]
    return fold(evs, PARAMS)


def lookups(rows: UserRows, clock: dict[int, int] | None = None) -> tuple[Lookups, Metrics]:
    metrics = Metrics()
    clocks = clock or {}
    return Lookups(core(), rows, lambda p: clocks.get(p, 0), Faults(metrics)), metrics


def scores_of(
    rows: UserRows, key: str, st: UserState, as_of_ms: int, metrics: Metrics | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """One stored user's features and detailed scores, as a lookup computes them."""
    faults = Faults(metrics or Metrics())
    return user_scores(core(), PartKV(rows, SCORES), PartKV(rows, LEDGER), faults, key, st, as_of_ms)


def tier(score: float) -> str:
    """The documented tiers without an announced one: low < 0.2 <= medium < 0.5 <= high."""
    return "low" if score < 0.2 else "medium" if score < 0.5 else "high"


# --- partitions ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "partition"),
    # the Java client's partitions of these keys over 1,000 partitions (Kafka's own test vectors)
    [("", 681), ("a", 524), ("ab", 434), ("abc", 107), ("123456789", 566), ("\x00 ", 742)],
)
def test_partition_of_is_the_java_clients_default_partitioner(key: str, partition: int) -> None:
    assert partition_of(key, 1000) == partition


def test_partition_of_agrees_with_kafka_python_for_any_id() -> None:
    rng = random.Random(3)
    alphabet = "abcxyz0189-_.@ éü中🙂"
    for _ in range(2000):
        user = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        n = rng.choice((1, 2, 4, 7, 12, 64))
        assert partition_of(user, n) == (kafka_python_murmur2(user.encode()) & 0x7FFFFFFF) % n, user


# --- the as-of rule --------------------------------------------------------------------------
def test_as_of_defaults_to_the_partition_clock_and_never_precedes_the_last_event() -> None:
    last = T0 + 10 * HOUR + 2 * MIN
    clock = last + 5 * DAY
    assert as_of_for(2, clock, None, last) == (2, clock, None, clock)
    assert as_of_for(2, clock, last - DAY, last) == (2, clock, last - DAY, last)  # before: its last event
    assert as_of_for(2, clock, last + 9 * DAY, last) == (2, clock, last + 9 * DAY, last + 9 * DAY)
    assert as_of_for(2, 0, None, last) == (2, 0, None, last)  # the partition's clock is not known yet


# --- scores ----------------------------------------------------------------------------------
def test_scores_as_of_a_later_time_count_the_silence() -> None:
    st = state("u", 3, T0 + 10 * HOUR)
    last = st.last_ms
    rows = UserRows(MemoryKV())
    feats, scores = scores_of(rows, "u", st, last + 5 * DAY)
    assert feats["s_since_last_event"] == 5 * 86400  # hand-worked: five silent days
    assert feats["n_page_view_24h"] == 0 and feats["n_page_view_7d"] == 3
    x = inputs(compute(st, last + 5 * DAY, PARAMS))
    for name, m, version in (("purchase", PURCHASE, 5), ("churn", CHURN, 7)):
        want = m.score(x)
        s = scores[name]
        assert s["score"] == pytest.approx(want, abs=1e-6), name
        assert (s["tier"], s["model_version"], s["warming_up"]) == (tier(want), version, False)
        assert s["pending_snapshots"] == 0 and s["announced_score"] is None
        assert len(s["top_factors"]) == 5
    _, then = scores_of(rows, "u", st, last)
    # recency moves the scores: purchase falls with silence, churn rises
    assert scores["purchase"]["score"] < then["purchase"]["score"] - 0.05
    assert scores["churn"]["score"] > then["churn"]["score"] + 0.05


def test_scores_report_pending_snapshots_and_a_corrupt_ledger_is_counted() -> None:
    backend = MemoryKV()
    rows = UserRows(backend)
    st = state("u", 2, T0)
    ledger = UserLedger(pending={"purchase": [Snapshot.of(T0, [], 0.3, 5)] * 2})
    backend.set("u", encode_row([encode_state(st), encode(ScoreState()), encode(ledger)]))
    backend.set("v", encode_row([encode_state(st), b"\xc1", b"\xc1"]))
    metrics = Metrics()
    assert scores_of(rows, "u", st, st.last_ms, metrics)[1]["purchase"]["pending_snapshots"] == 2
    assert scores_of(rows, "u", st, st.last_ms, metrics)[1]["churn"]["pending_snapshots"] == 0
    assert scores_of(rows, "v", st, st.last_ms, metrics)[1]["purchase"]["pending_snapshots"] == 0
    assert metrics.decode_errors.labels("ledger")._value.get() == 1
    assert metrics.decode_errors.labels("scores")._value.get() == 1


# --- pages -----------------------------------------------------------------------------------
def page_query_of(**query: str) -> PageQuery:
    return page_query(query, partitions=4)


def test_page_query_validates_every_parameter() -> None:
    assert page_query_of(partition="3") == PageQuery(3, None, DEFAULT_LIMIT)
    assert page_query_of(partition="0", limit=str(MAX_LIMIT), after=encode_cursor("k")) == PageQuery(
        0, "k", MAX_LIMIT
    )
    bad = [
        ({}, "bad_partition"),
        ({"partition": "4"}, "bad_partition"),
        ({"partition": "-1"}, "bad_partition"),
        ({"partition": "x"}, "bad_partition"),
        ({"partition": "\u00b2"}, "bad_partition"),
        ({"partition": "0", "limit": "0"}, "bad_limit"),
        ({"partition": "0", "limit": str(MAX_LIMIT + 1)}, "bad_limit"),
        ({"partition": "0", "limit": "ten"}, "bad_limit"),
        ({"partition": "0", "after": "not base64!"}, "bad_cursor"),
        ({"partition": "0", "after": "_w"}, "bad_cursor"),  # decodes to b"\xff": no UTF-8 key
    ]
    for query, code in bad:
        with pytest.raises(BadQuery) as err:
            page_query_of(**query)
        assert err.value.code == code, query


@pytest.mark.parametrize("key", ["u1", "a&b=c/d+e%f", "ü-中-🙂", "x" * 256])
def test_cursor_round_trips_any_key_and_is_url_safe(key: str) -> None:
    cursor = encode_cursor(key)
    assert decode_cursor(cursor) == key
    assert all(c.isalnum() or c in "-_" for c in cursor)


def filled(n_good: int) -> tuple[MemoryKV, dict[str, UserState]]:
    """A table with ``n_good`` readable users, two unreadable ones and one row without features."""
    backend = MemoryKV()
    states = {}
    for i in range(n_good):
        user = f"user-{i:03d}"
        st = states[user] = state(user, 1 + i % 4, T0 + i * HOUR)
        backend.set(user, encode_row([encode_state(st), b"", b""]))
    backend.set("user-000x", encode_row([b"\xc1", b"", b""]))  # garbage
    backend.set("user-010x", encode_row([encode_state(UserState(v=999)), b"", b""]))  # another layout
    backend.set("user-020x", encode_row([b"", encode(ScoreState()), b""]))  # no features: not a user
    return backend, states


def export(look: Lookups, limit: int, as_of_ms: int | None) -> tuple[list[dict[str, Any]], int, int]:
    """Every page of partition 0, following the cursors: the users, the corrupt count, the pages."""
    users: list[dict[str, Any]] = []
    corrupt = pages = 0
    after = None
    while True:
        page = asyncio.run(look.page(PageQuery(0, after, limit), as_of_ms))
        pages += 1
        users += page["users"]
        corrupt += page["corrupt"]
        if page["next"] is None:
            return users, corrupt, pages
        after = decode_cursor(page["next"])


@pytest.mark.parametrize("limit", [1, 2, 5, 25, 26, 500])
def test_pages_cover_every_readable_user_once_in_key_order(limit: int) -> None:
    backend, states = filled(23)
    look, metrics = lookups(UserRows(backend), {0: T0 + 40 * DAY})
    users, corrupt, pages = export(look, limit, None)
    assert [u["user_id"] for u in users] == sorted(states)
    assert corrupt == 2 and metrics.decode_errors.labels("features")._value.get() == 2
    assert pages == 26 // limit + 1  # 26 rows; the page after the last full one says "no more"
    for u in users:
        st = states[u["user_id"]]
        assert (u["as_of_ms"], u["last_event_ms"]) == (T0 + 40 * DAY, st.last_ms)
        want = PURCHASE.score(inputs(compute(st, T0 + 40 * DAY, PARAMS)))
        assert u["scores"]["purchase"]["score"] == pytest.approx(want, abs=1e-6)
        assert set(u["scores"]["purchase"]) >= {"score", "tier", "warming_up", "model_version"}
        assert "top_factors" not in u["scores"]["purchase"]  # the export does not explain


def test_a_page_as_of_before_a_users_last_event_answers_as_of_that_event() -> None:
    backend, states = filled(5)
    look, _ = lookups(UserRows(backend))
    cut = T0 + 2 * HOUR + 30 * MIN  # users 0..2 were last seen before it, users 3 and 4 after
    page = asyncio.run(look.page(PageQuery(0, None, 100), cut))
    assert page["as_of_ms"] == cut
    got = {u["user_id"]: u["as_of_ms"] for u in page["users"]}
    assert got == {u: max(cut, st.last_ms) for u, st in states.items()}
    # hand-worked: user-003 has four events a minute apart from T0 + 3h, user-002 three from T0 + 2h
    assert (got["user-003"], got["user-002"]) == (T0 + 3 * HOUR + 3 * MIN, cut)


def test_a_page_defaults_to_the_partition_clock_and_says_which() -> None:
    backend, _ = filled(3)
    look, _ = lookups(UserRows(backend), {0: T0 + 9 * DAY})
    page = asyncio.run(look.page(PageQuery(0, None, 10), None))
    assert (page["as_of_ms"], page["clock_ms"]) == (T0 + 9 * DAY, T0 + 9 * DAY)
    assert {u["as_of_ms"] for u in page["users"]} == {T0 + 9 * DAY}


def test_a_large_page_hands_the_event_loop_back_while_scoring() -> None:
    backend, _ = filled(1000)
    look, _ = lookups(UserRows(backend), {0: T0 + 50 * DAY})
    ticks = 0

    async def other_work() -> None:  # another task of the worker's loop (the ingest agent, say)
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def both() -> tuple[dict[str, Any], int]:
        task = asyncio.ensure_future(other_work())
        await asyncio.sleep(0)
        start = ticks
        page = await look.page(PageQuery(0, None, 1003), None)
        task.cancel()
        return page, ticks - start

    page, ran = asyncio.run(both())
    assert len(page["users"]) == 1000
    assert ran >= 1003 // YIELD_EVERY  # the other task ran between every slice of users


# --- ScoreStage.current: the same per-target dict, as of the user's last event ---------------
def test_score_stage_current_scores_as_of_the_last_event() -> None:
    from streams.model_metrics import ModelMetrics
    from streams.score_stage import ScoreStage

    backend = MemoryKV()
    rows = UserRows(backend)
    st = state("u", 3, T0)
    backend.set("u", encode_row([encode_state(st), b"", b""]))
    c = core()
    stage = ScoreStage(
        c,
        PartKV(rows, SCORES),
        PartKV(rows, LEDGER),
        lambda *a: None,
        lambda *a: None,
        ModelMetrics(Metrics().registry),
    )
    x = inputs(compute(st, st.last_ms, PARAMS))
    assert stage.current("u", st)["purchase"]["score"] == pytest.approx(PURCHASE.score(x), abs=1e-6)


# --- the export client (streams/cli_score.py) ------------------------------------------------
class FakeCluster:
    """Workers answering /partitions and /scores from real :class:`Lookups` over in-memory tables.

    ``moves``: after this many answered pages, partition ``p`` moves from its owner to the other
    worker, whose next answers the old owner refuses with a 409 naming the new one.
    """

    def __init__(
        self, tables: dict[int, MemoryKV], clock_ms: int, moves: dict[int, int] | None = None
    ) -> None:
        self.looks = {p: lookups(UserRows(kv), {0: clock_ms + p})[0] for p, kv in tables.items()}
        self.owners = {p: ("http://a:1" if p % 2 else "http://b:2") for p in tables}
        self.moves = moves or {}
        self.pages = 0
        self.refused = 0
        self.as_of_seen: dict[int, list[str | None]] = {p: [] for p in tables}
        self.lock = __import__("threading").Lock()

    def get(self, url: str) -> tuple[int, dict[str, Any]]:
        from urllib.parse import parse_qsl, urlsplit

        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        query = dict(parse_qsl(parts.query))
        if parts.path == "/partitions":
            owners = {str(p): u for p, u in self.owners.items()}
            return 200, {"partitions": len(self.owners), "targets": ["purchase", "churn"], "owners": owners}
        q = page_query(query, len(self.owners))
        with self.lock:
            if base != self.owners[q.partition]:
                self.refused += 1
                return 409, {"error": "not_owner", "message": "moved", "owner": self.owners[q.partition]}
            self.pages += 1
            for p, after in self.moves.items():
                if self.pages == after:
                    self.owners[p] = "http://a:1" if self.owners[p] == "http://b:2" else "http://b:2"
            self.as_of_seen[q.partition].append(query.get("as_of"))
        as_of = int(query["as_of"]) if "as_of" in query else None
        # the table keys of partition p are all in partition p here: page with partition 0's scan
        page = asyncio.run(self.looks[q.partition].page(PageQuery(0, q.after, q.limit), as_of))
        page["partition"] = q.partition
        return 200, page


def cluster_tables(n_partitions: int, per: int) -> tuple[dict[int, MemoryKV], list[str]]:
    tables, everyone = {}, []
    for p in range(n_partitions):
        kv, states = filled(per)
        for user in list(states):  # distinct ids per partition
            kv.data[f"p{p}-{user}"] = kv.data.pop(user)
            everyone.append(f"p{p}-{user}")
        tables[p] = kv
    return tables, everyone


def run_export(cluster: FakeCluster, fmt: str, as_of: str | None, page_size: int) -> tuple[str, Any]:
    import io

    from streams.cli_score import Exporter, Reporter, export

    out, err = io.StringIO(), io.StringIO()
    stats = export(
        Exporter(cluster.get, "http://b:2", wait_s=5), out, fmt, as_of, page_size, Reporter(out=err)
    )
    return out.getvalue(), (stats, err.getvalue())


def test_export_writes_every_user_once_while_a_partition_moves() -> None:
    import csv
    import io

    tables, everyone = cluster_tables(4, 23)
    cluster = FakeCluster(tables, T0 + 30 * DAY, moves={2: 3, 3: 5})
    text, (stats, err) = run_export(cluster, "csv", None, 4)
    header, *rows = list(csv.reader(io.StringIO(text)))
    assert header == ["user_id", "purchase", "churn"]
    assert sorted(r[0] for r in rows) == sorted(everyone) and len(rows) == len(everyone)
    assert stats.users == 4 * 23 and stats.corrupt == 4 * 2 and stats.partitions_done == 4
    assert "92 users written, 4/4 partitions done" in err and "8 unreadable rows skipped" in err
    for p, seen in cluster.as_of_seen.items():
        # the first page asks for the clock, every later one for the time the first page used
        assert seen[0] is None and set(seen[1:]) == {str(T0 + 30 * DAY + p)}, (p, seen)
    assert (cluster.owners[2], cluster.owners[3]) == ("http://a:1", "http://b:2")  # they moved
    assert cluster.refused == 2  # and each was refused once by its old owner, then followed


def test_export_as_of_a_time_writes_json_lines() -> None:
    tables, everyone = cluster_tables(2, 6)
    cluster = FakeCluster(tables, T0 + 30 * DAY)
    text, _ = run_export(cluster, "jsonl", str(T0 + 31 * DAY), 500)
    lines = [__import__("json").loads(line) for line in text.splitlines()]
    assert sorted(d["user_id"] for d in lines) == sorted(everyone)
    for d in lines:
        assert d["as_of_ms"] == T0 + 31 * DAY
        assert set(d["scores"]) == {"purchase", "churn"}
        assert set(d["scores"]["churn"]) == {"score", "tier", "warming_up", "model_version"}
        assert d["scores"]["churn"]["model_version"] == 7
    assert {s for seen in cluster.as_of_seen.values() for s in seen} == {str(T0 + 31 * DAY)}


def test_export_stops_on_a_refused_request_and_after_the_wait_for_an_owner() -> None:
    from streams.cli_score import Exporter, ExportError

    def refusing(url: str) -> tuple[int, dict[str, Any]]:
        if url.endswith("/partitions"):
            return 200, {
                "partitions": 2,
                "targets": ["purchase"],
                "owners": {"0": "http://a:1", "1": "http://a:1"},
            }
        return 400, {"error": "bad_as_of", "message": "as_of must be epoch ms or ISO-8601 with offset"}

    with pytest.raises(ExportError, match="bad_as_of: as_of must be"):
        Exporter(refusing, "http://a:1", wait_s=1).run(lambda u: None, "yesterday", None)

    def away(url: str) -> tuple[int, dict[str, Any]]:
        if url.endswith("/partitions"):
            return 200, {"partitions": 1, "targets": ["purchase"], "owners": {"0": "http://a:1"}}
        return 0, {"error": "unreachable", "message": "ConnectionRefusedError"}

    with pytest.raises(ExportError, match="no owner answered within 1s"):
        Exporter(away, "http://a:1", wait_s=1).run(lambda u: None, None, None)


def test_csv_writer_quotes_ids_and_keeps_target_order() -> None:
    import csv
    import io

    from streams.cli_score import Writer

    out = io.StringIO()
    w = Writer(out, "csv", ["churn", "purchase"])
    entry = {"score": 0.25, "tier": "medium", "warming_up": False, "model_version": 3}
    w.write(
        {"user_id": 'a,"b"', "as_of_ms": 1, "scores": {"purchase": {**entry, "score": 0.125}, "churn": entry}}
    )
    w.write(
        {"user_id": "ü", "as_of_ms": 1, "scores": {"purchase": entry, "churn": {**entry, "score": 1e-06}}}
    )
    assert out.getvalue().splitlines()[:2] == ["user_id,churn,purchase", '"a,""b""",0.25,0.125']
    assert list(csv.reader(io.StringIO(out.getvalue()))) == [
        ["user_id", "churn", "purchase"],
        ['a,"b"', "0.25", "0.125"],
        ["ü", "1e-06", "0.25"],
    ]
    assert w.rows == 2


def test_page_size_help_states_the_workers_limits() -> None:
    from streams.cli_score import PAGE_SIZE_HELP

    assert f"1..{MAX_LIMIT}" in PAGE_SIZE_HELP and f"{DEFAULT_LIMIT}" in PAGE_SIZE_HELP
