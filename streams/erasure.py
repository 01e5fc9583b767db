"""The erasure agent: one request on ``users.erasure`` removes a user from state and outbound topics.

Runs on the worker owning the user's partition (the request topic is keyed by user id with the
event topics' partition count), so the deletes go to the right RocksDB partition and changelog
partition. Deleting a table key writes a tombstone to its changelog; compaction then removes the
old values from Kafka too. See :mod:`streams.privacy` and ``docs/guarantees.md``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import faust

from streams.privacy import Pseudonymizer, parse_request
from streams.settings import Settings

log = logging.getLogger(__name__)


def attach_erasure(
    app: faust.App,
    settings: Settings,
    tables: Mapping[str, Any],
    pseudonym: Pseudonymizer,
) -> None:
    """Add the erasure agent: ``tables`` by name, each with ``get``/``pop`` (Faust tables)."""
    requests = app.topic(settings.topic_erasure, key_serializer="raw", value_serializer="raw")
    changes = app.topic(settings.topic_changes, key_serializer="raw", value_serializer="raw")
    done = app.topic(settings.topic_erasure_done, key_serializer="raw", value_serializer="raw")

    async def erase(stream: Any) -> None:
        async for event in stream.events():  # the current event routes the deletes to its partition
            msg = event.message
            parsed = parse_request(msg.key, msg.value)
            if parsed is None:
                log.warning("erasure request at offset %d names no user: ignored", msg.offset)
                continue
            raw_id, request_id = parsed
            user = pseudonym(raw_id)
            removed = []
            for name, table in tables.items():
                if table.get(user) is not None:
                    table.pop(user, None)  # a tombstone on the table's changelog
                    removed.append(name)
            changes.send_soon(key=user.encode(), value=None)  # tombstone on the compacted outbound topic
            confirmation = {
                "request_id": request_id,
                "user_id": user,  # the pseudonym when pseudonymisation is on: never the raw id
                "removed": removed,
                "erased_ms": int(time.time() * 1000),
                "served_by": app.conf.canonical_url.human_repr(),
            }
            done.send_soon(key=user.encode(), value=json.dumps(confirmation).encode())

    app.agent(requests, name="erasure")(erase)
