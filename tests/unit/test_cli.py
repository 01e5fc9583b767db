"""The CLI as a user meets it: help everywhere, env-var fallbacks, clear one-line errors."""

from __future__ import annotations

import os
from datetime import UTC

import click
import pytest
from click.testing import CliRunner

from streams.broker import BrokerError, LocalBroker
from streams.cli import main
from streams.settings import Settings


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out.extend(commands(cmd, path))
    return out


def test_required_subcommands_exist() -> None:
    names = {path[0] for path, _ in commands(main)}
    assert {"broker", "worker", "simulate", "replay", "features"} <= names
    assert {("broker", "start"), ("broker", "stop"), ("broker", "status")} <= {p for p, _ in commands(main)}


@pytest.mark.parametrize("path", [p for p, _ in commands(main)], ids=lambda p: " ".join(p))
def test_every_option_shows_an_environment_variable(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    cmd = dict(commands(main))[path]
    ctx = click.Context(cmd, info_name=path[-1], auto_envvar_prefix="PROPSTREAM_" + "_".join(path).upper())
    for param in cmd.params:
        if isinstance(param, click.Option):
            record = param.get_help_record(ctx)  # exactly what --help renders for this option
            assert record is not None
            assert "env var: PROPSTREAM_" in record[1], f"{' '.join(path)} {param.opts}: {record}"
            assert " ".join(record[1].split()) in " ".join(result.output.split())


def test_environment_overrides_reach_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSTREAM_PARTITIONS", "12")
    monkeypatch.setenv("PROPSTREAM_TOPIC_CART", "shop.cart")
    s = Settings()
    assert (s.partitions, s.topic_cart) == (12, "shop.cart")
    with pytest.raises(Exception, match="frozen"):
        s.partitions = 3  # type: ignore[misc]
    with pytest.raises(Exception, match="Extra inputs"):
        Settings(partitons=3)  # type: ignore[call-arg]  # misspelt keys fail loudly


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java, no mvn
    with pytest.raises(BrokerError) as info:
        LocalBroker(Settings(home=tmp_path)).start()
    message = str(info.value)
    assert "\n" not in message and "Java 17+" in message and "PROPSTREAM_BOOTSTRAP" in message


def test_missing_maven_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    import shutil

    java = shutil.which("java")
    if java is None:
        pytest.skip("no java here")
    bin_dir = os.path.join(str(tmp_path), "bin")
    os.makedirs(bin_dir)
    os.symlink(java, os.path.join(bin_dir, "java"))
    monkeypatch.setenv("PATH", bin_dir)
    with pytest.raises(BrokerError) as info:
        LocalBroker(Settings(home=tmp_path), data_dir=tmp_path).fetch()  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and "Maven" in str(info.value)


def test_features_without_a_worker_says_what_to_do() -> None:
    from streams.broker import free_port

    result = CliRunner().invoke(main, ["features", "u1", "--web-port", str(free_port())])
    assert result.exit_code == 1
    assert "propstream worker" in result.output


# --- eval honours the settings ---------------------------------------------------------------
DAY_MS = 86_400_000
JAN_1997_MS = 852_076_800_000  # 1997-01-01T00:00:00Z


def order_log_1997(path: os.PathLike[str], days: int = 20, users: int = 6) -> int:
    """A small JSONL log of 1997: views every few hours, a purchase every third day per user."""
    import json
    from datetime import datetime

    lines = []
    for d in range(days):
        for u in range(users):
            for h in (9, 13, 18):
                ts = JAN_1997_MS + d * DAY_MS + h * 3_600_000 + u * 60_000
                kind = "purchase" if h == 18 and (d + u) % 3 == 0 else "page_view"
                iso = datetime.fromtimestamp(ts / 1000, tz=UTC).isoformat().replace("+00:00", "Z")
                lines.append({"event_id": f"u{u}-{d}-{h}", "user_id": f"u{u}", "type": kind, "ts": iso})
    lines.sort(key=lambda e: e["ts"])
    with open(path, "w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in lines)
    return len(lines)


def eval_report(tmp_path: os.PathLike[str], args: list[str], env: dict[str, str]) -> tuple[int, str, dict]:
    import json
    from pathlib import Path

    out = Path(tmp_path) / "report.json"
    result = CliRunner().invoke(main, ["eval", *args, "--json", str(out)], env=env)
    assert not isinstance(result.exception, KeyError | TypeError | AttributeError), result.output
    report = json.loads(out.read_text()) if out.exists() else {}
    return result.exit_code, result.output, report


def test_eval_honours_the_earliest_event_time_setting(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    log = Path(tmp_path) / "orders-1997.jsonl"
    n = order_log_1997(log)
    # control: with the default rules (nothing before 2000) every event of 1997 is refused
    code, _, report = eval_report(tmp_path, [str(log), "--horizon", "2d"], {})
    assert report["rejected"] == {"too_old": n}
    code, output, report = eval_report(
        tmp_path, [str(log), "--horizon", "2d"], {"PROPSTREAM_EARLIEST_EVENT_TIME": "1990-01-01T00:00:00Z"}
    )
    assert code == 0, output
    assert report["events"] == n and report["rejected"] == {}
    assert report["matured"] > 0


def test_eval_passes_every_setting_it_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    """Rules, feature params, sampling, pending cap, learner and warm-up come from the settings."""
    from pathlib import Path

    import models.evaluate

    log = Path(tmp_path) / "orders-1997.jsonl"
    order_log_1997(log, days=2, users=1)
    seen: dict = {}

    def spy(events: object, target: object, **kw: object) -> models.evaluate.EvalRun:
        seen.update(kw, target=target)
        return models.evaluate.EvalRun(target)  # type: ignore[arg-type]

    monkeypatch.setattr(models.evaluate, "run", spy)
    env = {
        "PROPSTREAM_EARLIEST_EVENT_TIME": "1990-01-01T00:00:00Z",
        "PROPSTREAM_MAX_EVENT_BYTES": "4096",
        "PROPSTREAM_CUSTOM_EVENTS": "trial_start",
        "PROPSTREAM_SESSION_GAP_S": "10m",
        "PROPSTREAM_ABANDON_AFTER_S": "2h",
        "PROPSTREAM_DEDUP_CAPACITY": "64",
        "PROPSTREAM_SAMPLE_EVERY_S": "1d",
        "PROPSTREAM_MAX_PENDING": "7",
        "PROPSTREAM_TARGETS": "purchase:3d,churn:14d",
        "PROPSTREAM_MODEL_PRIOR": "0.9",
        "PROPSTREAM_MODEL_L2": "0.5",
        "PROPSTREAM_MIN_POSITIVES": "3",
        "PROPSTREAM_MIN_NEGATIVES": "4",
        "PROPSTREAM_TRUST_MIN_AUC_LOWER": "0.55",
        "PROPSTREAM_TRUST_MAX_ECE": "0.2",
        "PROPSTREAM_QUALITY_WINDOW": "800",
    }
    CliRunner().invoke(main, ["eval", str(log)], env=env)
    rules, params, target, cfg = seen["rules"], seen["params"], seen["target"], seen["model_config"]
    assert rules.earliest_ms == 631_152_000_000  # 1990-01-01T00:00:00Z, worked out by hand
    assert rules.max_event_bytes == 4096 and "trial_start" in rules.custom_types
    assert (params.session_gap_ms, params.abandon_after_ms, params.dedup_capacity) == (600_000, 7_200_000, 64)
    # no --horizon: the horizon PROPSTREAM_TARGETS gives purchase
    assert (target.name, target.horizon_ms, target.sample_every_ms, target.max_pending) == (
        "purchase",
        3 * DAY_MS,
        DAY_MS,
        7,
    )
    assert (cfg.prior, cfg.l2) == (0.9, 0.5)
    assert (seen["min_positives"], seen["min_negatives"]) == (3, 4)
    gate = seen["trust"]
    assert (gate.min_auc_lower, gate.max_ece, seen["quality_window"]) == (0.55, 0.2, 800)


def test_eval_options_take_durations(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    import models.evaluate

    log = Path(tmp_path) / "orders-1997.jsonl"
    order_log_1997(log, days=2, users=1)
    seen: dict = {}

    def spy(events: object, target: object, **kw: object) -> models.evaluate.EvalRun:
        seen["target"] = target
        return models.evaluate.EvalRun(target)  # type: ignore[arg-type]

    monkeypatch.setattr(models.evaluate, "run", spy)
    for args, horizon_ms, every_ms in [
        (["--horizon", "36h", "--sample-every", "30m"], 36 * 3_600_000, 1_800_000),
        (["--horizon", "86400", "--sample-every", "600"], DAY_MS, 600_000),  # plain seconds, as before
        (["--target", "churn"], 14 * DAY_MS, 3_600_000),  # defaults: the configured churn:14d, 1 h
    ]:
        CliRunner().invoke(main, ["eval", str(log), *args])
        assert (seen["target"].horizon_ms, seen["target"].sample_every_ms) == (horizon_ms, every_ms), args
    result = CliRunner().invoke(main, ["eval", str(log), "--horizon", "1w"])
    assert result.exit_code == 2 and "'1w' is not a number with an optional unit" in result.output
    result = CliRunner().invoke(main, ["eval", str(log)], env={"PROPSTREAM_EVAL_HORIZON_S": "0s"})
    assert result.exit_code == 2 and "must be positive" in result.output


def test_eval_baseline_without_matured_snapshots_says_why(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    log = Path(tmp_path) / "orders-1997.jsonl"
    order_log_1997(log, days=3, users=2)  # 3 days of data, a 7-day horizon: nothing can mature
    env = {"PROPSTREAM_EARLIEST_EVENT_TIME": "1990-01-01T00:00:00Z"}
    code, output, report = eval_report(tmp_path, [str(log), "--baseline"], env)
    assert code == 1
    assert "no snapshot matured" in output
    # the span of the data (2 d 9 h 1 min: 1997-01-01 09:00 to 1997-01-03 18:01) and the horizon
    assert "1997-01-01T09:00Z" in output and "1997-01-03T18:01Z" in output and "2.4 d" in output
    assert "the horizon is 7 d" in output
    assert report["matured"] == 0  # the JSON report is still written, without figures to mislead


def test_eval_without_accepted_events_says_why(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    log = Path(tmp_path) / "orders-1997.jsonl"
    n = order_log_1997(log, days=3, users=2)
    code, output, _ = eval_report(tmp_path, [str(log), "--baseline"], {})
    assert code == 1
    assert f"all {n} events were rejected" in output and "too_old" in output
    assert "PROPSTREAM_EARLIEST_EVENT_TIME" in output  # what to change


# --- one duration syntax on every duration option --------------------------------------------
@pytest.mark.parametrize(
    ("path", "option"),
    [
        (("simulate",), "--duration"),
        (("simulate",), "--days"),
        (("eval",), "--horizon"),
        (("eval",), "--sample-every"),
        (("eval",), "--days"),
        (("demo",), "--duration"),
        (("demo",), "--days"),
        (("bench",), "--seconds"),
        (("forget",), "--timeout"),
    ],
)
def test_duration_options_use_the_duration_type(path: tuple[str, ...], option: str) -> None:
    from streams.cli_common import Duration

    cmd = dict(commands(main))[path]
    [param] = [p for p in cmd.params if option in p.opts]
    assert isinstance(param.type, Duration)
    help_text = param.help or ""
    assert "90s, 30m, 2h, 7d" in help_text, help_text


def test_duration_type_converts_to_its_unit() -> None:
    from streams.cli_common import Duration

    assert Duration().convert("2h", None, None) == 7200
    assert Duration().convert("45", None, None) == 45
    assert Duration("d").convert("36h", None, None) == 1.5
    assert Duration("d").convert("30", None, None) == 30  # --days 30 still means 30 days
    assert Duration().convert(2.5, None, None) == 2.5  # defaults given as numbers pass through
    with pytest.raises(click.BadParameter, match="not a number"):
        Duration().convert("soon", None, None)


def test_simulate_durations_take_units(tmp_path: os.PathLike[str]) -> None:
    """``--days 6h`` simulates a quarter of a day; the stop time reads ``1h`` from its variable."""
    import json
    from pathlib import Path

    from traffic.simulator import SimConfig, simulate

    out = Path(tmp_path) / "ev.jsonl"
    result = CliRunner().invoke(
        main,
        ["simulate", "--users", "50", "--days", "6h", "--out", str(out)],
        env={"PROPSTREAM_SIM_DURATION": "1h"},
    )
    assert result.exit_code == 0, result.output
    written = [json.loads(line)["event_id"] for line in out.read_text().splitlines()]
    quarter_day = [e["event_id"] for e in simulate(SimConfig(users=50, seed=42, days=0.25))]
    assert written and written[-5:] == quarter_day[-5:]
    assert written == quarter_day


# --- misspelt PROPSTREAM_* variables ---------------------------------------------------------
def test_cli_env_names_walk_the_command_tree() -> None:
    from streams.cli_common import cli_env_names

    names = cli_env_names(main)
    expected = {
        "PROPSTREAM_SIM_USERS",  # explicit envvar=
        "PROPSTREAM_SIMULATE_USERS",  # click also tries the auto name when the explicit one is unset
        "PROPSTREAM_REPLAY_FORMAT",
        "PROPSTREAM_EVAL_USERS",  # auto: PROPSTREAM_<COMMAND>_<OPTION>
        "PROPSTREAM_EVAL_HORIZON_S",
        "PROPSTREAM_MODEL_ROLLBACK_TARGET",  # nested group
        "PROPSTREAM_BENCH_EVENTS",
        "PROPSTREAM_BENCH_KEEP_BROKER",
        "PROPSTREAM_DEMO_KEEP_BROKER",
        "PROPSTREAM_BROKER_LOGS_LINES",
        "PROPSTREAM_BROKER_PORT",  # a settings option
    }
    assert expected <= names
    assert all(n.startswith("PROPSTREAM_") for n in names)


def test_a_misspelt_variable_is_refused_with_the_closest_name() -> None:
    result = CliRunner().invoke(main, ["features", "--catalogue"], env={"PROPSTREAM_PARTITONS": "8"})
    assert result.exit_code == 2
    assert "unknown setting PROPSTREAM_PARTITONS: did you mean PROPSTREAM_PARTITIONS?" in result.output


def test_valid_auto_envvars_are_accepted() -> None:
    env = {
        "PROPSTREAM_EVAL_USERS": "10",
        "PROPSTREAM_MODEL_ROLLBACK_TARGET": "churn",
        "PROPSTREAM_SIM_USERS": "3",
    }
    result = CliRunner().invoke(main, ["features", "--catalogue"], env=env)
    assert result.exit_code == 0, result.output


def test_help_still_works_with_a_misspelt_variable() -> None:
    env = {"PROPSTREAM_TARGET": "purchase:1d"}
    for args in (["--help"], ["worker", "--help"], ["model", "rollback", "-h"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output


def test_worker_refuses_a_misspelt_variable_before_any_broker(tmp_path: os.PathLike[str]) -> None:
    import subprocess
    import sys

    from streams.broker import free_port

    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith("PROPSTREAM_")
    }  # only the variables under test
    env.update(
        PROPSTREAM_TARGET="purchase:1d",
        PROPSTREAM_HOME=str(tmp_path),
        PROPSTREAM_BOOTSTRAP=f"127.0.0.1:{free_port()}",  # nothing listens: reaching it would fail differently
    )
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "unknown setting PROPSTREAM_TARGET: did you mean PROPSTREAM_TARGETS?" in proc.stderr
    assert "broker" not in proc.stderr.lower() and "kafka" not in proc.stderr.lower()


def test_eval_of_the_value_target_reports_money_figures_oracle_and_baselines(
    tmp_path: os.PathLike[str],
) -> None:
    """``--target value:3d`` (the PROPSTREAM_TARGETS spelling) on the simulator: the issue's keys,
    the oracle's Gini from the simulator's true expected revenue, and both offline baselines."""
    args = ["--simulate", "--users", "300", "--days", "24", "--target", "value:3d", "--baseline"]
    code, output, report = eval_report(tmp_path, args, {})
    assert code == 0, output
    assert report["target"] == "value" and report["horizon_s"] == 3 * 86400
    for key in ("mae", "rmse", "gini", "top_decile_capture", "decile_calibration", "oracle_gini"):
        assert key in report, key
    assert report["matured"] > 1000 and 0 < report["positives"] < report["matured"]
    assert report["oracle_gini"] > 0.5  # the simulator's truth ranks revenue well
    assert [d["decile"] for d in report["decile_calibration"]] == sorted(
        d["decile"] for d in report["decile_calibration"]
    )
    for name in ("mean", "gbdt", "online"):
        want = {"mae", "rmse", "gini", "top_decile_capture", "decile_calibration", "calibration_ratio"}
        assert want <= set(report["baselines"][name])
    assert "oracle_gini" in output and "baselines:" in output
