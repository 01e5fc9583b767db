"""``propstream demo``: broker, worker, traffic and score changes on one screen, for a newcomer.

Streams a month of simulated history, compressed, into a fresh worker: the trainer learns from the
labels as they mature, the models leave warm-up, and from then on every printed line below the
totals is a propensity-change event as a downstream system receives it. Each run has its own
topics, consumer group and state, removed again on exit, so runs never interfere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from streams.cli_common import DURATION_HELP, Duration, _ensure, build_settings, fail, stop_broker_after
from streams.cli_models import format_change
from streams.settings import Settings, env_name


@click.command()
@click.option(
    "--users",
    default=500,
    show_default=True,
    envvar="PROPSTREAM_SIM_USERS",
    show_envvar=True,
    help="Simulated users.",
)
@click.option(
    "--days",
    type=Duration("d"),
    default=30.0,
    show_default=True,
    envvar="PROPSTREAM_SIM_DAYS",
    show_envvar=True,
    help=f"Event time simulated: {DURATION_HELP} (plain number: days).",
)
@click.option(
    "--rate",
    default=1500.0,
    show_default=True,
    envvar="PROPSTREAM_SIM_RATE",
    show_envvar=True,
    help="Events per second.",
)
@click.option(
    "--duration",
    type=Duration(),
    default=None,
    envvar="PROPSTREAM_DEMO_DURATION",
    show_envvar=True,
    help=f"Stop after this long: {DURATION_HELP} (plain number: seconds; default: until Ctrl-C).",
)
@click.option(
    "--show", "n_show", default=4, show_default=True, show_envvar=True, help="Change events shown per tick."
)
@click.option(
    "--keep-broker",
    is_flag=True,
    show_envvar=True,
    help="Leave running the local broker this demo starts (one already running is always left).",
)
def demo(
    users: int, days: float, rate: float, duration: float | None, n_show: int, keep_broker: bool
) -> None:
    """Start Kafka and a worker, stream simulated traffic, and show models learning and scores changing."""
    from streams.broker import BrokerError, LocalBroker

    run = f"demo-{int(time.time())}"
    overrides = {
        "app_id": run,
        "topic_clickstream": f"{run}.clickstream",
        "topic_cart": f"{run}.cart",
        "topic_purchase": f"{run}.purchase",
        "topic_deadletter": f"{run}.deadletter",
        "topic_changes": f"{run}.changes",
        "topic_training": f"{run}.training",
        "topic_models": f"{run}.models",
    }
    settings = build_settings(**overrides, data_dir=build_settings().home / run)
    own_broker = False
    if not settings.bootstrap:
        b = LocalBroker(settings)
        own_broker = stop_broker_after(bootstrap="", was_running=b.read_state() is not None, keep=keep_broker)
        click.echo("1/3 starting Kafka (the first run downloads it, about a minute) ...")
        try:
            state = b.start()
        except BrokerError as exc:
            fail(str(exc))
        click.echo(f"    Kafka on {state.bootstrap}")
    servers = _ensure(settings)
    click.echo(f"2/3 starting a worker (HTTP on http://{settings.web_host}:{settings.web_port}) ...")
    log_path = settings.home / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        env_name("bootstrap"): servers,
        env_name("data_dir"): str(settings.state_dir),
        **{env_name(k): v for k, v in overrides.items()},
    }
    wproc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker"],
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stop = threading.Event()
    published: list[int] = []  # the count, once traffic has ended

    def produce() -> None:
        from streams.producer import publish
        from traffic.simulator import SimConfig, simulate

        def events() -> Any:
            for ev in simulate(SimConfig(users=users, days=days, seed=int(time.time()))):
                if stop.is_set():
                    return
                yield ev

        published.append(publish(events(), settings, bootstrap=servers, rate=rate))

    changes = _ChangeFeed(servers, settings.topic_changes)
    try:
        _wait_http(settings, wproc, log_path)
        click.echo(
            f"3/3 streaming {days:g} days of simulated history for {users:,} users at {rate:,.0f} events/s.\n"
            f"    Models learn as labels mature (7 days for purchase, 14 for churn, in event time) and\n"
            f"    leave warm-up after {settings.min_positives} positive and {settings.min_negatives} negative"
            " labels; then score changes appear below. Ctrl-C stops.\n"
        )
        threading.Thread(target=produce, daemon=True).start()
        t_end = time.monotonic() + duration if duration else None
        url = f"http://{settings.web_host}:{settings.web_port}"
        log = StatusLog(f"curl -s {url}/models ; {url}/users/<id> for a user's features and scores")
        while t_end is None or time.monotonic() < t_end:
            time.sleep(3)
            for line in log.tick(
                time.strftime("%H:%M:%S"), _status(settings), published[0] if published else None
            ):
                click.echo(line)
            for ch in changes.poll()[-n_show:]:
                click.echo("    " + format_change(ch))
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
    finally:
        stop.set()
        changes.close()
        wproc.send_signal(signal.SIGTERM)
        try:
            wproc.wait(30)
        except subprocess.TimeoutExpired:
            wproc.kill()
        _drop_run(servers, run, settings.state_dir)
        if own_broker:
            LocalBroker(settings).stop()
        elif not settings.bootstrap:
            click.echo("the local broker keeps running (`propstream broker stop` stops it)")
        click.echo(f"stopped (worker log: {log_path})")


@dataclass(frozen=True)
class Status:
    """What the worker reports on one tick: totals of its counters and each target's model."""

    consumed: int
    rejected: int
    labels: int
    changes: int
    models: str

    def line(self) -> str:
        return (
            f"{self.consumed:,} events, {self.rejected:,} rejected, {self.labels:,} labels matured, "
            f"{self.changes:,} changes | {self.models}"
        )


class StatusLog:
    """The lines one tick prints: a status line only when it changed, one summary when traffic is done.

    Once traffic has ended nothing moves but the odd model version, so repeating the line every
    tick would only bury the one change that matters. ``hint`` says how to keep exploring.
    """

    def __init__(self, hint: str) -> None:
        self.hint = hint
        self.last: str | None = None
        self.summarised = False

    def tick(self, clock: str, status: Status | None, published: int | None) -> list[str]:
        """``status``: None when the worker does not answer; ``published``: the count once traffic ended."""
        text = status.line() if status is not None else "worker: not answering yet"
        lines = [] if text == self.last else [f"{clock} {text}"]
        self.last = text
        caught_up = status is not None and published is not None and status.consumed >= published
        if caught_up and not self.summarised:
            self.summarised = True
            lines = [
                f"{clock} {text}",
                f"\ntraffic done: {published:,} events published, all consumed. The worker keeps serving:",
                f"    {self.hint}",
                "Only changes are printed from now on. Ctrl-C stops.\n",
            ]
        return lines


class _ChangeFeed:
    """The demo's own outside consumer of the change topic: what a downstream system sees."""

    def __init__(self, servers: str, topic: str) -> None:
        from kafka import KafkaConsumer

        self.consumer = KafkaConsumer(
            topic,
            bootstrap_servers=servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",  # an exactly-once worker's outputs, once committed
        )

    def poll(self) -> list[dict[str, Any]]:
        out = []
        for records in self.consumer.poll(timeout_ms=200, max_records=5000).values():
            for r in records:
                try:
                    out.append(json.loads(r.value))
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        self.consumer.close()


def _get(settings: Settings, path: str) -> Any:
    with urllib.request.urlopen(f"http://{settings.web_host}:{settings.web_port}{path}", timeout=2) as r:
        return json.loads(r.read()) if path != "/metrics" else r.read().decode()


def _status(settings: Settings) -> Status | None:
    """Events in, rejects, labels, model versions (or warm-up progress), change events; None: no answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = _get(settings, "/metrics")
        models = _get(settings, "/models")["models"]
    except OSError:
        return None
    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_total"):
                sums[s.name] = sums.get(s.name, 0.0) + s.value

    def get(name: str) -> int:
        return int(sums.get(f"propstream_{name}_total", 0))

    shown = []
    for name, m in models.items():
        if m["warming_up"]:
            shown.append(f"{name} warming up ({m['positives']}+/{m['negatives']}-)")
        else:
            auc = m["quality"].get("roc_auc")
            shown.append(f"{name} v{m['version']}" + (f" auc {auc:.2f}" if auc is not None else ""))
    return Status(
        get("events_consumed"),
        get("events_rejected"),
        get("labels_matured"),
        get("change_events"),
        ", ".join(shown),
    )


def _drop_run(servers: str, prefix: str, state_dir: Path) -> None:
    """Delete a demo run's topics (events, dead letters, changelogs, models) and its local state."""
    import shutil

    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    shutil.rmtree(state_dir, ignore_errors=True)
    try:
        admin = KafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=10000)
        try:
            admin.delete_topics([t for t in admin.list_topics() if t.startswith(prefix)])
        finally:
            admin.close()
    except KafkaError as exc:
        click.echo(f"could not delete the demo topics ({exc}); they start with {prefix}", err=True)


def _wait_http(
    settings: Settings, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 90
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the worker exited ({proc.returncode}); see {log_path}")
        try:
            _get(settings, "/healthz")
            return
        except OSError:
            time.sleep(0.5)
    fail(f"the worker did not answer within {timeout_s:.0f}s; see {log_path}")
