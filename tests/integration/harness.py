"""Real processes for integration tests: the worker runs as `propstream worker` in its own process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from streams.broker import free_port

ROOT = Path(__file__).resolve().parents[2]

# Faust's own settings, read from the environment: a SIGKILLed member leaves the consumer group after
# the session timeout (Faust's default: 60 s), so kill tests shorten it to keep CI time reasonable:
# 6 s is the least the broker accepts (group.min.session.timeout.ms), with a heartbeat every second.
FAST_FAILOVER = {"BROKER_SESSION_TIMEOUT": "6", "BROKER_HEARTBEAT_INTERVAL": "1"}


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
        self.launch()
        wait_until(self.ready, timeout_s, what=f"worker on {self.url} to be ready (log {self.log})")
        return self

    def launch(self) -> WorkerProc:
        """Start the process without waiting for it to be ready (a kill may come at any point)."""
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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

    def cli(self, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
        """Run ``propstream ARGS`` with this worker's environment (its topics, broker, settings)."""
        return subprocess.run(
            [sys.executable, "-m", "streams.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        try:
            req = urllib.request.Request(self.url + path, headers=headers or {})
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
                return r.status, json.loads(
                    body
                ) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident set size of the worker process now (VmRSS in /proc), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def listening_addresses(self) -> set[str]:
        """IPv4 addresses the worker listens on at its web port (from /proc/<pid>/net/tcp)."""
        out = set()
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{self.pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, port = local.split(":")
                if state == "0A" and int(port, 16) == self.port:  # 0A: LISTEN
                    if len(addr) == 8:
                        out.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
                    else:
                        out.add("::" if int(addr, 16) == 0 else addr)
        return out

    def connections_to(self, port: int) -> int:
        """TCP connections of the worker process (its own sockets, by inode) established to ``port``."""
        inodes = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        n = 0
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{self.pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                cols = line.split()
                remote, state, inode = cols[2], cols[3], cols[9]
                if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                    n += 1  # 01: ESTABLISHED
        return n

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
        isolation_level="read_committed",
    )
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            out.extend(c)
    finally:
        c.close()
    return out


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every message of ``topic`` up to its end offsets now (all partitions), in partition order."""
    from kafka import TopicPartition

    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        isolation_level="read_committed",  # what an exactly-once worker committed (no effect otherwise)
    )
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(c.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout_s:.0f}s")
            for batch in c.poll(timeout_ms=500).values():
                out.extend(batch)
        return out
    finally:
        c.close()


class Traffic(threading.Thread):
    """An outside producer publishing ``events`` in order at about ``rate`` events/s, in the background.

    ``sent`` counts events handed to the producer so far; the test kills and restarts processes
    while this runs, and ``join()`` returns once every event is acknowledged by the broker.
    ``hurry()`` sends the rest without pacing, once the test has done what needed a steady flow.
    """

    def __init__(
        self,
        bootstrap: str,
        topic_of: Callable[[dict[str, Any]], str],
        events: Sequence[dict[str, Any]],
        rate: float,
    ) -> None:
        super().__init__(daemon=True)
        self.bootstrap = bootstrap
        self.topic_of = topic_of
        self.events = events
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # retries: the broker restart test takes the broker away while this runs
            p = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                linger_ms=5,
                retries=1_000_000,
                retry_backoff_ms=200,
                max_in_flight_requests_per_connection=1,  # retries must not reorder a user's events
                request_timeout_ms=10_000,
                max_block_ms=120_000,
            )
            t0 = time.monotonic()
            for ev in self.events:
                p.send(self.topic_of(ev), key=str(ev["user_id"]).encode(), value=json.dumps(ev).encode())
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            p.flush(timeout=180)
            p.close()
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def hurry(self) -> None:
        """Send the remaining events as fast as the producer takes them (same order, same producer)."""
        self.rate = float("inf")

    def finish(self, timeout_s: float = 240.0) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), "traffic did not finish"
        if self.error is not None:
            raise self.error

    @property
    def done(self) -> bool:
        return self.sent >= len(self.events)


def run_seed(env_var: str = "TEST_SEED") -> int:
    """A random seed for this run, or the one ``env_var`` names (to replay a failure); printed."""
    raw = os.environ.get(env_var)
    seed = int(raw) if raw else int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed} (replay: {env_var}={seed})")
    return seed


def random_pause(rng: random.Random, low_s: float, high_s: float) -> float:
    """Sleep a random time in [low_s, high_s) (a random point of the stream); returns it."""
    pause = rng.uniform(low_s, high_s)
    time.sleep(pause)
    return pause


def user_router(source_topics: Sequence[str]) -> Callable[[dict[str, Any]], str]:
    """Each user's events all go to one source topic (chosen by a stable hash of the user id).

    The worker accepts any type on any source topic. One topic per user makes each user's arrival
    order the produced order, so two runs over the same events sample the same label snapshots;
    spread over all three topics, every partition's watermark (minimum over topics) still moves.
    """
    import zlib

    def topic_of(ev: dict[str, Any]) -> str:
        return source_topics[zlib.crc32(str(ev["user_id"]).encode()) % len(source_topics)]

    return topic_of


def consented_by_user(events: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events per user that features count (those without personalisation consent are set aside)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        if (ev.get("consent") or {}).get("personalization", True) is not False:
            out.setdefault(str(ev["user_id"]), []).append(ev)
    return out


def pending_snapshots(worker: WorkerProc, users: list[str]) -> dict[tuple[str, str], int]:
    """Per (user, target): snapshots waiting for their label, as the worker's lookup reports them."""
    out = {}
    for u in users:
        status, body = worker.get(f"/users/{u}")
        assert status == 200, (u, body)
        for target, s in body["scores"].items():
            out[(u, target)] = s["pending_snapshots"]
    return out


def uncommitted(bootstrap: str, group: str, topics: Sequence[str]) -> dict[str, int]:
    """Per topic: messages written that ``group`` has not committed yet (``{}``: it has them all).

    A Faust worker flushes its producer (changelogs, outputs) before it commits source offsets, so
    once its group has committed every message of its input topics, everything it wrote for them
    is in Kafka. Topics are taken in order, each one's end offsets read *after* the previous
    topic's commits: list the sources before the topics the worker writes and reads again (the
    training log), and the later ones' ends include what the earlier ones caused.
    """
    from kafka import TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        behind: dict[str, int] = {}
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
            assert tps, f"no partitions for {topic}"
            ends = c.end_offsets(tps)
            gaps = {tp: (c.committed(tp) or 0, ends[tp]) for tp in tps if ends[tp] > (c.committed(tp) or 0)}
            missing = records_between(bootstrap, gaps)
            if missing:
                behind[topic] = missing
        return behind
    finally:
        c.close()


def records_between(bootstrap: str, gaps: dict[Any, tuple[int, int]], timeout_s: float = 10.0) -> int:
    """How many committed records lie in each partition's [start, end) offsets. Not simply end - start:
    a transaction's commit marker takes an offset of its own, and no consumer ever receives (or
    commits past) it, so a group that read everything of a transactional topic stays one behind."""
    if not gaps:
        return 0
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    try:
        c.assign(list(gaps))
        for tp, (start, _) in gaps.items():
            c.seek(tp, start)
        n = 0
        deadline = time.monotonic() + timeout_s
        while any(c.position(tp) < end for tp, (_, end) in gaps.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {sorted(gaps)} to their end within {timeout_s:.0f}s")
            for tp, batch in c.poll(timeout_ms=200).items():
                n += sum(1 for m in batch if m.offset < gaps[tp][1])
        return n
    finally:
        c.close()


def wait_settled(bootstrap: str, group: str, topics: Sequence[str], timeout_s: float = 60.0) -> None:
    """Wait until ``group`` has committed every message of ``topics`` (see :func:`uncommitted`)."""
    behind: dict[str, int] = {}

    def settled() -> bool:
        behind.clear()
        behind.update(uncommitted(bootstrap, group, topics))
        return not behind

    try:
        wait_until(settled, timeout_s, every_s=0.5, what=f"group {group} to commit all of {list(topics)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; messages not committed per topic: {behind}") from None
