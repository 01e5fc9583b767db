"""Real processes for integration tests: the worker runs as `propstream worker` in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from streams.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_until(
    check: Callable[[], Any], timeout_s: float = 60.0, every_s: float = 0.25, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what or check} (last: {last!r})")


class WorkerProc:
    """One `propstream worker` subprocess with its own port and state folder."""

    def __init__(
        self,
        env: dict[str, str],
        data_dir: Path,
        log: Path,
        argv: tuple[str, ...] = ("-m", "streams.cli", "worker"),
    ) -> None:
        self.argv = argv
        self.port = free_port()
        self.env = {
            **os.environ,
            **env,
            "PROPSTREAM_WEB_PORT": str(self.port),
            "PROPSTREAM_DATA_DIR": str(data_dir),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> WorkerProc:
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self.ready, timeout_s, what=f"worker on {self.url} to be ready (log {self.log})")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"worker exited with {self.proc.returncode}; log:\n{self.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                return bool(json.loads(r.read())["ready"])
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                body = r.read()
                return r.status, json.loads(
                    body
                ) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def features(self, user: str, as_of: int | None = None) -> dict[str, Any] | None:
        status, body = self.get(f"/users/{user}/features" + (f"?as_of={as_of}" if as_of else ""))
        return body if status == 200 else None

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _, text = self.get("/metrics")
        total = 0.0
        for fam in text_string_to_metric_families(text.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


def produce(
    bootstrap: str, topic_of: Callable[[dict[str, Any]], str], events: Iterable[dict[str, Any]]
) -> int:
    """Publish as an outside producer would: kafka-python, key = user id, JSON value."""
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    n = 0
    for ev in events:
        p.send(topic_of(ev), key=str(ev["user_id"]).encode(), value=json.dumps(ev).encode())
        n += 1
    p.flush()
    p.close()
    return n


def consume_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """Read ``topic`` from the beginning until ``expect`` messages arrived (or time runs out)."""
    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            out.extend(c)
    finally:
        c.close()
    return out
