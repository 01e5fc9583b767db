"""``propstream tail`` and ``propstream model list|show|rollback``: change events and models, for humans.

Both read Kafka directly (no worker needed): ``tail`` the outbound ``propensity.changes`` topic, and
``model`` the compacted models topic, where every published version of every target is kept.
Rollback is itself a message on the training log, so the one trainer applies it in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import click

from streams.cli_common import _ensure, build_settings, fail, setting_option
from streams.settings import Settings


def _utc(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


# --- tail -----------------------------------------------------------------------------------
def format_change(ch: dict[str, Any]) -> str:
    """One change event as one line a human can read."""
    arrow = "↑" if ch["direction"] == "up" else "↓"
    why = ", ".join(
        f"{f['feature']} {_num(f['value'], 'g')}"
        + (f" ({'+' if f['change'] >= 0 else ''}{f['change']:g})" if f.get("change") else "")
        for f in ch["top_factors"][:3]
    )
    return (
        f"{ch['event_time'][:19]}Z  {ch['user_id']:<12} {ch['target']:<9} "
        f"{ch['previous_score']:.3f} → {ch['score']:.3f}  {ch['previous_tier']:>6} → {ch['tier']:<6} "
        f"{arrow} {ch['reason']:<20} v{ch['model_version']}  top: {why}"
    )


def format_trigger(tr: dict[str, Any]) -> str:
    """One trigger event as one line a human can read."""
    f = tr["facts"]
    if tr["trigger"] == "cart_abandoned":
        what = f"cart {f['cart_items']} item(s), {f['cart_value']:.2f}"
    else:
        what = f"product {f['product_id']} viewed {f['views_24h']}x in 24 h"
    scores = " ".join(f"{t} {s['score']:.3f}" for t, s in tr["scores"].items())
    return f"{tr['event_time'][:19]}Z  {tr['user_id']:<12} {tr['trigger']:<24} {what}  {scores}"


@click.command()
@click.option("--follow", "-f", is_flag=True, show_envvar=True, help="Keep waiting for new events.")
@click.option("--triggers", is_flag=True, show_envvar=True, help="Show behavioural trigger events instead.")
@click.option(
    "-n", "last", type=int, default=20, show_default=True, show_envvar=True, help="Show the last N first."
)
@click.option("--target", default=None, show_envvar=True, help="Only this target.")
@click.option("--json", "as_json", is_flag=True, show_envvar=True, help="Print the raw JSON, one per line.")
@setting_option("bootstrap", "--bootstrap")
def tail(
    follow: bool, triggers: bool, last: int, target: str | None, as_json: bool, bootstrap: str | None
) -> None:
    """Show propensity-change events (or, with --triggers, trigger events) as they are published."""
    from kafka import KafkaConsumer, TopicPartition

    settings = build_settings(bootstrap=bootstrap)
    consumer = KafkaConsumer(
        bootstrap_servers=_ensure(settings),
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        isolation_level="read_committed",  # an exactly-once worker's outputs, once committed
    )
    topic = settings.topic_triggers if triggers else settings.topic_changes
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(tps)
    ends = consumer.end_offsets(tps)
    for tp in tps:  # the newest N of each partition, then the newest N of those by emit time
        consumer.seek(tp, max(0, ends[tp] - last))

    def changes() -> Iterator[dict[str, Any]]:
        for msg in consumer:
            if msg.value is None:
                continue  # an erasure tombstone
            try:
                ch = json.loads(msg.value)
            except ValueError:
                continue
            if triggers or target is None or ch.get("target") == target:
                yield ch

    def show(ch: dict[str, Any]) -> None:
        click.echo(json.dumps(ch) if as_json else (format_trigger(ch) if triggers else format_change(ch)))

    shown = 0
    try:
        backlog: list[dict[str, Any]] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            backlog.extend(changes())
        for ch in sorted(backlog, key=lambda c: c.get("emit_ts_ms", 0))[-last:] if last else []:
            show(ch)
            shown += 1
        while follow:
            for ch in changes():
                show(ch)
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    click.echo(f"{shown} {'trigger' if triggers else 'change'} event(s) shown", err=True)


# --- model ----------------------------------------------------------------------------------
def read_versions(settings: Settings, servers: str, timeout_s: float = 10.0) -> Iterator[Any]:
    """Every model snapshot on the models topic, oldest first."""
    from kafka import KafkaConsumer, TopicPartition

    from models.persist import load

    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        tps = [
            TopicPartition(settings.topic_models, p)
            for p in sorted(consumer.partitions_for_topic(settings.topic_models) or ())
        ]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for msg in consumer:
                if msg.value is None:
                    continue
                try:
                    yield load(msg.value)
                except ValueError:
                    continue
    finally:
        consumer.close()


@click.group()
def model() -> None:
    """Published model versions per target: list them, inspect one, roll back."""


@model.command("list")
@click.option("--target", default=None, show_envvar=True, help="Only this target.")
@click.option("--json", "as_json", is_flag=True, show_envvar=True, help="Print JSON.")
@setting_option("bootstrap", "--bootstrap")
def model_list(target: str | None, as_json: bool, bootstrap: str | None) -> None:
    """Every published version: when, trained up to which event time, labels learnt, rolling quality."""
    settings = build_settings(bootstrap=bootstrap)
    snaps = [s for s in read_versions(settings, _ensure(settings)) if target in (None, s.target)]
    if as_json:
        click.echo(json.dumps([_summary(s) for s in snaps], indent=2))
        return
    if not snaps:
        click.echo("no model published yet (a target publishes once its trainer has learnt labels)", err=True)
        return
    click.echo(
        f"{'target':<10} {'ver':>4}  {'published':<20} {'trained to':<20} {'pos':>7} {'neg':>8} "
        f"{'roc_auc':>7} {'ece':>6}  note (value: gini / predicted over actual)"
    )
    for s in snaps:
        q = s.quality
        rank, calib = ("gini", "calibration_ratio") if "gini" in q else ("roc_auc", "ece")
        click.echo(
            f"{s.target:<10} {s.version:>4}  {_utc(s.created_ms):<20} {_utc(s.trained_to_ms):<20} "
            f"{s.positives:>7,} {s.negatives:>8,} {_num(q.get(rank)):>7} {_num(q.get(calib)):>6}"
            f"  {s.note}"
        )


def _summary(s: Any) -> dict[str, Any]:
    return {
        "target": s.target,
        "version": s.version,
        "created_ms": s.created_ms,
        "trained_to_ms": s.trained_to_ms,
        "positives": s.positives,
        "negatives": s.negatives,
        "quality": {k: (v if v == v else None) for k, v in s.quality.items()},
        "note": s.note,
    }


@model.command("show")
@click.argument("target", required=False)
@click.option("--version", "version", type=int, default=None, show_envvar=True, help="Default: the newest.")
@click.option(
    "--weights",
    "n_weights",
    type=int,
    default=10,
    show_default=True,
    show_envvar=True,
    help="Largest weights shown.",
)
@setting_option("bootstrap", "--bootstrap")
def model_show(target: str | None, version: int | None, n_weights: int, bootstrap: str | None) -> None:
    """One version per target in full: quality on matured labels, labels learnt, largest weights."""
    settings = build_settings(bootstrap=bootstrap)
    wanted = [target] if target else [t.name for t in settings.target_list()]
    latest: dict[str, Any] = {}
    for s in read_versions(settings, _ensure(settings)):
        if s.target in wanted and (version is None or s.version == version):
            latest[s.target] = s
    if not latest:
        fail(f"no published version {'' if version is None else version} of {', '.join(wanted)}")
    for name, s in latest.items():
        q = s.quality
        warm = s.positives >= settings.min_positives and s.negatives >= settings.min_negatives
        click.echo(f"{name} version {s.version}{'' if warm else '  (warming up)'}  {s.note}")
        click.echo(f"  published {_utc(s.created_ms)}, trained on events up to {_utc(s.trained_to_ms)}")
        click.echo(f"  learnt {s.positives:,} positive and {s.negatives:,} negative matured labels")
        if q and "gini" in q:
            click.echo(
                f"  last {int(q.get('matured', 0)):,} matured: gini {_num(q.get('gini'))}  "
                f"top_decile_capture {_num(q.get('top_decile_capture'))}  mae {_num(q.get('mae'))}  "
                f"rmse {_num(q.get('rmse'))}  predicted/actual {_num(q.get('calibration_ratio'))}  "
                f"mean revenue {_num(q.get('mean_actual'))}"
            )
        elif q:
            click.echo(
                f"  last {int(q.get('matured', 0)):,} matured: roc_auc {_num(q.get('roc_auc'))}  "
                f"pr_auc {_num(q.get('pr_auc'))}  log_loss {_num(q.get('log_loss'))}  "
                f"brier {_num(q.get('brier'))}  ece {_num(q.get('ece'))}  "
                f"base rate {_num(q.get('base_rate'))}"
            )
        state = s.state.get("classifier", s.state)  # a value model: its purchase classifier's weights
        weights = state.get("weights", {})
        top = sorted(weights.items(), key=lambda kv: -abs(kv[1]))[:n_weights]
        if top:
            click.echo(
                "  largest weights (standardised inputs): " + ", ".join(f"{k} {w:+.3f}" for k, w in top)
            )


@model.command("rollback")
@click.argument("version", type=int)
@click.option(
    "--target", default="purchase", show_default=True, show_envvar=True, help="Target to roll back."
)
@setting_option("bootstrap", "--bootstrap")
def model_rollback(version: int, target: str, bootstrap: str | None) -> None:
    """Make VERSION live again: the trainer republishes it as a new version and learns on from it."""
    import msgspec
    from kafka import KafkaProducer

    from models.persist import dump
    from models.training import Rollback

    settings = build_settings(bootstrap=bootstrap)
    if target not in {t.name for t in settings.target_list()}:
        fail(f"target {target!r} is not configured (PROPSTREAM_TARGETS={settings.targets})")
    servers = _ensure(settings)
    snap = next(
        (s for s in read_versions(settings, servers) if s.target == target and s.version == version), None
    )
    if snap is None:
        fail(f"no published version {version} of {target}: see `propstream model list --target {target}`")
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    producer.send(
        settings.topic_training,
        key=target.encode(),
        value=msgspec.msgpack.encode(Rollback(target, version, dump(snap))),
    ).get(timeout=30)
    producer.close()
    click.echo(
        f"rollback of {target} to version {version} queued on {settings.topic_training}; the trainer "
        "publishes it as a new version, which every worker swaps in (see `propstream model list`)"
    )
