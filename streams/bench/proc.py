"""One worker subprocess of the benchmark: start, wait until ready, read its metrics and memory, stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from streams.broker import free_port


def wait_until(check: Callable[[], Any], timeout_s: float, every_s: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    msg = f"timed out after {timeout_s:.0f}s waiting for {what}"
    raise TimeoutError(msg)


def cpu_s_of(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used so far; NaN if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Proc:
    """``python -m <module> ...`` with its own HTTP port and state folder; log to a file."""

    def __init__(self, env: dict[str, str], data_dir: Path, log: Path, argv: tuple[str, ...]) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            **env,
            "PROPSTREAM_WEB_PORT": str(self.port),
            "PROPSTREAM_DATA_DIR": str(data_dir),
        }
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proc:
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, path: str = "/readyz", timeout_s: float = 300.0) -> float:
        """Seconds until ``path`` answers 200 with a true ``ready`` (or any JSON for other paths)."""
        t0 = time.perf_counter()
        wait_until(lambda: self._ready(path), timeout_s, what=f"{self.url}{path} (log {self.log})")
        return time.perf_counter() - t0

    def _ready(self, path: str) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            msg = f"{self.argv} exited with {self.proc.returncode}; log:\n{self.log.read_text()[-3000:]}"
            raise RuntimeError(msg)
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return bool(json.loads(r.read()).get("ready", True))
        except (OSError, ValueError):
            return False

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` on the worker's /metrics whose labels include ``labels``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def cpu_s(self) -> float:
        """CPU seconds (user + system, every thread) the process has used so far, from /proc.

        NaN when it cannot be read (no such process, no /proc), so a rate from it shows as missing.
        """
        return math.nan if self.proc is None else cpu_s_of(self.proc.pid)

    def rss_mb(self) -> float:
        """Resident memory now, MiB (from /proc)."""
        if self.proc is None:
            return 0.0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def time_to_ready(w: Proc) -> float:
    """Seconds from starting ``w`` until it is ready (tables restored, partitions assigned)."""
    w.start()
    try:
        return w.wait_ready()
    finally:
        w.stop()
