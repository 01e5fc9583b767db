"""The answer to ``GET /users/{id}`` and ``GET /users/{id}/features``, wherever it is served.

The worker answers a user it owns on its read thread (``streams/read_server.py``), beside the event
loop, and anything else through Faust's web views on the loop. Both build the same body here, from
one read of the user's row and the partition's event-time clock; only how they read differs.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any, NamedTuple

from features.catalogue import NAMES
from features.contract import MAX_ID_LEN, parse_time_ms
from features.state import Corrupt, FeatureParams, decode
from features.user import compute
from models.scoring import ScoringCore, decode_state
from streams.faults import Faults
from streams.lookup import AsOf, as_of_for, partition_of, scores_of_parts
from streams.privacy import Pseudonymizer
from streams.rows import FEATURES, LEDGER, SCORES, decode_row

BAD_AS_OF = "as_of must be epoch ms or ISO-8601 with offset"


class Answer(NamedTuple):
    status: int
    body: dict[str, Any]


def error(status: int, code: str, message: str) -> Answer:
    return Answer(status, {"error": code, "message": message})


def parse_as_of(arg: str) -> int | None:
    """Epoch ms (ASCII digits only) or ISO-8601 with an offset; None for anything else.

    >>> parse_as_of("1764547200000"), parse_as_of("2025-12-01T00:00:00Z"), parse_as_of("\u00b2")
    (1764547200000, 1764547200000, None)
    """
    if arg.isascii() and arg.isdigit():
        return parse_time_ms(int(arg))
    return parse_time_ms(arg)


def as_of_query(arg: str | None) -> tuple[bool, int | None]:
    """The ``as_of`` query value: (True, epoch ms or None for the partition's clock), or (False,
    None) when it is not a time (answered ``400 bad_as_of``, :data:`BAD_AS_OF`).

    >>> as_of_query(None), as_of_query("1764547200000"), as_of_query("yesterday")
    ((True, None), (True, 1764547200000), (False, None))
    """
    if arg is None:
        return True, None
    ms = parse_as_of(arg)
    return ms is not None, ms


def token_refused(expected: str | None, authorization: str) -> Answer | None:
    """The 401 to answer when a token is configured and the ``Authorization`` header lacks it.

    >>> token_refused(None, ""), token_refused("s3", "Bearer s3"), token_refused("s3", "").status
    (None, None, 401)
    """
    if expected is not None and authorization != f"Bearer {expected}":
        return error(401, "unauthorized", "missing or wrong bearer token")
    return None


def refused(expected_token: str | None, authorization: str, user_id: str) -> Answer | None:
    """What any worker answers a single-user request before reading or routing it: the token
    first (401), then the id (400: the router hashes it as UTF-8); None: go on."""
    denied = token_refused(expected_token, authorization)
    if denied is not None:
        return denied
    problem = user_id_problem(user_id)
    return None if problem is None else error(400, "bad_user_id", problem)


def user_id_problem(user_id: str) -> str | None:
    """Why a user id in a URL cannot name a user, or None.

    >>> user_id_problem("u-1842"), user_id_problem("a\\nb")
    (None, 'user id contains control characters')
    """
    if not 1 <= len(user_id) <= MAX_ID_LEN:
        return f"user id must have 1..{MAX_ID_LEN} characters"
    try:
        user_id.encode()
    except UnicodeEncodeError:
        return "user id is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in user_id):
        return "user id contains control characters"
    return None


def as_of_fields(when: AsOf) -> dict[str, int | None]:
    """When a lookup was answered for: ``as_of_ms`` is the time used, ``requested_as_of_ms`` the one
    asked for (None: the clock), ``clock_ms`` the partition's clock, ``partition`` the user's."""
    return {
        "partition": when.partition,
        "clock_ms": when.clock_ms,
        "requested_as_of_ms": when.requested_ms,
        "as_of_ms": when.as_of_ms,
    }


ReadRow = Callable[[str, int], bytes | None]  # (stored key, partition) -> the user's row
Clock = Callable[[int], int]  # partition -> its event-time clock


class UserAnswers:
    """Features, and unless ``features_only`` the scores per target, of one user as of a time."""

    def __init__(
        self,
        core: ScoringCore,
        params: FeatureParams,
        pseudonym: Pseudonymizer,
        faults: Faults,
        partitions: int,
        served_by: str,
    ) -> None:
        self.core = core
        self.params = params
        self.pseudonym = pseudonym
        self.faults = faults
        self.partitions = partitions
        self.served_by = served_by

    def answer(
        self, user_id: str, as_of: str | None, read_row: ReadRow, clock: Clock, *, features_only: bool = False
    ) -> Answer:
        """The body for a checked ``user_id`` (token and id already judged by the caller).

        ``as_of`` is the query's raw value (None: the partition's clock); a bad one is a 400
        whoever owns the user, before the user is read.
        """
        ok, requested = as_of_query(as_of)
        if not ok:
            return error(400, "bad_as_of", BAD_AS_OF)
        key = self.pseudonym(user_id)
        p = partition_of(user_id, self.partitions)
        parts = decode_row(read_row(key, p))
        if not parts[FEATURES]:
            return error(404, "unknown_user", f"no features for user {user_id!r} on this cluster")
        try:
            st = decode(parts[FEATURES])
        except Corrupt as exc:
            self.faults.corrupt(exc, key)
            detail = "this user's stored features are unreadable; their next event starts them afresh"
            return error(500, "corrupt_state", detail)
        when = as_of_for(p, clock(p), requested, st.last_ms)
        body: dict[str, Any] = {
            "user_id": user_id,
            "served_by": self.served_by,
            **as_of_fields(when),
            "last_event_ms": st.last_ms,
            "events": st.events,
        }
        if features_only:
            feats = compute(st, when.as_of_ms, self.params)
            body["features"] = {k: feats[k] for k in NAMES}
            return Answer(200, body)
        feats, scores = scores_of_parts(
            self.core, self.faults, key, st, when.as_of_ms, parts[SCORES] or None, parts[LEDGER] or None
        )
        body["features"] = {k: feats[k] for k in NAMES}
        body["scores"] = scores
        body["audiences"] = memberships(parts[SCORES])
        return Answer(200, body)


def memberships(scores_raw: bytes) -> list[str]:
    """The audiences the user is in, as of its last event or silence point (unreadable: none;
    the score lookup beside it counts the fault)."""
    try:
        return decode_state(scores_raw or None).audiences
    except Corrupt:
        return []
