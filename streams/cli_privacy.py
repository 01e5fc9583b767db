"""``propstream forget USER``: erase a user everywhere and wait for the worker's confirmation."""

from __future__ import annotations

import json
import time
import uuid

import click

from streams.cli_common import DURATION_HELP, Duration, _ensure, build_settings, fail, setting_option


@click.command()
@click.argument("user")
@click.option(
    "--timeout",
    "timeout_s",
    type=Duration(),
    default=60.0,
    show_default=True,
    show_envvar=True,
    help=f"How long to wait for the confirmation: {DURATION_HELP} (plain number: seconds).",
)
@setting_option("bootstrap", "--bootstrap")
def forget(user: str, timeout_s: float, bootstrap: str | None) -> None:
    """Erase USER: features, score state and pending labels, with tombstones on every changelog."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from streams.privacy import erasure_request

    settings = build_settings(bootstrap=bootstrap)
    servers = _ensure(settings)
    request_id = uuid.uuid4().hex
    done = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, consumer_timeout_ms=1000)
    tps = [
        TopicPartition(settings.topic_erasure_done, p)
        for p in done.partitions_for_topic(settings.topic_erasure_done) or ()
    ]
    done.assign(tps)
    for tp, end in done.end_offsets(tps).items():
        done.seek(tp, end)  # only confirmations from now on
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    producer.send(settings.topic_erasure, key=user.encode(), value=erasure_request(user, request_id)).get(
        timeout=30
    )
    producer.close()
    click.echo(
        f"erasure of {user!r} requested (request {request_id}); waiting for the owning worker ...", err=True
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in done:
                body = json.loads(msg.value)
                if body.get("request_id") == request_id:
                    removed = ", ".join(body["removed"]) or "nothing (no state was kept for this user)"
                    click.echo(f"erased by {body['served_by']}: {removed}; tombstones written")
                    return
    finally:
        done.close()
    fail(f"no confirmation within {timeout_s:.0f}s: is a worker running? (request {request_id} stays queued)")
