"""Fetch, start, probe and stop a single-node Apache Kafka (KRaft) from the official Maven Central jars.

The demo, the CLI and the test suite all use this one class, so what the tests run is what a
newcomer runs. Nothing is installed system-wide: the jars and the broker's data live under
``settings.home``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.settings import Settings

LOGGING_DEPS = (("org.slf4j", "slf4j-reload4j", "1.7.36"), ("ch.qos.reload4j", "reload4j", "1.2.25"))


class BrokerError(RuntimeError):
    """A problem the user can act on; the message says what to do."""


def free_port() -> int:
    """A port the kernel says is free right now (bind to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _java_major() -> int | None:
    java = shutil.which("java")
    if not java:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalBroker:
    """One KRaft broker+controller on 127.0.0.1, its files under ``data_dir``."""

    def __init__(self, settings: Settings, *, port: int | None = None, data_dir: Path | None = None) -> None:
        self.settings = settings
        self.version = settings.kafka_version
        self.jars_dir = settings.home / f"kafka-{self.version}" / "libs"
        self.data_dir = data_dir or settings.home / "broker"
        self.port = settings.broker_port if port is None else port
        self.state_file = self.data_dir / "broker.json"
        self.log_file = self.data_dir / "broker.log"

    # --- installation ------------------------------------------------------------------------
    def check_tools(self, *, need_maven: bool) -> None:
        major = _java_major()
        if major is None or major < 17:
            found = "no java on PATH" if major is None else f"found Java {major}"
            msg = (
                f"Java 17+ is needed to run the local Kafka broker ({found}): install it, e.g. "
                "`apt-get install openjdk-17-jre-headless`, or point PROPSTREAM_BOOTSTRAP at a cluster."
            )
            raise BrokerError(msg)
        if need_maven and not shutil.which("mvn"):
            msg = (
                "Maven is needed once to fetch the Kafka jars: install it, e.g. `apt-get install maven`, "
                "or set PROPSTREAM_BOOTSTRAP to an existing cluster."
            )
            raise BrokerError(msg)

    def installed(self) -> bool:
        return (self.jars_dir / f"kafka_2.13-{self.version}.jar").exists()

    def fetch(self) -> Path:
        """Download Kafka and a logging backend from Maven Central once; later calls are no-ops."""
        if self.installed():
            return self.jars_dir
        self.check_tools(need_maven=True)
        work = self.jars_dir.parent
        work.mkdir(parents=True, exist_ok=True)
        deps = [("org.apache.kafka", "kafka_2.13", self.version), *LOGGING_DEPS]
        dep_xml = "".join(
            f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
            for g, a, v in deps
        )
        (work / "pom.xml").write_text(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            "<groupId>io.propstream</groupId><artifactId>kafka-jars</artifactId><version>1</version>"
            f"<packaging>pom</packaging><dependencies>{dep_xml}</dependencies></project>"
        )
        tmp = work / "libs.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"propstream: fetching Apache Kafka {self.version} jars from Maven Central (once) ...",
            file=sys.stderr,
        )
        proc = subprocess.run(
            ["mvn", "-B", "-q", "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            msg = f"Maven could not fetch Kafka {self.version}:\n" + "\n".join(tail)
            raise BrokerError(msg)
        shutil.rmtree(self.jars_dir, ignore_errors=True)
        tmp.rename(self.jars_dir)
        print(
            f"propstream: {len(list(self.jars_dir.glob('*.jar')))} jars in {self.jars_dir}", file=sys.stderr
        )
        return self.jars_dir

    # --- lifecycle ---------------------------------------------------------------------------
    def read_state(self) -> BrokerState | None:
        try:
            raw = json.loads(self.state_file.read_text())
            state = BrokerState(int(raw["pid"]), int(raw["port"]), int(raw["controller_port"]))
        except (OSError, ValueError, KeyError):
            return None
        return state if _pid_alive(state.pid) else None

    def bootstrap(self) -> str:
        state = self.read_state()
        if state is None:
            msg = (
                "no local Kafka broker is running: start one with `propstream broker start`, "
                "or set PROPSTREAM_BOOTSTRAP to an existing cluster."
            )
            raise BrokerError(msg)
        return state.bootstrap

    def _write_config(self, port: int, controller_port: int) -> Path:
        partitions = self.settings.partitions
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "kraft-logs"),
            "num.partitions": str(partitions),
            # Topics are created deliberately (streams.topics) so partition counts always match.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "-1",
            "log.retention.bytes": "-1",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        cfg = self.data_dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, out\n"
            "log4j.appender.out=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.out.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.out.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka=INFO\nlog4j.logger.org.apache.kafka=INFO\n"
            "log4j.logger.state.change.logger=WARN\nlog4j.logger.kafka.request.logger=WARN\n"
        )
        return cfg

    def _java_cmd(self, main: str, *args: str, heap_mb: int) -> list[str]:
        return [
            "java",
            f"-Xmx{heap_mb}m",
            f"-Xms{min(heap_mb, 256)}m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            str(self.jars_dir / "*"),
            main,
            *args,
        ]

    def start(self, *, timeout_s: float = 90.0) -> BrokerState:
        """Start the broker (fetching jars and formatting storage when needed) and wait until it serves."""
        running = self.read_state()
        if running is not None:
            return running
        self.check_tools(need_maven=not self.installed())
        self.fetch()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        meta = self.data_dir / "kraft-logs" / "meta.properties"
        previous = self._previous_ports()
        port = previous[0] if previous and self.port == 0 else (self.port or free_port())
        controller_port = previous[1] if previous else free_port()
        cfg = self._write_config(port, controller_port)
        if not meta.exists():
            cluster_id = uuid.uuid4().hex[:22]
            fmt = subprocess.run(
                self._java_cmd(
                    "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(cfg), heap_mb=256
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                msg = f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}"
                raise BrokerError(msg)
        log = self.log_file.open("ab")
        proc = subprocess.Popen(
            self._java_cmd("kafka.Kafka", str(cfg), heap_mb=self.settings.broker_heap_mb),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal must not kill the broker mid-write
        )
        state = BrokerState(proc.pid, port, controller_port)
        self.state_file.write_text(
            json.dumps({"pid": proc.pid, "port": port, "controller_port": controller_port})
        )
        self._wait_ready(state, proc, timeout_s)
        return state

    def _previous_ports(self) -> tuple[int, int] | None:
        """Ports of an earlier run on the same data: the KRaft quorum address must not change."""
        try:
            raw = json.loads(self.state_file.read_text())
            return int(raw["port"]), int(raw["controller_port"])
        except (OSError, ValueError, KeyError):
            return None

    def _wait_ready(self, state: BrokerState, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                msg = f"Kafka exited with code {proc.returncode}; last log lines:\n{self.log_tail()}"
                raise BrokerError(msg)
            try:
                # a bootstrap that begins before a restarted broker has registered (about 15 s
                # after a SIGKILL) would wait out kafka-python's default 30 s: probe every 3 s
                admin = KafkaAdminClient(
                    bootstrap_servers=state.bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except (KafkaError, OSError, ValueError):
                time.sleep(0.5)
        self.stop()
        msg = f"Kafka did not accept requests within {timeout_s:.0f}s; last log lines:\n{self.log_tail()}"
        raise BrokerError(msg)

    def stop(self, *, timeout_s: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after ``timeout_s``). False if none ran."""
        state = self.read_state()
        if state is None:
            return False
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(state.pid):
            os.kill(state.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(state.pid, os.WNOHANG)
        return True

    def kill(self) -> None:
        """SIGKILL the broker, as a crashing machine would."""
        state = self.read_state()
        if state is not None:
            os.kill(state.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state.pid, 0)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
