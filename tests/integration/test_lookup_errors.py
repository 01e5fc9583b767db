"""Lookups answer a bad query with a 400 that says what is wrong, whoever the user is."""

from __future__ import annotations

import time
from typing import Any

import pytest

from streams.settings import Settings
from tests.integration.harness import produce, wait_until
from tests.integration.test_pipeline import router

pytestmark = pytest.mark.integration


def test_a_bad_as_of_is_a_400_for_known_and_unknown_users(
    settings: Settings, make_worker: Any, kafka: str
) -> None:
    worker = make_worker().start()
    now = int(time.time() * 1000)
    produce(kafka, router(settings), [{"event_id": "e1", "user_id": "known", "type": "page_view", "ts": now}])
    wait_until(lambda: worker.features("known"), 60, what="the known user's features")
    for user in ("known", "nobody"):
        for bad in ("%C2%B2", "abc", "2025-13-01"):  # superscript two: isdigit() but not int()
            status, body = worker.get(f"/users/{user}/features?as_of={bad}")
            assert (status, body["error"]) == (400, "bad_as_of"), (user, bad, body)
    status, body = worker.get(f"/users/known/features?as_of={now}")
    assert status == 200 and body["as_of_ms"] == now and body["events"] == 1
    status, body = worker.get("/users/nobody/features")
    assert (status, body["error"]) == (404, "unknown_user")
