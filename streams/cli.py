"""The ``propstream`` command: broker, worker, traffic, lookups and the demo.

Every option falls back to an environment variable (shown in ``--help``); options that mirror a
settings field use that field's ``PROPSTREAM_*`` variable, so the CLI and the settings object
can never disagree.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import click

from streams import cli_audience, cli_models, cli_score
from streams.bench.command import bench_cmd
from streams.cli_common import (
    DURATION_HELP,
    Duration,
    _ensure,
    build_settings,
    cli_env_names,
    fail,
    setting_option,
)
from streams.cli_forward import forward
from streams.cli_privacy import forget
from streams.demo import demo
from streams.settings import Settings, unknown_env

_HELP_ASKED = "propstream.help_asked"


class _Main(click.Group):
    """The root group; notes a help request, so that a bad environment never blocks ``--help``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # the group callback runs before the subcommand parses its own --help, so look now
        ctx.meta[_HELP_ASKED] = any(a in ctx.help_option_names for a in args)
        return super().parse_args(ctx, args)


@click.group(
    cls=_Main,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 110,
        # options without an explicit variable read PROPSTREAM_<COMMAND>_<OPTION>, shown in --help
        "auto_envvar_prefix": "PROPSTREAM",
    },
)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Real-time propensity scoring on Kafka: events in, rolling features, score changes out."""
    if ctx.meta.get(_HELP_ASKED) or ctx.resilient_parsing:
        return
    # a misspelt variable would otherwise be ignored without a word (pydantic-settings and click
    # both skip names they do not know), so refuse it before any command reaches a broker
    problems = unknown_env(sorted(os.environ), cli_env_names(ctx.command))
    if problems:
        raise click.UsageError("\n".join(problems))


# --- broker ---------------------------------------------------------------------------------
@main.group()
def broker() -> None:
    """Run a local single-node Apache Kafka (KRaft) from the official jars."""


def _local(port: int | None) -> Any:
    from streams.broker import LocalBroker

    return LocalBroker(build_settings(broker_port=port))


@broker.command("start")
@setting_option("broker_port", "--port", type=int)
def broker_start(broker_port: int | None) -> None:
    """Fetch the jars (once), format storage (once), start the broker and wait until it serves."""
    from streams.broker import BrokerError

    b = _local(broker_port)
    try:
        state = b.start()
    except BrokerError as exc:
        fail(str(exc))
    click.echo(f"Kafka {b.version} running: pid {state.pid}, bootstrap {state.bootstrap}, log {b.log_file}")


@broker.command("stop")
@setting_option("broker_port", "--port", type=int)
def broker_stop(broker_port: int | None) -> None:
    """Stop the local broker (SIGTERM, then SIGKILL after 30 s)."""
    click.echo("stopped" if _local(broker_port).stop() else "no local broker was running")


@broker.command("status")
@setting_option("broker_port", "--port", type=int)
def broker_status(broker_port: int | None) -> None:
    """Say whether the local broker runs, where, and its data folder. Exit 1 when it does not."""
    b = _local(broker_port)
    state = b.read_state()
    if state is None:
        click.echo(f"not running (data: {b.data_dir})")
        sys.exit(1)
    click.echo(f"running: pid {state.pid}, bootstrap {state.bootstrap}, data {b.data_dir}, log {b.log_file}")


@broker.command("logs")
@click.option("-n", "lines", default=40, show_default=True, help="How many lines.", show_envvar=True)
def broker_logs(lines: int) -> None:
    """Print the end of the local broker's log."""
    click.echo(_local(None).log_tail(lines))


# --- worker ---------------------------------------------------------------------------------
@main.command()
@setting_option("web_port", "--web-port", type=int)
@setting_option("web_host", "--web-host")
@setting_option("data_dir", "--data-dir", type=click.Path(path_type=Path))
@setting_option("bootstrap", "--bootstrap")
@setting_option("log_level", "--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def worker(**opts: Any) -> None:
    """Run a stream worker: consume events, keep features, serve lookups on HTTP."""
    from faust.worker import Worker

    from streams.app import create_app
    from streams.broker import BrokerError
    from streams.topics import TopicMismatch, ensure_topics

    settings = build_settings(**opts)
    try:
        servers = settings.broker_url
        ensure_topics(settings, servers)
    except (BrokerError, TopicMismatch) as exc:
        fail(str(exc))
    app = create_app(settings, servers)
    click.echo(
        f"propstream worker: broker {servers}, state {settings.state_dir}, "
        f"lookups on http://{settings.web_host}:{settings.web_port}",
        err=True,
    )
    w = Worker(app, loglevel=settings.log_level, quiet=True)
    # Faust's start-up spinner sets the root logger to DEBUG so that every log record spins it:
    # aiokafka's and Faust's per-message debug calls then build a LogRecord for every message sent.
    w.spinner = None
    w.execute_from_commandline()


# --- traffic --------------------------------------------------------------------------------
@main.command()
@click.option(
    "--users",
    default=1000,
    show_default=True,
    envvar="PROPSTREAM_SIM_USERS",
    show_envvar=True,
    help="Simulated users.",
)
@click.option(
    "--seed",
    default=42,
    show_default=True,
    envvar="PROPSTREAM_SIM_SEED",
    show_envvar=True,
    help="Random seed: same seed, same events.",
)
@click.option(
    "--days",
    type=Duration("d"),
    default=30.0,
    show_default=True,
    envvar="PROPSTREAM_SIM_DAYS",
    show_envvar=True,
    help=f"Event-time span simulated, ending now: {DURATION_HELP} (plain number: days).",
)
@click.option(
    "--rate",
    default=0.0,
    show_default=True,
    envvar="PROPSTREAM_SIM_RATE",
    show_envvar=True,
    help="Events per wall-clock second (0: as fast as possible).",
)
@click.option(
    "--events",
    "max_events",
    type=int,
    default=None,
    envvar="PROPSTREAM_SIM_EVENTS",
    show_envvar=True,
    help="Stop after this many events.",
)
@click.option(
    "--duration",
    type=Duration(),
    default=None,
    envvar="PROPSTREAM_SIM_DURATION",
    show_envvar=True,
    help=f"Stop after this much wall-clock time: {DURATION_HELP} (plain number: seconds).",
)
@click.option(
    "--truth",
    type=click.Path(path_type=Path),
    default=None,
    envvar="PROPSTREAM_SIM_TRUTH",
    show_envvar=True,
    help="Write each user's true purchase/churn probabilities over time (CSV).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    envvar="PROPSTREAM_SIM_OUT",
    show_envvar=True,
    help="Write events to this JSONL file instead of Kafka.",
)
@setting_option("bootstrap", "--bootstrap")
def simulate(
    users: int,
    seed: int,
    days: float,
    rate: float,
    max_events: int | None,
    duration: float | None,
    truth: Path | None,
    out: Path | None,
    bootstrap: str | None,
) -> None:
    """Publish realistic synthetic traffic with a known ground truth (deterministic per --seed)."""
    from streams.producer import Progress, publish
    from traffic.simulator import SimConfig, simulate_with_truth, write_truth

    settings = build_settings(bootstrap=bootstrap)
    cfg = SimConfig(users=users, seed=seed, days=days, max_events=max_events)
    truth_rows: list[Any] = []
    deadline = time.monotonic() + duration if duration else None

    def events() -> Any:
        for ev, t in simulate_with_truth(cfg):
            if deadline is not None and time.monotonic() > deadline:
                return
            if truth is not None:
                truth_rows.append(t)
            yield ev

    progress = Progress("simulate", max_events)
    if out is not None:
        import msgspec

        enc = msgspec.json.Encoder()
        with out.open("wb") as fh:
            for ev in events():
                fh.write(enc.encode(ev) + b"\n")
                progress.tick()
    else:
        publish(events(), settings, bootstrap=_ensure(settings), rate=rate, progress=progress)
    progress.done()
    if truth is not None:
        write_truth(truth_rows, truth)
        click.echo(f"truth: {len(truth_rows):,} rows in {truth}", err=True)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "taobao", "rees46", "retailrocket"]),
    default="jsonl",
    show_default=True,
    envvar="PROPSTREAM_REPLAY_FORMAT",
    show_envvar=True,
    help="Input format.",
)
@click.option(
    "--speedup",
    type=float,
    default=0.0,
    show_default=True,
    envvar="PROPSTREAM_REPLAY_SPEEDUP",
    show_envvar=True,
    help="Event time runs this many times faster than wall time (0: as fast as possible).",
)
@click.option(
    "--limit",
    type=int,
    default=None,
    envvar="PROPSTREAM_REPLAY_LIMIT",
    show_envvar=True,
    help="Publish at most this many events.",
)
@setting_option("bootstrap", "--bootstrap")
def replay(file: Path, fmt: str, speedup: float, limit: int | None, bootstrap: str | None) -> None:
    """Publish a real event log in event-time order, mapping its vocabulary to ours."""
    import itertools

    from features.contract import parse_time_ms
    from streams.producer import Progress, publish
    from traffic.datasets import DatasetError, read_events

    settings = build_settings(bootstrap=bootstrap)
    try:
        events = read_events(file, fmt)
        if limit is not None:
            events = itertools.islice(events, limit)
        if speedup > 0:
            events = _paced(events, speedup, parse_time_ms)
        n = publish(events, settings, bootstrap=_ensure(settings), progress=Progress("replay", limit))
    except DatasetError as exc:
        fail(str(exc))
    click.echo(f"replayed {n:,} events from {file}", err=True)


def _paced(events: Any, speedup: float, parse: Callable[[object], int | None]) -> Any:
    first_ts: int | None = None
    start = time.monotonic()
    for ev in events:
        ts = parse(ev.get("ts"))
        if ts is not None:
            if first_ts is None:
                first_ts = ts
            wait = (ts - first_ts) / 1000.0 / speedup - (time.monotonic() - start)
            if wait > 0:
                time.sleep(wait)
        yield ev


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new dead letters.", show_envvar=True)
@click.option(
    "--limit",
    type=int,
    default=50,
    show_default=True,
    show_envvar=True,
    help="Stop after this many (without --follow).",
)
@setting_option("bootstrap", "--bootstrap")
def deadletter(follow: bool, limit: int, bootstrap: str | None) -> None:
    """Show rejected events from the dead-letter topic: reason, source, detail and payload head."""
    from kafka import KafkaConsumer

    settings = build_settings(bootstrap=bootstrap)
    consumer = KafkaConsumer(
        settings.topic_deadletter,
        bootstrap_servers=_ensure(settings),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=-1 if follow else 3000,
        isolation_level="read_committed",  # an exactly-once worker's, once committed
    )
    n = 0
    try:
        for msg in consumer:
            h = {k: v.decode("utf-8", "replace") for k, v in msg.headers}
            src = f"{h.get('propstream.source.topic')}[{h.get('propstream.source.partition')}]"
            src += f"@{h.get('propstream.source.offset')}"
            head = (msg.value or b"")[:100].decode("utf-8", "replace")
            click.echo(f"{h.get('propstream.reason', '?'):<14} {src:<28} {h.get('propstream.detail', '')}")
            click.echo(f"{'':<14} {head!r}")
            n += 1
            if not follow and n >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    click.echo(f"{n} dead letter(s) shown", err=True)


@main.command("eval")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "taobao", "rees46", "retailrocket"]),
    default="jsonl",
    show_default=True,
    show_envvar=True,
    help="Format of FILE.",
)
@click.option(
    "--simulate",
    "use_sim",
    is_flag=True,
    show_envvar=True,
    help="Evaluate on simulated traffic (with the oracle's true probabilities) instead of FILE.",
)
@click.option("--users", default=2000, show_default=True, show_envvar=True, help="Simulated users.")
@click.option(
    "--days",
    type=Duration("d"),
    default=60.0,
    show_default=True,
    show_envvar=True,
    help=f"Simulated event-time span: {DURATION_HELP} (plain number: days).",
)
@click.option("--seed", default=42, show_default=True, show_envvar=True, help="Simulation seed.")
@click.option(
    "--target",
    default="purchase",
    show_default=True,
    show_envvar=True,
    help="purchase, churn, value, or any event type (custom target); NAME:HORIZON sets the horizon too "
    "(value:90d).",
)
@click.option(
    "--horizon",
    "horizon_s",
    type=Duration(horizon=True),
    default=None,
    show_envvar=True,
    help=f"Label horizon: {DURATION_HELP} (plain number: seconds). Default: the target's horizon in "
    "PROPSTREAM_TARGETS, else 7d (churn 14d).",
)
@click.option(
    "--sample-every",
    "sample_every_s",
    type=Duration(),
    default=None,
    show_envvar=True,
    help=f"At most one snapshot per user and target per this much event time: {DURATION_HELP} "
    "(plain number: seconds). Default: PROPSTREAM_SAMPLE_EVERY_S.",
)
@click.option(
    "--baseline",
    is_flag=True,
    show_envvar=True,
    help="Also train offline logistic regression and gradient-boosted trees (first 70%, test last 30%).",
)
@click.option(
    "--bootstrap",
    type=int,
    default=0,
    show_default=True,
    show_envvar=True,
    help="Bootstrap rounds for 95% intervals (0: none).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="Write the report as JSON here.",
)
def evaluate_cmd(
    file: Path | None,
    fmt: str,
    use_sim: bool,
    users: int,
    days: float,
    seed: int,
    target: str,
    horizon_s: float | None,
    sample_every_s: float | None,
    baseline: bool,
    bootstrap: int,
    json_out: Path | None,
) -> None:
    """Run features, labels and the online model in-process, in event-time order, and report quality.

    Ingestion rules, feature parameters, sampling, learner and warm-up come from the same
    ``PROPSTREAM_*`` settings as the worker's, so the figures are those of the configured stream.
    """
    from models import evaluate
    from models.ledger import make_target
    from streams.producer import Progress

    if file is None and not use_sim:
        msg = "give a FILE or --simulate"
        raise click.UsageError(msg)
    settings = build_settings()
    if ":" in target:  # value:90d, as PROPSTREAM_TARGETS writes it
        from models.targets import parse_horizon

        target, _, given = target.partition(":")
        if horizon_s is None:
            try:
                horizon_s = float(parse_horizon(given))
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--target") from None
    configured = {t.name: t.horizon_ms // 1000 for t in settings.target_list()}
    default_horizon = configured.get(target, 14 * 86400 if target == "churn" else 7 * 86400)
    horizon = int(horizon_s) if horizon_s is not None else default_horizon
    default_every = settings.value_sample_every_s if target == "value" else settings.sample_every_s
    every = int(sample_every_s) if sample_every_s is not None else default_every
    tgt = make_target(target, horizon, every, settings.max_pending)
    progress = Progress("eval")
    oracle = None
    if use_sim:
        from traffic.simulator import SimConfig, simulate_with_truth

        cfg = SimConfig(
            users=users,
            seed=seed,
            days=days,
            horizon_purchase_s=horizon,
            horizon_churn_s=horizon,
            horizon_value_s=horizon,
        )
        current: list[tuple[str, int, float]] = []

        def truth_of(t: Any) -> float:
            if target == "value":
                return float(t.expected_revenue)
            return float(t.p_churn if target == "churn" else t.p_purchase)

        def sim_events() -> Any:
            for ev, t in simulate_with_truth(cfg):
                current[:] = [(t.user_id, t.ts_ms, truth_of(t))]
                yield ev

        def oracle_fn(user: str, ts: int) -> float | None:
            # the simulator's churn truth has no grace period, so only purchase has a comparable oracle
            if target not in ("purchase", "value") or not current or current[0][:2] != (user, ts):
                return None
            return current[0][2]

        events: Any = sim_events()
        oracle = oracle_fn
    else:
        from traffic.datasets import DatasetError, read_events

        assert file is not None
        try:
            events = list(read_events(file, fmt))
        except DatasetError as exc:
            fail(str(exc))
    result = evaluate.run(
        events,
        tgt,
        rules=settings.ingest_rules(),
        params=settings.feature_params(),
        change_rules=settings.change_rules(),
        model_config=settings.learner_config(),
        min_positives=settings.min_positives,
        min_negatives=settings.min_negatives,
        trust=settings.trust_gate(),
        quality_window=settings.quality_window,
        oracle=oracle,
        progress=lambda n: progress.tick(10_000),
        timers=settings.timer_config(),
        value_config=settings.value_config(),
    )
    progress.done()
    why_empty = evaluate.why_nothing_matured(result)
    rep = evaluate.summary(result, baseline=baseline and why_empty is None, bootstrap=bootstrap)
    click.echo(evaluate.format_report(rep))
    if json_out is not None:
        json_out.write_text(json.dumps(rep, indent=2, default=str))
        click.echo(f"report written to {json_out}", err=True)
    if why_empty is not None:  # no figure above means anything: say what to change, exit non-zero
        fail(why_empty)


# --- lookups --------------------------------------------------------------------------------
def fetch_features(
    settings: Settings, user: str, as_of: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """GET a user's features from any worker (it routes to the owner). Raises LookupError on 404."""
    from urllib.parse import quote

    url = f"http://{settings.web_host}:{settings.web_port}/users/{quote(user, safe='')}/features"
    if as_of:
        url += f"?as_of={quote(as_of)}"
    req = urllib.request.Request(url)
    if settings.api_token is not None:
        req.add_header("Authorization", f"Bearer {settings.api_token.get_secret_value()}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        raise LookupError(body.get("message", str(exc))) from None


@main.command()
@click.argument("user", required=False)
@click.option(
    "--as-of", default=None, help="Evaluate at this event time (epoch ms or ISO-8601).", show_envvar=True
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.", show_envvar=True)
@click.option(
    "--catalogue", is_flag=True, help="Print the feature catalogue (Markdown) instead.", show_envvar=True
)
@setting_option("web_port", "--web-port", type=int)
@setting_option("web_host", "--web-host")
def features(user: str | None, as_of: str | None, as_json: bool, catalogue: bool, **opts: Any) -> None:
    """Show one user's current features, as served by the workers."""
    if catalogue:
        from features.catalogue import as_markdown

        click.echo(as_markdown(), nl=False)
        return
    if not user:
        msg = "give a USER, or --catalogue"
        raise click.UsageError(msg)
    settings = build_settings(**opts)
    try:
        data = fetch_features(settings, user, as_of)
    except LookupError as exc:
        fail(str(exc))
    except OSError as exc:
        where = f"{settings.web_host}:{settings.web_port}"
        fail(f"no worker answers on {where} ({exc}); start one with `propstream worker`")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(format_features(data))


def format_features(data: dict[str, Any]) -> str:
    from datetime import datetime

    as_of = datetime.fromtimestamp(data["as_of_ms"] / 1000, tz=UTC).isoformat(timespec="seconds")
    lines = [f"user {data['user_id']}  ({data['events']} events, as of {as_of})"]
    feats = data["features"]
    width = max(len(k) for k in feats)
    for k, v in feats.items():
        if isinstance(v, float):
            v = f"{v:,.3f}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


main.add_command(demo)
main.add_command(bench_cmd)
main.add_command(cli_models.tail)
main.add_command(cli_models.model)
main.add_command(forget)
main.add_command(cli_score.score)
main.add_command(cli_audience.audience)
main.add_command(forward)

if __name__ == "__main__":
    main()
