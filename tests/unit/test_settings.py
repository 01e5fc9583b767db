"""Settings from the environment: one duration syntax, plain numbers unchanged, misspelt names refused."""

from __future__ import annotations

import click
import pydantic
import pytest

from streams.cli_common import build_settings
from streams.settings import Settings, env_name, unknown_env

# Every duration field and its unit for a plain number, written out here rather than derived from the
# settings module, so a field that loses the syntax (or a new one without it) fails below.
DURATIONS = {
    "batch_within_s": "s",
    "checkpoint_interval_s": "s",
    "fetch_wait_s": "s",
    "max_future_s": "s",
    "allowed_lateness_s": "s",
    "session_gap_s": "s",
    "abandon_after_s": "s",
    "sample_every_s": "s",
    "value_sample_every_s": "s",
    "publish_interval_s": "s",
    "cooldown_s": "s",
    "source_idle_s": "s",
    "idle_advance_s": "s",
    "retention_sweep_every_s": "s",
    "forward_timeout_s": "s",
    "audience_cooldown_s": "s",
    "forward_backoff_s": "s",
    "forward_backoff_max_s": "s",
    "user_ttl_days": "d",
}


def test_every_duration_field_is_listed_here() -> None:
    named = {f for f in Settings.model_fields if f.endswith(("_s", "_days"))}
    assert named == set(DURATIONS)


@pytest.mark.parametrize("field", sorted(DURATIONS))
def test_duration_fields_take_units_from_the_environment(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name(field), "2h")
    expected = 2 / 24 if DURATIONS[field] == "d" else 7200
    assert getattr(Settings(), field) == pytest.approx(expected)


@pytest.mark.parametrize("field", sorted(DURATIONS))
def test_plain_numbers_keep_their_unit(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name(field), "120")
    value = getattr(Settings(), field)
    assert value == 120  # seconds, or days for user_ttl_days: what a bare number meant before
    assert type(value) is type(Settings.model_fields[field].default)  # int stays int, float stays float


@pytest.mark.parametrize("field", sorted(DURATIONS))
def test_duration_fields_say_the_syntax(field: str) -> None:
    description = Settings.model_fields[field].description or ""
    assert "90s, 30m, 2h, 7d" in description
    assert ("plain number: days" if DURATIONS[field] == "d" else "plain number: seconds") in description


def test_constructor_keywords_still_take_numbers() -> None:
    s = Settings(allowed_lateness_s=60, user_ttl_days=1.5, batch_within_s=0.01)
    assert (s.allowed_lateness_s, s.user_ttl_days, s.batch_within_s) == (60, 1.5, 0.01)
    assert Settings(cooldown_s="15m").cooldown_s == 900  # type: ignore[arg-type]


def test_a_bad_duration_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSTREAM_ALLOWED_LATENESS_S", "2x")
    with pytest.raises(pydantic.ValidationError, match="PROPSTREAM_ALLOWED_LATENESS_S"):
        Settings()
    with pytest.raises(click.UsageError) as info:
        build_settings()
    message = info.value.format_message()
    assert "PROPSTREAM_ALLOWED_LATENESS_S: duration '2x' is not a number" in message
    assert "\n" not in message and "pydantic.dev" not in message  # one line, not pydantic's dump


def test_a_fractional_second_in_a_whole_second_field_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSTREAM_COOLDOWN_S", "1.5s")
    with pytest.raises(pydantic.ValidationError, match="PROPSTREAM_COOLDOWN_S"):
        Settings()


# --- misspelt variables ----------------------------------------------------------------------
def test_misspelt_settings_get_the_closest_name() -> None:
    got = unknown_env(["PROPSTREAM_TARGET", "PROPSTREAM_PARTITONS", "HOME", "PROPSTREAM_TARGETS"])
    assert got == [
        "unknown setting PROPSTREAM_TARGET: did you mean PROPSTREAM_TARGETS?",
        "unknown setting PROPSTREAM_PARTITONS: did you mean PROPSTREAM_PARTITIONS?",
    ]


def test_names_the_cli_reads_are_valid_too() -> None:
    cli = {"PROPSTREAM_SIM_USERS", "PROPSTREAM_EVAL_USERS"}
    assert unknown_env(["PROPSTREAM_SIM_USERS", "PROPSTREAM_EVAL_USERS"], cli) == []
    assert unknown_env(["PROPSTREAM_SIM_USER"], cli) == [
        "unknown setting PROPSTREAM_SIM_USER: did you mean PROPSTREAM_SIM_USERS?"
    ]


def test_a_name_like_nothing_gets_no_guess() -> None:
    [problem] = unknown_env(["PROPSTREAM_ZZZZZZZZZZZZ"])
    assert problem.startswith("unknown setting PROPSTREAM_ZZZZZZZZZZZZ")
    assert "did you mean" not in problem


def test_every_settings_field_is_a_valid_name() -> None:
    names = [env_name(f) for f in Settings.model_fields]
    assert "PROPSTREAM_BOOTSTRAP" in names and "PROPSTREAM_TARGETS" in names
    assert unknown_env(names) == []


def test_pydantic_reads_names_in_any_case_so_the_check_does_too() -> None:
    assert unknown_env(["propstream_targets"]) == []
    assert unknown_env(["propstream_target"]) == [
        "unknown setting propstream_target: did you mean PROPSTREAM_TARGETS?"
    ]


def test_exactly_once_needs_direct_consume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSTREAM_PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("PROPSTREAM_DIRECT_CONSUME", "false")
    with pytest.raises(ValueError, match="PROPSTREAM_DIRECT_CONSUME=true"):
        Settings()
    monkeypatch.setenv("PROPSTREAM_PROCESSING_GUARANTEE", "exactly-once")
    monkeypatch.delenv("PROPSTREAM_DIRECT_CONSUME")
    with pytest.raises(ValueError, match="at_least_once"):  # a misspelt choice lists the valid ones
        Settings()


def test_each_worker_has_its_own_transactional_id_unless_given_one() -> None:
    a = Settings(app_id="shop", web_host="0.0.0.0", web_advertise="worker-1", web_port=6066)
    b = Settings(app_id="shop", web_host="0.0.0.0", web_advertise="worker-2", web_port=6066)
    assert (a.worker_transactional_id(), b.worker_transactional_id()) == (
        "shop-worker-1-6066",
        "shop-worker-2-6066",
    )
    assert Settings(transactional_id="fixed").worker_transactional_id() == "fixed"
