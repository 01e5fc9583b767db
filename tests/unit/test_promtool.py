"""The real promtool on our deploy files and our exposition: config, rules, rule unit tests, metrics lint."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from streams.app import create_app
from streams.metrics import Metrics
from streams.settings import Settings
from tests.conftest import ROOT

PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: `make test` installs Debian's prometheus package when run as root "
    "(bash deploy/system-deps.sh), else apt-get install prometheus",
)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, *args], input=stdin.decode() if stdin else None, capture_output=True, text=True, timeout=60
    )
    return out


def test_config_and_rules_check() -> None:
    out = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("check", "rules", str(PROM / "alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 16 rules found" in out.stdout


def test_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", str(PROM / "alerts_test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = [
        r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]
    cases = [
        c
        for t in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
        for c in t.get("alert_rule_test", [])
    ]
    for name in alerts:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name} has no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name} has no case where it stays quiet"
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for name in alerts:
        assert f"## {name}" in runbook, f"docs/runbook.md has no section for {name}"


def test_rule_tests_can_fail() -> None:
    # A rule unit test that cannot fail is a defect: break one threshold and expect promtool to object.
    with tempfile.TemporaryDirectory() as tmp:
        rules = (
            (PROM / "alerts.yml")
            .read_text()
            .replace("propstream_drift_psi) > 0.25", "propstream_drift_psi) > 0.5")
        )
        assert rules != (PROM / "alerts.yml").read_text()
        (Path(tmp) / "alerts.yml").write_text(rules)
        shutil.copy(PROM / "alerts_test.yml", Path(tmp) / "alerts_test.yml")
        out = promtool("test", "rules", str(Path(tmp) / "alerts_test.yml"))
    assert out.returncode != 0
    assert "PropstreamDrift" in out.stdout + out.stderr


def test_exposition_passes_promtool_check_metrics(tmp_path: Path) -> None:
    # Every family of the registry, with samples: a batch recorded and the app collector attached
    # to a Faust app that has not started (its gauges then have no samples, only HELP and TYPE).
    app = create_app(Settings(data_dir=tmp_path), bootstrap="127.0.0.1:9")
    metrics: Metrics = app.propstream_metrics  # type: ignore[attr-defined]
    metrics.record_batch(
        {"events.clickstream": 10},
        {("events.clickstream", "page_view"): 8},
        {("events.clickstream", "not_json"): 1, ("events.clickstream", "duplicate"): 1},
        {},
        writes=5,
        seconds=0.01,
    )
    metrics.lag_seconds.observe(0.2)
    metrics.watermark.labels("0").set(1_700_000_000)
    text = metrics.exposition()
    assert b"propstream_consumer_lag_messages" in text and b"propstream_table_keys" in text
    out = promtool("check", "metrics", stdin=text)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
