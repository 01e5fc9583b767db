"""Privacy at the edges: HMAC pseudonyms for user ids, and erasure of everything kept about a user.

With ``PROPSTREAM_PSEUDONYMIZE_KEY`` set, a user id is replaced at ingestion by
``HMAC-SHA256(key, id)`` (hex, 32 characters), before anything is stored, scored, logged or
published: tables, changelogs, change events and dead letters only ever hold the pseudonym. The
same id always gives the same pseudonym, so features still accumulate per user; without the key
nobody can turn a pseudonym back into the id. Lookups and erasure requests take the raw id and
pseudonymise it the same way.

Erasure: a message on ``users.erasure`` keyed by the user id (``propstream forget USER`` sends one)
deletes the user's features, score state and pending labels, which writes tombstones to their
changelogs, writes a tombstone for the user to the compacted ``propensity.changes`` topic, and
publishes a confirmation on ``users.erasure.done``. The request topic has the event topics'
partition count and key, so the request lands on the worker that owns the user's state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from pydantic import SecretStr

PSEUDONYM_CHARS = 32


class Pseudonymizer:
    """``user id -> pseudonym`` with the configured key, or the identity when no key is set."""

    def __init__(self, key: SecretStr | None) -> None:
        self._key = key.get_secret_value().encode() if key is not None else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __call__(self, user_id: str) -> str:
        """The stored id of ``user_id``.

        >>> Pseudonymizer(SecretStr("k"))("u1") == Pseudonymizer(SecretStr("k"))("u1") != "u1"
        True
        >>> Pseudonymizer(None)("u1")
        'u1'
        """
        if self._key is None:
            return user_id
        return hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_CHARS]


def erasure_request(user_id: str, request_id: str) -> bytes:
    return json.dumps(
        {"user_id": user_id, "request_id": request_id, "requested_ms": int(time.time() * 1000)}
    ).encode()


def parse_request(key: bytes | None, value: bytes | None) -> tuple[str, str] | None:
    """(user id, request id) of an erasure request, or None if it names no user."""
    body: dict[str, Any] = {}
    if value:
        try:
            loaded = json.loads(value)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            body = loaded
    user = body.get("user_id") or (key.decode("utf-8", "replace") if key else None)
    if not isinstance(user, str | int) or user == "":
        return None
    return str(user), str(body.get("request_id", ""))
