"""The body of a single-user lookup (streams/user_api.py), as either server answers it."""

from __future__ import annotations

import pytest

from features.state import encode as encode_state
from features.user import compute
from models.online import inputs
from streams.faults import Faults
from streams.lookup import partition_of
from streams.metrics import Metrics
from streams.privacy import Pseudonymizer
from streams.rows import encode_row
from streams.user_api import UserAnswers
from tests.unit.test_lookup import CHURN, DAY, HOUR, PARAMS, PURCHASE, T0, core, state

PARTS = 4


def answers(metrics: Metrics) -> UserAnswers:
    return UserAnswers(core(), PARAMS, Pseudonymizer(None), Faults(metrics), PARTS, "http://w:1")


def test_a_user_is_answered_as_of_its_partitions_clock_with_features_and_scores() -> None:
    st = state("u", 3, T0 + 10 * HOUR)
    rows = {"u": encode_row([encode_state(st), b"", b""])}
    read: list[tuple[str, int]] = []

    def read_row(key: str, p: int) -> bytes | None:
        read.append((key, p))
        return rows.get(key)

    later = st.last_ms + 2 * DAY
    status, body = answers(Metrics()).answer("u", None, read_row, lambda p: later)
    assert status == 200 and read == [("u", partition_of("u", PARTS))]
    assert (body["as_of_ms"], body["clock_ms"], body["requested_as_of_ms"]) == (later, later, None)
    assert body["events"] == 3 and body["features"]["s_since_last_event"] == 2 * 86400  # hand-worked
    x = inputs(compute(st, later, PARAMS))
    assert body["scores"]["purchase"]["score"] == pytest.approx(PURCHASE.score(x), abs=1e-6)
    assert body["scores"]["churn"]["score"] == pytest.approx(CHURN.score(x), abs=1e-6)
    status, only = answers(Metrics()).answer("u", str(later), read_row, lambda p: 0, features_only=True)
    assert status == 200 and "scores" not in only and only["features"] == body["features"]


def test_errors_name_their_cause_and_a_bad_as_of_is_refused_before_any_read() -> None:
    metrics = Metrics()
    api = answers(metrics)

    def never(key: str, p: int) -> bytes | None:
        raise AssertionError("read before the query was checked")

    status, body = api.answer("u", "yesterday", never, lambda p: 0)
    assert (status, body["error"]) == (400, "bad_as_of")
    status, body = api.answer("nobody", None, lambda k, p: None, lambda p: 0)
    assert (status, body["error"]) == (404, "unknown_user")
    status, body = api.answer("u", None, lambda k, p: encode_row([b"\xc1garbage", b"", b""]), lambda p: 0)
    assert (status, body["error"]) == (500, "corrupt_state")
    assert metrics.registry.get_sample_value("propstream_decode_errors_total", {"what": "features"}) == 1
