"""One real Kafka broker per test session (free ports), and per-test topics, groups and workers."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.broker import LocalBroker, free_port
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.harness import WorkerProc


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings()  # jar cache from PROPSTREAM_HOME or ~/.cache/propstream, shared across runs
    broker = LocalBroker(settings, port=free_port(), data_dir=tmp_path_factory.mktemp("kafka"))
    state = broker.start(timeout_s=120)
    yield state.bootstrap
    broker.stop()


@pytest.fixture()
def env(kafka: str) -> dict[str, str]:
    """Environment of one test: unique topics, consumer group and changelogs on the session broker."""
    uid = uuid.uuid4().hex[:8]
    return {
        "PROPSTREAM_BOOTSTRAP": kafka,
        "PROPSTREAM_APP_ID": f"ps-{uid}",
        "PROPSTREAM_TOPIC_CLICKSTREAM": f"{uid}.clickstream",
        "PROPSTREAM_TOPIC_CART": f"{uid}.cart",
        "PROPSTREAM_TOPIC_PURCHASE": f"{uid}.purchase",
        "PROPSTREAM_TOPIC_DEADLETTER": f"{uid}.deadletter",
        "PROPSTREAM_TOPIC_CHANGES": f"{uid}.changes",
        "PROPSTREAM_TOPIC_TRIGGERS": f"{uid}.triggers",
        "PROPSTREAM_TOPIC_TRAINING": f"{uid}.training",
        "PROPSTREAM_TOPIC_MODELS": f"{uid}.models",
        "PROPSTREAM_TOPIC_ERASURE": f"{uid}.erasure",
        "PROPSTREAM_TOPIC_ERASURE_DONE": f"{uid}.erasure.done",
        "PROPSTREAM_TOPIC_AUDIENCES": f"{uid}.audiences",
        "PROPSTREAM_TOPIC_FORWARD_DEADLETTER": f"{uid}.forward.deadletter",
        "PROPSTREAM_LOG_LEVEL": "info",  # rebalances and recovery: a failing test prints the tail
    }


@pytest.fixture()
def settings(env: dict[str, str]) -> Settings:
    s = Settings(**{k.removeprefix("PROPSTREAM_").lower(): v for k, v in env.items()})
    ensure_topics(s)
    return s


@pytest.fixture()
def make_worker(
    env: dict[str, str], settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProc]]:
    workers: list[WorkerProc] = []

    def make(name: str = "w1", **extra: Any) -> WorkerProc:
        w = WorkerProc(
            {**env, **{k: str(v) for k, v in extra.items()}}, tmp_path / name, tmp_path / f"{name}.log"
        )
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.kill()
    report = getattr(request.node, "propstream_call_report", None)
    if report is not None and report.failed:  # CI keeps no tmp dirs: the logs go into the report
        for w in workers:
            tail = w.log.read_text(errors="replace")[-15000:] if w.log.exists() else "(no log)"
            sys.stderr.write(f"\n----- {w.log.name} (last 15000 chars) -----\n{tail}\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the call phase's report on the item, so ``make_worker`` knows in teardown it failed."""
    report = yield
    if report.when == "call":
        item.propstream_call_report = report  # type: ignore[attr-defined]
    return report
