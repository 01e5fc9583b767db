"""Scores as of an event time: the one place the lookups and ``propstream score`` compute them.

A user's features and scores are functions of the stored state and an as-of time only, so a user
silent for five days shows five days of recency and the score that implies. By default that time
is the event-time clock of the user's partition (the newest event time the partition has seen),
not the user's last event, which made every user look "just active". An as-of before the user's
last event is answered as of that event (the state holds no earlier view), and the answer says
what was asked (``requested_as_of_ms``) beside what was used (``as_of_ms``).

Pages (``GET /scores``) walk one partition of the local RocksDB in key order, a bounded number of
rows per request, with an opaque cursor: the raw rows are read at once, then scored in slices with
the event loop handed back between them, so a page never holds the ingest agent up for long.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from aiokafka.partitioner import murmur2

from features.state import Corrupt, UserState, decode
from features.user import FeatureValue
from models.changes import TIERS, tier_of
from models.fastscore import FastScorer
from models.scoring import LazyLedger, ScoreState, ScoringCore, decode_state, top_factors
from streams.faults import Faults
from streams.rows import FEATURES, SCORES, UserRows, decode_row

if TYPE_CHECKING:
    from streams.score_stage import KV

DEFAULT_LIMIT = 500  # users per page: about 75 ms of scoring on the 2-core dev machine
MAX_LIMIT = 5000
YIELD_EVERY = 100  # users scored between two returns to the event loop (about 15 ms)


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of a user's events and row: Kafka's default partitioner over the UTF-8 id.

    Producers key events by the raw user id, and the features table (its changelog and local files)
    uses the same partition numbers as the source topics, so this is the partition whose clock
    and owner a lookup of ``user_id`` needs (Faust's router hashes the same bytes the same way).

    >>> partition_of("abc", 1000)
    107
    """
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


_scorers = threading.local()


def target_scores(
    core: ScoringCore,
    st: UserState,
    ss: ScoreState,
    as_of_ms: int,
    pending: Mapping[str, Sized] | None = None,
) -> tuple[dict[str, FeatureValue], dict[str, dict[str, Any]]]:
    """Features as of ``as_of_ms`` and, per target, what the live model makes of them.

    Every entry has score, tier (with hysteresis from the tier last announced), warming-up flag and
    model version: what the export writes. Given the user's ``pending`` snapshots (a lookup of one
    user), it adds horizon, the score last announced, pending snapshots, top factors and trust.
    """
    feats, x = core.score_all(st, as_of_ms)
    out: dict[str, dict[str, Any]] = {}
    live = [core.models[t.name] for t in core.targets]
    # the worker's own arithmetic (models/fastscore.py), so a lookup shows the float a change event
    # carries; one scorer per thread: lookups run on the read server's, batches on the loop's
    scorer = getattr(_scorers, "fast", None)
    if scorer is None:
        scorer = _scorers.fast = FastScorer()
    scores = scorer.scores([m.model for m in live], x)
    for t, m, score in zip(core.targets, live, scores, strict=True):
        ts = ss.targets.get(t.name)
        last = ts.announced if ts else None
        entry: dict[str, Any] = {
            "score": round(score, 6),
            "tier": TIERS[tier_of(score, last.tier if last else None, core.rules_of(t.name))],
            "warming_up": m.warming_up,
            "model_version": m.version,
        }
        if t.value:  # the score is an amount: say in what
            entry["currency"] = core.currency
        if pending is not None:
            entry["horizon_s"] = t.horizon_ms // 1000
            entry["announced_score"] = round(last.score, 6) if last else None
            entry["pending_snapshots"] = len(pending.get(t.name, ()))
            entry["top_factors"] = top_factors(m.model, x, feats, {}, core.top_k)
            entry["trust"] = m.trust.as_dict()  # trusted, and why (label counts, then the trust gate)
        out[t.name] = entry
    return feats, out


def read_scores(raw: bytes | None, faults: Faults, key: str) -> ScoreState:
    """The stored score state; an unreadable one is counted and read as fresh (no tier announced)."""
    try:
        return decode_state(raw)
    except Corrupt as exc:
        faults.corrupt(exc, key)
        return ScoreState()


def user_scores(
    core: ScoringCore, scores: KV, ledgers: KV, faults: Faults, key: str, st: UserState, as_of_ms: int
) -> tuple[dict[str, FeatureValue], dict[str, dict[str, Any]]]:
    """:func:`target_scores` of the stored user ``key`` with its score state and pending snapshots."""
    return scores_of_parts(core, faults, key, st, as_of_ms, scores.get(key), ledgers.get(key))


def scores_of_parts(
    core: ScoringCore,
    faults: Faults,
    key: str,
    st: UserState,
    as_of_ms: int,
    scores_raw: bytes | None,
    ledger_raw: bytes | None,
) -> tuple[dict[str, FeatureValue], dict[str, dict[str, Any]]]:
    """:func:`user_scores` from the stored parts of the user's row, already read."""
    ss = read_scores(scores_raw, faults, key)
    pending = LazyLedger(lambda: ledger_raw, lambda exc: faults.corrupt(exc, key)).get().pending
    return target_scores(core, st, ss, as_of_ms, pending)


# --- pages -----------------------------------------------------------------------------------
class BadQuery(ValueError):
    """A page request that cannot be answered: ``code`` is the JSON error, the message says why."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PageQuery:
    partition: int
    after: str | None  # the last key of the previous page (decoded cursor); None: from the start
    limit: int


def encode_cursor(key: str) -> str:
    """An opaque, URL-safe cursor for the last key of a page.

    >>> encode_cursor("u-1"), decode_cursor(encode_cursor("a&b"))
    ('dS0x', 'a&b')
    """
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The key a cursor stands for; ``ValueError`` for anything :func:`encode_cursor` did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = raw.decode()
    except (binascii.Error, UnicodeError, ValueError):
        msg = "not a cursor this API returned"
        raise ValueError(msg) from None
    if encode_cursor(key) != cursor:  # base64 tolerates stray characters; a cursor has none
        msg = "not a cursor this API returned"
        raise ValueError(msg)
    return key


def _whole(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


def page_query(query: Mapping[str, str], partitions: int) -> PageQuery:
    """``partition`` (required), ``after`` (a cursor) and ``limit`` of ``GET /scores``, checked.

    >>> page_query({"partition": "2", "limit": "10"}, partitions=4)
    PageQuery(partition=2, after=None, limit=10)
    """
    p = _whole(query.get("partition", ""))
    if p is None or p >= partitions:
        msg = f"partition must be a whole number in 0..{partitions - 1}"
        raise BadQuery(msg, code="bad_partition")
    limit = _whole(query.get("limit", str(DEFAULT_LIMIT)))
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        msg = f"limit must be a whole number in 1..{MAX_LIMIT}"
        raise BadQuery(msg, code="bad_limit")
    after = query.get("after")
    if after is not None:
        try:
            after = decode_cursor(after)
        except ValueError as exc:
            msg = f"after: {exc}"
            raise BadQuery(msg, code="bad_cursor") from None
    return PageQuery(p, after, limit)


# --- one worker's lookups --------------------------------------------------------------------
class AsOf(NamedTuple):
    partition: int
    clock_ms: int  # the partition's event-time clock (0: not known on this worker yet)
    requested_ms: int | None  # what the request asked for; None: the clock
    as_of_ms: int  # what features and scores are computed at


def as_of_for(partition: int, clock_ms: int, requested_ms: int | None, last_ms: int) -> AsOf:
    """The time to answer a user at: what was asked (default: the clock), never before its last event.

    >>> as_of_for(3, 500, None, 200).as_of_ms, as_of_for(3, 500, 100, 200).as_of_ms
    (500, 200)
    """
    wanted = clock_ms if requested_ms is None else requested_ms
    return AsOf(partition, clock_ms, requested_ms, max(wanted, last_ms))


class Lookups:
    """Pages of a partition's users with their scores as of an event time (one user's answer is
    ``streams/user_api.py``'s)."""

    def __init__(
        self,
        core: ScoringCore,
        rows: UserRows,
        clock: Callable[[int], int],
        faults: Faults,
    ) -> None:
        self.core = core
        self.rows = rows
        self.clock = clock
        self.faults = faults

    async def page(self, q: PageQuery, as_of_ms: int | None, audience: str | None = None) -> dict[str, Any]:
        """Up to ``q.limit`` users of ``q.partition`` after ``q.after``, scored as of ``as_of_ms``
        (None: the partition's clock), each no earlier than its last event; given ``audience``,
        only its members (``GET /audiences/{name}``).

        Rows without features are not users and unreadable ones are counted and skipped; both,
        and non-members, still move the cursor, so a page can hold fewer users than ``limit``
        and more follow.
        """
        clock = self.clock(q.partition)
        at = clock if as_of_ms is None else as_of_ms
        rows = list(islice(self.rows.backend.scan(q.partition, q.after), q.limit))
        users: list[dict[str, Any]] = []
        corrupt = 0
        for i, (key, raw) in enumerate(rows):
            if i and i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            parts = decode_row(raw)
            if not parts[FEATURES]:
                continue
            ss = read_scores(parts[SCORES] or None, self.faults, key)
            if audience is not None and audience not in ss.audiences:
                continue  # most rows of an audience page: no features decoded
            try:
                st = decode(parts[FEATURES])
            except Corrupt as exc:
                self.faults.corrupt(exc, key)
                corrupt += 1
                continue
            when = max(at, st.last_ms)
            _, scores = target_scores(self.core, st, ss, when)
            users.append({"user_id": key, "as_of_ms": when, "last_event_ms": st.last_ms, "scores": scores})
        full = len(rows) == q.limit
        return {
            "partition": q.partition,
            "as_of_ms": at,
            "clock_ms": clock,
            "users": users,
            "corrupt": corrupt,
            "next": encode_cursor(rows[-1][0]) if full else None,
        }


class MarkReader(Protocol):
    def get_mark(self, topic: str, partition: int) -> int | None: ...


class PartitionClock:
    """A partition's event-time clock: the newest event time on any of its source topics.

    The ingest handler's in-memory watermarks move with every batch but start empty after a
    restart until the partition's next event; the persisted watermarks cover that gap, so a
    quiet cluster still scores as of the last time it saw.
    """

    def __init__(self, live: Callable[[int], int], stored: MarkReader, topics: Iterable[str]) -> None:
        self.live = live
        self.stored = stored
        self.topics = tuple(topics)

    def __call__(self, partition: int) -> int:
        return max([self.live(partition), *self._stored(partition)])

    def _stored(self, partition: int) -> Iterator[int]:
        for topic in self.topics:
            try:
                ts = self.stored.get_mark(topic, partition)
            except Corrupt:
                continue  # counted by the handler when it loads the mark; not once per lookup
            if ts is not None:
                yield ts
