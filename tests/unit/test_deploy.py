"""deploy/ without Docker: the compose file is valid and its references exist; the dashboard only
queries metrics our code exports; the image and `make install` install the pinned constraints."""

from __future__ import annotations

import json
import re
import tomllib
from itertools import chain
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry

from streams.forward_metrics import ForwardMetrics
from streams.metrics import Metrics
from tests.conftest import ROOT, SHARED_DATA

SCHEMA = SHARED_DATA.parent / "schemas" / "compose-spec.json"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "propstream.json"

# Created by streams/model_metrics.py on the app's registry (scoring, learning, change events).
MODEL_METRICS = {
    "propstream_scores_total",
    "propstream_score_bucket",
    "propstream_score_sum",
    "propstream_score_count",
    "propstream_learning_steps_total",
    "propstream_labels_matured_total",
    "propstream_change_events_total",
    "propstream_emit_latency_seconds_bucket",
    "propstream_emit_latency_seconds_sum",
    "propstream_emit_latency_seconds_count",
    "propstream_model_version",
    "propstream_model_warming_up",
    "propstream_model_trusted",
    "propstream_model_trust_failing",
    "propstream_model_matured_labels",
    "propstream_model_roc_auc",
    "propstream_model_log_loss",
    "propstream_model_ece",
    "propstream_model_gini",
    "propstream_model_value_calibration",
    "propstream_expected_value_bucket",
    "propstream_expected_value_sum",
    "propstream_expected_value_count",
    "propstream_drift_psi",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def sample_names(registry: Any) -> set[str]:
    """Series names a registry exposes, from its families' types (no samples needed)."""
    return {f.name + suffix for f in registry.collect() for suffix in SUFFIXES.get(f.type, ("",))}


def exported_metrics() -> set[str]:
    app = type("UnstartedApp", (), {"tables": type("Tables", (), {"values": lambda self: []})()})()
    metrics = Metrics()
    metrics.watch_app(app)  # the scrape-time collector's families too
    forward = ForwardMetrics(CollectorRegistry())  # propstream forward's own registry
    return sample_names(metrics.registry) | MODEL_METRICS | sample_names(forward.registry)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_validates_against_official_schema() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} absent (no ../shared)")
    jsonschema.validate(compose(), json.loads(SCHEMA.read_text()))


def test_compose_references_exist_and_images_are_pinned() -> None:
    doc = compose()
    services = doc["services"]
    assert {"kafka", "worker-1", "worker-2", "simulator", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):  # a bind mount of a file or folder of this repo
                assert (ROOT / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in doc["volumes"], f"{name}: undeclared volume {vol}"
    host_ports = [p.split(":")[1] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_dockerfile_copies_existing_paths() -> None:
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_dockerfile_and_make_install_with_the_pinned_constraints() -> None:
    lines = (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    copied = next(
        (i for i, line in enumerate(lines) if line.startswith("COPY ") and "constraints.txt" in line), None
    )
    assert copied is not None, "the Dockerfile does not copy constraints.txt"
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert installs and all(copied < i and "-c constraints.txt" in lines[i] for i in installs), installs
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*\bconstraints\.txt\b", makefile, re.M), "stamp ignores constraints"
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[test\]'", makefile)


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            out[canonicalize_name(name)] = version
    return out


def test_constraints_pin_every_declared_requirement_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *chain(*project.get("optional-dependencies", {}).values())]
    locked = pins()
    assert not {"pip", "setuptools", "wheel", "propstream"} & set(locked)
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        assert name in locked, f"{name} is not pinned: run `make lock`"
        assert spec.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} is outside {spec.specifier}: run `make lock`"
        )


def test_compose_mounts_the_rules_and_the_dashboard() -> None:
    services = compose()["services"]
    mounts = {v.split(":")[0]: v.split(":")[1] for s in services.values() for v in s.get("volumes", [])}
    assert mounts["./deploy/prometheus"] == "/etc/prometheus"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == "/etc/grafana/dashboards"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rules in prom["rule_files"]:
        assert (DEPLOY / "prometheus" / rules).is_file(), rules
    # Prometheus scrapes every worker service of the compose file, on the worker's port.
    targets = {
        t
        for job in prom["scrape_configs"]
        if job["job_name"] == "propstream"
        for c in job["static_configs"]
        for t in c["targets"]
    }
    workers = {name for name in services if name.startswith("worker-")}
    assert targets == {f"{w}:6066" for w in workers}
    for w in workers:
        assert "/readyz" in " ".join(services[w]["healthcheck"]["test"])
    # Grafana's provisioning points at the mounted folder, and its datasource at the prometheus service.
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "propstream.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    assert services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(
        "/etc/grafana/dashboards/"
    )
    assert (
        DASHBOARD.parent
        / services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].rsplit("/", 1)[1]
    ).is_file()


def metric_names(expr: str) -> set[str]:
    """Our metric names in a PromQL expression, plus ``up`` when it is selected."""
    return set(re.findall(r"\bpropstream_[a-z0-9_]+\b", expr)) | (
        {"up"} if re.search(r"\bup\s*\{", expr) else set()
    )


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def test_dashboard_queries_only_metrics_we_export() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    known = exported_metrics() | {"up"}
    used: set[str] = set()
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no metric in {t['expr']!r}"
            unknown = names - known
            assert not unknown, f"panel {p['title']!r} queries metrics nobody exports: {unknown}"
            used |= names
    # The panels the issue asks for: throughput, latency, lag, dead letters, quality, scores, drift.
    for name in (
        "propstream_events_consumed_total",
        "propstream_events_rejected_total",
        "propstream_processing_delay_seconds_bucket",
        "propstream_emit_latency_seconds_bucket",
        "propstream_consumer_lag_messages",
        "propstream_table_keys",
        "propstream_recovery_remaining_messages",
        "propstream_model_roc_auc",
        "propstream_model_ece",
        "propstream_score_bucket",
        "propstream_drift_psi",
    ):
        assert name in used, f"the dashboard does not show {name}"


def test_alert_rules_use_only_metrics_we_export() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    known = exported_metrics() | {"up"}
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names and names <= known, (rule["alert"], names - known)


def test_model_metric_names_match_their_module() -> None:
    # The names above are the contract with streams/model_metrics.py; once it exists, hold it to them.
    mm = pytest.importorskip("streams.model_metrics")
    registry = Metrics().registry
    mm.ModelMetrics(registry)
    assert sample_names(registry) >= MODEL_METRICS
