"""Target specs as data scientists write them, and the reasons a bad one is refused."""

from __future__ import annotations

import pydantic
import pytest

from models.targets import parse_duration, parse_horizon, parse_targets
from streams.settings import Settings

DAY_MS = 86_400_000


def test_parses_event_and_churn_targets() -> None:
    got = parse_targets("purchase:7d,churn:14d,sign_up:30d", sample_every_s=600, max_pending=9)
    assert [(t.name, t.horizon_ms, t.churn, t.event_types, t.grace_ms) for t in got] == [
        ("purchase", 7 * DAY_MS, False, frozenset({"purchase"}), 0),
        ("churn", 14 * DAY_MS, True, frozenset(), 1_800_000),
        ("sign_up", 30 * DAY_MS, False, frozenset({"sign_up"}), 0),
    ]
    assert {(t.sample_every_ms, t.max_pending) for t in got} == {(600_000, 9)}
    assert [t.name for t in parse_targets(" purchase : 36h , ,lead:90m ")] == ["purchase", "lead"]
    assert [t.horizon_ms for t in parse_targets(" purchase : 36h , ,lead:90m ")] == [
        36 * 3_600_000,
        5_400_000,
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("24h", 86400),
        ("7d", 604800),
        ("600", 600),
        ("1.5h", 5400),
        (" 2D ", 172800),
    ],
)
def test_horizons(text: str, seconds: int) -> None:
    assert parse_horizon(text) == seconds


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("purchase", "target 'purchase' needs a horizon, as in purchase:7d"),
        ("purchase:7d,churn", "target 'churn' needs a horizon"),
        ("Purchase:7d", "target name 'Purchase' must be an event type"),
        ("1st:7d", "target name '1st' must be an event type"),
        ("sign-up:7d", "target name 'sign-up' must be an event type"),
        (":7d", "target name '' must be an event type"),
        ("purchase:7d,churn:14d,purchase:1d", "target 'purchase' is declared twice"),
        ("purchase:0d", "horizon '0d' must be positive"),
        ("purchase:0", "horizon '0' must be positive"),
        ("purchase:0.1s", "horizon '0.1s' must be positive"),  # rounds down to 0 seconds
        ("purchase:-1d", "horizon '-1d' must be positive"),
        ("purchase:", "horizon '' is not a number"),
        ("purchase:7w", "horizon '7w' is not a number with an optional unit ms, s, m, h or d"),
        ("purchase:seven", "horizon 'seven' is not a number"),
        ("", "declare at least one target"),
        (" , ", "declare at least one target"),
    ],
)
def test_rejects_a_bad_spec_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_targets(spec)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "spec",
    ["purchase:inf", "purchase:nan", "purchase:1e400d"],
)
def test_non_finite_horizons_are_refused_with_the_reason(spec: str) -> None:
    with pytest.raises(ValueError, match="horizon"):
        parse_targets(spec)


def test_settings_refuse_a_bad_spec() -> None:
    assert [t.name for t in Settings(targets="purchase:7d,sign_up:30d").target_list()] == [
        "purchase",
        "sign_up",
    ]
    for spec, reason in [("purchase", "needs a horizon"), ("churn:14d,churn:7d", "declared twice")]:
        with pytest.raises(pydantic.ValidationError, match=reason):
            Settings(targets=spec)


def test_settings_refuse_an_infinite_horizon() -> None:
    with pytest.raises(pydantic.ValidationError, match="horizon"):
        Settings(targets="purchase:1e400d")


@pytest.mark.parametrize(
    ("text", "bare_unit", "seconds"),
    [
        ("90s", "s", 90.0),
        ("30m", "s", 1800.0),
        ("2h", "s", 7200.0),
        ("7d", "s", 604800.0),
        ("0", "s", 0.0),  # a duration may be zero (lateness 0, cooldown 0), a horizon may not
        ("0.05", "s", 0.05),
        ("0.05s", "s", 0.05),
        ("400", "d", 400 * 86400.0),  # user_ttl_days: a bare number keeps meaning days
        ("12h", "d", 43200.0),
        (" 1.5H ", "s", 5400.0),
        ("20ms", "s", 0.02),  # "ms" is read before "s" and "m"
        ("250MS", "d", 0.25),
    ],
)
def test_durations(text: str, bare_unit: str, seconds: float) -> None:
    assert parse_duration(text, bare_unit=bare_unit) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-1s", "duration '-1s' must not be negative"),
        ("2ms5", "duration '2ms5' is not a number"),
        ("2x", "duration '2x' is not a number with an optional unit ms, s, m, h or d"),
        ("", "duration '' is not a number"),
        ("inf", "duration 'inf' is not a number"),
        ("1e400h", "is not a number"),
    ],
)
def test_bad_durations_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert reason in str(info.value)
