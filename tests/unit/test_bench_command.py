"""``propstream bench`` and ``demo`` stop the local broker they started, unless asked to keep it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from streams.cli import main
from streams.cli_common import stop_broker_after


@pytest.mark.parametrize(
    ("bootstrap", "was_running", "keep", "stop"),
    [
        ("", False, False, True),  # started here, not kept: stopped
        ("", False, True, False),  # started here, --keep-broker: left running
        ("", True, False, False),  # somebody else's local broker: never stopped
        ("", True, True, False),
        ("kafka:9092", False, False, False),  # an existing cluster is never ours to stop
        ("kafka:9092", True, False, False),
    ],
)
def test_stops_only_a_broker_it_started(bootstrap: str, was_running: bool, keep: bool, stop: bool) -> None:
    assert stop_broker_after(bootstrap=bootstrap, was_running=was_running, keep=keep) is stop


class Captured(Exception):
    pass


@pytest.mark.parametrize(
    ("args", "env", "keep"),
    [
        ([], {}, False),
        (["--keep-broker"], {}, True),
        ([], {"PROPSTREAM_BENCH_KEEP_BROKER": "1"}, True),
    ],
)
def test_bench_keep_broker_option_and_variable(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], keep: bool
) -> None:
    import streams.bench.command as command

    seen: dict[str, object] = {}

    def capture(opts: dict[str, object]) -> dict[str, object]:
        seen.update(opts)
        raise Captured

    monkeypatch.setattr(command, "bench", capture)
    result = CliRunner().invoke(main, ["bench", *args], env=env)
    assert isinstance(result.exception, Captured), result.output
    assert seen["keep_broker"] is keep


def test_demo_has_the_same_option() -> None:
    result = CliRunner().invoke(main, ["demo", "--help"], terminal_width=200)
    assert "--keep-broker" in result.output and "PROPSTREAM_DEMO_KEEP_BROKER" in result.output


def test_live_growth_samples_distinct_stored_users_after_the_fill() -> None:
    from streams.bench.growth_live import fill_events, sample_events

    end = 1_800_000_000_000
    fill = list(fill_events(1000, end))
    stored = {e["user_id"] for e in fill}
    assert len(stored) == 1000 and max(int(e["ts"]) for e in fill) < end  # type: ignore[call-overload]
    sample = sample_events(1000, 300, end + 5, seed=1)
    users = [e["user_id"] for e in sample]
    assert len(set(users)) == 300 and set(users) <= stored  # each a stored row read once
    assert [e["ts"] for e in sample] == list(range(end + 5, end + 305))


def test_live_growth_refuses_more_timed_events_than_users() -> None:
    result = CliRunner().invoke(main, ["bench", "--growth-live", "1000,5000", "--growth-live-events", "2000"])
    assert result.exit_code == 2
    assert "exceeds the smallest --growth-live size" in result.output
