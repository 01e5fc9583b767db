"""docker-compose.yml without Docker: valid against the official Compose schema, and its references exist."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, SHARED_DATA

SCHEMA = SHARED_DATA.parent / "schemas" / "compose-spec.json"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_validates_against_official_schema() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} absent (no ../shared)")
    jsonschema.validate(compose(), json.loads(SCHEMA.read_text()))


def test_compose_references_exist_and_images_are_pinned() -> None:
    doc = compose()
    services = doc["services"]
    assert {"kafka", "worker-1", "worker-2", "simulator"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in doc["volumes"], f"{name}: undeclared volume {vol}"
    host_ports = [p.split(":")[1] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_dockerfile_copies_existing_paths() -> None:
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
