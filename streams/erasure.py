"""The erasure agent: one request on ``users.erasure`` removes a user from state and outbound topics.

Runs on the worker owning the user's partition (the request topic is keyed by user id with the
event topics' partition count), so the delete goes to the right RocksDB partition and changelog
partition. A user's features, score state and pending labels are one row (``streams/rows.py``):
deleting it writes one tombstone to the changelog; compaction then removes the old values from
Kafka too. See :mod:`streams.privacy` and ``docs/guarantees.md``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import faust

from streams.faults import Faults
from streams.outbox import Outbox
from streams.privacy import Pseudonymizer, parse_request
from streams.rows import SCORES, decode_row
from streams.settings import Settings

log = logging.getLogger(__name__)
PARTS = ("features", "scores", "ledger")  # the parts of a user's row, in order


def attach_erasure(
    app: faust.App,
    settings: Settings,
    table: Any,
    pseudonym: Pseudonymizer,
    faults: Faults,
    outbox: Outbox,
    erased: Callable[
        [str, int, bytes | None, int], list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]
    ],
) -> None:
    """Add the erasure agent over the per-user rows ``table`` (features, scores and ledger in one value).

    It deletes under the ingest batch's lock after a checkpoint (``streams/outbox.py``), so a row
    the outbox still holds cannot be written back after the tombstone. ``erased(user, partition,
    stored score state, now)`` takes the user out of the partition's audience figures and gives the
    tombstones of its audience keys (every one defined, and any the user was in)."""
    requests = app.topic(settings.topic_erasure, key_serializer="raw", value_serializer="raw")
    changes = app.topic(settings.topic_changes, key_serializer="raw", value_serializer="raw")
    triggers = app.topic(settings.topic_triggers, key_serializer="raw", value_serializer="raw")
    audiences = app.topic(settings.topic_audiences, key_serializer="raw", value_serializer="raw")
    done = app.topic(settings.topic_erasure_done, key_serializer="raw", value_serializer="raw")

    async def erase(stream: Any) -> None:
        async for event in stream.events():  # the current event routes the deletes to its partition
            msg = event.message
            parsed = parse_request(msg.key, msg.value)
            if parsed is None:
                faults.unreadable("erasure_request", "names no user: ignored", f"offset {msg.offset}")
                continue
            raw_id, request_id = parsed
            user = pseudonym(raw_id)
            async with outbox.lock:
                await outbox.release()  # a checkpoint: no held row can come back after the tombstone
                raw = table.get(user)
                removed = [n for n, part in zip(PARTS, decode_row(raw), strict=True) if part] if raw else []
                if raw is not None:
                    table.pop(user, None)  # one tombstone on the changelog: all three parts at once
                now_ms = int(time.time() * 1000)
                left = erased(user, msg.partition, decode_row(raw)[SCORES] if raw else None, now_ms)
            changes.send_soon(key=user.encode(), value=None)  # tombstones on the compacted outbound topics
            triggers.send_soon(key=user.encode(), value=None)
            for key, value, headers in left:  # the user's left events: tombstones on the audience topic
                audiences.send_soon(key=key, value=value, headers=headers)
            confirmation = {
                "request_id": request_id,
                "user_id": user,  # the pseudonym when pseudonymisation is on: never the raw id
                "removed": removed,
                "erased_ms": int(time.time() * 1000),
                "served_by": app.conf.canonical_url.human_repr(),
            }
            done.send_soon(key=user.encode(), value=json.dumps(confirmation).encode())

    app.agent(requests, name="erasure")(erase)
