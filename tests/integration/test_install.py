"""The package as the Docker image installs it: a wheel built from only what deploy/Dockerfile copies,
installed with the pinned constraints into a bare virtual env and run from outside the source tree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from streams.settings import Settings
from tests.conftest import ROOT
from tests.integration.harness import WorkerProc, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # a cold pip cache downloads ~150 MB

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PACKAGES = ("streams", "features", "models", "traffic")
# What would let the venv's Python see the source tree or another environment instead of its own.
LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_CONSTRAINT")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}


def run(cmd: list[str | Path], cwd: Path, timeout_s: float = 300) -> str:
    """Run ``cmd``; fail the test with its output unless it exits 0 (nothing is skipped)."""
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout_s
    )
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def docker_context(dest: Path) -> Path:
    """Lay out the image's /app as deploy/Dockerfile's COPY lines do: the build sees only those files."""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, target = (w for w in line.split()[1:] if not w.startswith("--"))
        for src in sources:
            path = ROOT / src
            out = dest / target / path.name if target.endswith("/") else dest / target
            if path.is_dir():
                shutil.copytree(path, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    return dest


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    build_log: str
    outside: Path  # an empty working directory, far from the repo
    sources: frozenset[str]  # the working tree's modules when the build context was copied

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def python(self, code: str) -> str:
        return run([self.bin("python"), "-c", code], self.outside)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    sources = source_modules()  # taken with the copy: the tree may change while the tests run
    context = docker_context(base / "app")
    outside = base / "elsewhere"
    outside.mkdir()
    # Build isolation fetches the [build-system] requirements as a new user's pip would.
    build_log = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", base / "dist", context], outside
    )
    (wheel,) = (base / "dist").glob("propstream-*.whl")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], outside)
    # This repo venv's pip installs into the bare venv (--python): no editable link, no source tree.
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    # --no-compile: byte-compiling numpy, scipy and scikit-learn would double the time; it is not under test.
    run([*pip, "install", "-q", "--no-compile", "-c", context / "constraints.txt", wheel], outside)
    return Installed(venv, wheel, build_log, outside, sources)


def source_modules() -> set[str]:
    """Every module and schema of the shipped packages in the working tree, as wheel paths."""
    out = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*"):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                out.add(path.relative_to(ROOT).as_posix())
    return out


def test_wheel_ships_every_module_and_schema_without_build_warnings(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {"streams/bench/command.py", "streams/schemas/event.schema.json"} <= installed.sources
    missing = installed.sources - names
    assert not missing, f"the wheel leaves out {sorted(missing)}"
    assert not {n for n in names if n.split("/")[0] in ("tests", "bench")}, "tests or benchmarks shipped"
    warnings = re.findall(r"\w*(?:Warning|DEPRECATION)\b.*", installed.build_log)
    assert not warnings, f"a new user would see setuptools warnings: {warnings}"


def test_installed_package_runs_from_the_venv_not_the_source_tree(installed: Installed) -> None:
    site = Path(installed.python("import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    files = json.loads(
        installed.python(
            "import json, importlib, importlib.resources as r; "
            f"mods = {[*PACKAGES, 'streams.bench.command']!r}; "
            "out = {m: importlib.import_module(m).__file__ for m in mods}; "
            "out['schema'] = str(r.files('streams') / 'schemas' / 'event.schema.json'); "
            "print(json.dumps(out))"
        )
    )
    for name, file in files.items():
        assert Path(file).is_relative_to(site), f"{name} imported from {file}, not from {site}"
        assert not Path(file).resolve().is_relative_to(ROOT), f"{name} imported from the source tree"
    assert json.loads(Path(files["schema"]).read_text())["title"]
    assert "worker" in run([installed.bin("propstream"), "--help"], installed.outside)
    assert "Usage: propstream bench" in run(
        [installed.bin("propstream"), "bench", "--help"], installed.outside
    )


def test_fresh_install_gets_exactly_the_pinned_versions(installed: Installed) -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    got = json.loads(
        installed.python(
            "import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
        )
    )
    got = {canonicalize_name(n): v for n, v in got.items() if canonicalize_name(n) != "propstream"}
    assert got, "nothing installed besides propstream?"
    unpinned = sorted(set(got) - set(pins))
    assert not unpinned, f"installed but not pinned in constraints.txt (run `make lock`): {unpinned}"
    assert {n: v for n, v in got.items() if pins[n] != v} == {}


class InstalledWorker(WorkerProc):
    """``<venv>/bin/propstream worker``, started from a folder outside the repo."""

    def __init__(self, installed: Installed, env: dict[str, str], data_dir: Path, log: Path) -> None:
        super().__init__(env, data_dir, log, argv=("worker",))
        self.env = {k: v for k, v in self.env.items() if k not in LEAKY_ENV}
        self.installed = installed

    def launch(self) -> InstalledWorker:
        self.proc = subprocess.Popen(
            [str(self.installed.bin("propstream")), *self.argv],
            env=self.env,
            cwd=self.installed.outside,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self


@pytest.fixture()
def installed_worker(
    installed: Installed, env: dict[str, str], settings: Settings, tmp_path: Path
) -> Iterator[InstalledWorker]:
    w = InstalledWorker(installed, env, tmp_path / "state", tmp_path / "worker.log")
    yield w
    w.kill()


def test_installed_worker_counts_what_was_produced(
    installed_worker: InstalledWorker, settings: Settings, kafka: str
) -> None:
    worker = installed_worker.start()
    now_ms = int(time.time() * 1000)
    sent = {"u-install-a": 3, "u-install-b": 5, "u-install-c": 8}
    events = [
        {"event_id": f"{u}-{i}", "user_id": u, "type": "page_view", "ts": now_ms - 3_600_000 + i * 1000}
        for u, n in sent.items()
        for i in range(n)
    ]
    assert produce(kafka, lambda ev: settings.topic_clickstream, events) == 16

    seen: dict[str, int | None] = {}

    def counted() -> bool:
        seen.update({u: (worker.features(u) or {}).get("events") for u in sent})
        return seen == sent

    try:
        wait_until(counted, 90, what=f"the installed worker to count {sent}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; counted {seen}; log:\n{worker.log.read_text()[-3000:]}") from None
    for u, n in sent.items():
        assert worker.features(u)["features"]["n_page_view_24h"] == n
    assert worker.metric("propstream_events_accepted_total") == 16
    assert worker.metric("propstream_events_rejected_total") == 0
