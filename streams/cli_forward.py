"""``propstream forward``: POST change, trigger and audience events to a webhook (docs/activation.md)."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import click

from streams.cli_common import _ensure, build_settings, fail, setting_option


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the webhook, or None.

    >>> url_problem("")
    'no webhook: set PROPSTREAM_FORWARD_URL or --url'
    >>> url_problem("ftp://x/y")
    'PROPSTREAM_FORWARD_URL must be http(s): ftp://x/y'
    >>> url_problem("https:///in"), url_problem("http://h:8080/in")
    ('PROPSTREAM_FORWARD_URL has no host: https:///in', None)
    """
    if not url:
        return "no webhook: set PROPSTREAM_FORWARD_URL or --url"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"PROPSTREAM_FORWARD_URL must be http(s): {url}"
    if not parts.hostname:
        return f"PROPSTREAM_FORWARD_URL has no host: {url}"
    return None


@click.command()
@setting_option("forward_url", "--url")
@setting_option("forward_topics", "--topics")
@setting_option("forward_group", "--group")
@setting_option("forward_batch", "--batch", type=int)
@setting_option("forward_timeout_s", "--timeout")
@setting_option("forward_attempts", "--attempts", type=int)
@setting_option("forward_backoff_s", "--backoff")
@setting_option("forward_backoff_max_s", "--backoff-max")
@setting_option("forward_metrics_port", "--metrics-port", type=int)
@click.option(
    "--start-at",
    type=click.Choice(["earliest", "latest"]),
    default="earliest",
    show_default=True,
    show_envvar=True,
    help="Where a partition without a committed offset (a new group) starts: earliest delivers what the "
    "topics still hold, so nothing is missed (the audience topic is compacted: its current members); "
    "latest only what arrives from now on. The group's committed offsets win over this.",
)
@setting_option("bootstrap", "--bootstrap")
def forward(start_at: str, **opts: str | None) -> None:
    """Deliver the change, trigger and audience events to a webhook, at least once.

    Batched JSON POSTs signed with HMAC-SHA256 (PROPSTREAM_FORWARD_SECRET, environment only, so it
    never shows in a process list), retried with exponential backoff and jitter, dead-lettered to
    PROPSTREAM_TOPIC_FORWARD_DEADLETTER after PROPSTREAM_FORWARD_ATTEMPTS tries; offsets are committed
    only after a batch is delivered or dead-lettered. Runs until SIGTERM or Ctrl-C. Several
    processes with the same group share the partitions. The contract: docs/activation.md.
    """
    from streams.forward import ForwardError, serve

    settings = build_settings(**opts)
    problem = url_problem(settings.forward_url)
    if problem is not None:
        fail(problem)
    url = urlsplit(settings.forward_url)
    if url.scheme == "http" and url.hostname not in ("localhost", "127.0.0.1", "::1"):
        click.echo(
            f"warning: {settings.forward_url} is plain http: events and their user ids cross the "
            "network unencrypted, and a signature does not hide them; use https",
            err=True,
        )
    if settings.forward_backoff_max_s < settings.forward_backoff_s:
        fail(
            f"PROPSTREAM_FORWARD_BACKOFF_MAX_S ({settings.forward_backoff_max_s:g}s) is below "
            f"PROPSTREAM_FORWARD_BACKOFF_S ({settings.forward_backoff_s:g}s)"
        )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level != "debug":  # the clients log every connection at INFO; our lines say enough
        for noisy in ("kafka", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    servers = _ensure(settings)
    try:
        asyncio.run(serve(settings, servers, start_at=start_at))
    except ForwardError as exc:
        fail(str(exc))
