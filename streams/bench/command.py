"""``propstream bench``: every figure of the benchmarks issue in one run, ratios computed within it.

Phases, in order, on topics and state of their own (nothing of a previous run is reused but the broker):
preload simulated events; the raw consumer (aiokafka + JSON decode only); one worker catching up
with the full pipeline; latency at a fixed offered load with feature lookups meanwhile; recovery of a
fresh worker from the changelogs; the naive Faust baseline; growth in-process at each size; and the
real-data replay when the file is there. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from streams.bench import phases
from streams.bench.proc import Proc, time_to_ready
from streams.bench.stats import fmt, machine, profile_top, table
from streams.cli_common import DURATION_HELP, Duration, stop_broker_after
from streams.settings import Settings

# the bench's topics stamp records with the broker's append time: the latency split reads it
APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
REAL = Path("../shared/data/taobao_timeslice/user_behavior_timeslice.csv")


def say(text: str) -> None:
    click.echo(text, err=True)


def run_env(uid: str, bootstrap: str, tag: str, guarantee: str = "at_least_once") -> dict[str, str]:
    """Topics, app id and settings of one measured deployment: unique per run and per data set."""
    p = f"bench-{uid}-{tag}"
    return {
        "PROPSTREAM_BOOTSTRAP": bootstrap,
        "PROPSTREAM_PROCESSING_GUARANTEE": guarantee,
        "PROPSTREAM_APP_ID": p,
        "PROPSTREAM_TOPIC_CLICKSTREAM": f"{p}.clickstream",
        "PROPSTREAM_TOPIC_CART": f"{p}.cart",
        "PROPSTREAM_TOPIC_PURCHASE": f"{p}.purchase",
        "PROPSTREAM_TOPIC_DEADLETTER": f"{p}.deadletter",
        "PROPSTREAM_TOPIC_CHANGES": f"{p}.changes",
        "PROPSTREAM_TOPIC_TRAINING": f"{p}.training",
        "PROPSTREAM_TOPIC_MODELS": f"{p}.models",
        "PROPSTREAM_LOG_LEVEL": "warning",
        # models are trusted at once (no label counts, the trust gate off), so change detection runs
        # all along
        "PROPSTREAM_MIN_POSITIVES": "0",
        "PROPSTREAM_MIN_NEGATIVES": "0",
        "PROPSTREAM_TRUST_MIN_AUC_LOWER": "0",
        "PROPSTREAM_TRUST_MAX_ECE": "1",
    }


def settings_of(env: dict[str, str]) -> Settings:
    given: dict[str, Any] = {k.removeprefix("PROPSTREAM_").lower(): v for k, v in env.items()}
    return Settings(**given)


def worker(env: dict[str, str], tmp: Path, name: str) -> Proc:
    return Proc(env, tmp / name, tmp / f"{name}.log", ("-m", "streams.cli", "worker"))


def pipeline(
    env: dict[str, str], tmp: Path, n: int, name: str, profile: Path | None = None
) -> tuple[Proc, phases.Rate]:
    w = worker(env, tmp, name)
    count = functools.partial(w.metric, "propstream_events_consumed_total")
    rate = phases.catch_up(w, n, count, say, name, profile, from_ready=True)
    return w, rate


def bench(opts: dict[str, Any]) -> dict[str, Any]:
    """Every phase, on the configured cluster or the local broker; one this run started is stopped after."""
    from streams.broker import LocalBroker

    base = Settings()
    local = LocalBroker(base)
    stop_after = stop_broker_after(
        bootstrap=base.bootstrap, was_running=local.read_state() is not None, keep=opts["keep_broker"]
    )
    bootstrap = base.bootstrap or local.start().bootstrap
    try:
        return measure(opts, bootstrap)
    finally:
        if stop_after:
            say("bench: stopping the local broker it started (--keep-broker keeps it)")
            local.stop()


def measure(opts: dict[str, Any], bootstrap: str) -> dict[str, Any]:
    from streams.topics import ensure_topics
    from traffic.simulator import SimConfig, simulate

    uid = uuid.uuid4().hex[:6]
    tmp = Path(tempfile.mkdtemp(prefix="propstream-bench-"))
    out: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["propstream", *sys.argv[1:]]),
        "processing_guarantee": opts["guarantee"],
    }
    n = opts["events"]
    users = max(1000, n // 20)
    env = run_env(uid, bootstrap, "sim", opts["guarantee"])
    settings = settings_of(env)
    ensure_topics(settings, bootstrap, extra=APPEND_TIME)
    say(f"bench: broker {bootstrap}, state in {tmp}")
    say(f"[1/7] preloading {n:,} simulated events of {users:,} users ...")
    active: set[object] = set()

    def noting_users(events: Iterable[dict[str, object]]) -> Iterator[dict[str, object]]:
        for e in events:
            active.add(e["user_id"])
            yield e

    n = phases.preload(
        noting_users(
            phases.ending_at(simulate(SimConfig(users=users, seed=1, max_events=n)), int(time.time() * 1000))
        ),
        settings,
        bootstrap,
        n,
    )
    out.update(events=n, users=users, active_users=len(active))

    say("[2/7] raw consumer: aiokafka, JSON decode only ...")
    raw = phases.raw_consume(settings, bootstrap, n)
    out["raw_events_per_s"], out["raw_events_per_cpu_s"] = raw
    say(f"  raw: {raw.per_s:,.0f} events/s, {raw.per_cpu_s:,.0f} per CPU second")

    say("[3/7] one worker, full pipeline, catching up ...")
    w, rate = pipeline(env, tmp, n, "worker", opts["profile"])
    out["events_per_s"], out["worker_events_per_cpu_s"] = rate
    out["worker_rss_mb"] = w.rss_mb()
    say(f"  pipeline: {rate.per_s:,.0f} events/s, {rate.per_cpu_s:,.0f} per worker CPU second")
    try:
        say(
            f"[4/7] latency at {opts['rate']:,} events/s offered for {opts['seconds']:.0f}s, "
            "lookups meanwhile ..."
        )
        ids = sorted(str(u) for u in active)
        out.update(phases.latency(w, settings, bootstrap, ids, opts["rate"], opts["seconds"], say))
    finally:
        w.stop()

    say("[5/7] recovery: a fresh worker restores every table, then one with nothing to restore ...")
    out["recovery_s"] = time_to_ready(worker(env, tmp, "recovered"))
    # What any start costs (interpreter, Faust, joining the group, an empty recovery): a fresh
    # worker of a deployment with nothing stored. Only the rest grows with the users restored, so
    # the figure per 100k users is the difference, not the whole time scaled up from a few thousand.
    empty_env = run_env(uid, bootstrap, "empty", opts["guarantee"])
    ensure_topics(settings_of(empty_env), bootstrap)
    out["recovery_start_s"] = time_to_ready(worker(empty_env, tmp, "empty"))
    out["recovery_s_per_100k_users"] = (
        max(0.0, out["recovery_s"] - out["recovery_start_s"]) * 100_000 / len(active)
    )
    # A changelog is compacted only in closed segments: within a run it holds every row a checkpoint
    # wrote (a user once per checkpoint it was in), so the restore grows with its messages, not users.
    out["changelog_messages"] = phases.changelog_messages(bootstrap, settings.app_id)
    out["recovery_s_per_100k_messages"] = (
        max(0.0, out["recovery_s"] - out["recovery_start_s"]) * 100_000 / max(1, out["changelog_messages"])
    )

    naive_n = min(n, opts["naive_events"])
    say(f"[6/7] naive baseline: per-event Faust agent over the first {naive_n:,} events ...")
    nv = Proc(env, tmp / "naive", tmp / "naive.log", ("-m", "streams.bench.naive"))
    try:
        naive = phases.catch_up(nv, naive_n, lambda: float(nv.get_json("/count")["consumed"]), say, "naive")
    finally:
        nv.stop()
    out["naive_events_per_s"], out["naive_events_per_cpu_s"] = naive
    say(f"  naive: {naive.per_s:,.0f} events/s, {naive.per_cpu_s:,.0f} per CPU second")
    say(f"[+] peer: Quix Streams, the same per-user rolling counts, over all {n:,} events ...")
    peer = phases.quix_peer(settings, bootstrap, n, tmp, uid, say)
    if peer is not None:
        out["quix_events_per_s"], out["quix_events_per_cpu_s"] = peer
        out["vs_quix_cpu"] = out["worker_events_per_cpu_s"] / peer.per_cpu_s
    out["vs_raw"] = out["events_per_s"] / out["raw_events_per_s"]
    out["vs_naive"] = out["events_per_s"] / out["naive_events_per_s"]
    # the same ratios per CPU second of the process doing the work: what the noise leaves alone
    out["vs_raw_cpu"] = out["worker_events_per_cpu_s"] / out["raw_events_per_cpu_s"]
    out["vs_naive_cpu"] = out["worker_events_per_cpu_s"] / out["naive_events_per_cpu_s"]

    say("[7/7] growth in-process over RocksDB ...")
    out["growth"] = phases.growth(opts["growth"], opts["growth_events"], tmp, say)
    if opts["growth_live"]:
        from streams.bench.growth_live import growth_live

        say(f"[+] live growth: {', '.join(f'{u:,}' for u in opts['growth_live'])} users through a worker ...")

        def deployment(tag: str) -> tuple[Settings, Callable[[str], Proc]]:
            genv = run_env(uid, bootstrap, tag, opts["guarantee"])
            gs = settings_of(genv)
            ensure_topics(gs, bootstrap)
            return gs, lambda name: worker(genv, tmp, f"{tag}-{name}")

        out["growth_live"] = growth_live(
            opts["growth_live"], opts["growth_live_events"], deployment, bootstrap, say
        )

    real: Path = opts["real"]
    if real.exists() and not opts["skip_real"]:
        from traffic.datasets import read_events

        say(f"[+] real data: replaying {real} through a fresh worker ...")
        renv = run_env(uid, bootstrap, "real", opts["guarantee"])
        rs = settings_of(renv)
        ensure_topics(rs, bootstrap)
        rn = phases.preload(read_events(real, "taobao"), rs, bootstrap, 0)
        rw, rrate = pipeline(renv, tmp, rn, "real-worker")
        rw.stop()
        out["real"] = {
            "file": str(real),
            "events": rn,
            "events_per_s": rrate.per_s,
            "worker_events_per_cpu_s": rrate.per_cpu_s,
        }
    else:
        say(f"[+] real data: {real} absent (or skipped): skipped")
    if opts["profile"] is not None and opts["profile"].exists():
        out["profile_top"] = profile_top(opts["profile"].read_text())
    if not opts["keep"]:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str, object]]:
    out: list[tuple[str, str, object]] = [
        ("processing guarantee of the pipeline worker", "", r.get("processing_guarantee", "at_least_once")),
        ("raw consumer (aiokafka + JSON decode)", "events/s", r["raw_events_per_s"]),
        ("full pipeline, one worker", "events/s", r["events_per_s"]),
        ("naive Faust baseline, one worker", "events/s", r["naive_events_per_s"]),
        ("pipeline / raw consumer", "ratio", r["vs_raw"]),
        ("pipeline / naive", "ratio", r["vs_naive"]),
        ("raw consumer per CPU second", "events/CPU-s", r["raw_events_per_cpu_s"]),
        ("full pipeline per worker CPU second", "events/CPU-s", r["worker_events_per_cpu_s"]),
        ("naive baseline per CPU second", "events/CPU-s", r["naive_events_per_cpu_s"]),
        ("pipeline / raw consumer, per CPU second", "ratio", r["vs_raw_cpu"]),
        ("pipeline / naive, per CPU second", "ratio", r["vs_naive_cpu"]),
    ]
    if "quix_events_per_cpu_s" in r:  # the peer runs only where quixstreams is installed
        out += [
            ("Quix Streams peer (rolling counts only)", "events/s", r["quix_events_per_s"]),
            ("Quix Streams peer per CPU second", "events/CPU-s", r["quix_events_per_cpu_s"]),
            ("pipeline / Quix peer, per CPU second", "ratio", r["vs_quix_cpu"]),
        ]
    out += [
        (f"e2e produce->change p50 @ {r['offered_events_per_s']:,.0f}/s", "ms", r["e2e_p50_ms"]),
        ("e2e produce->change p95", "ms", r["e2e_p95_ms"]),
        ("e2e produce->change p99", "ms", r["e2e_p99_ms"]),
        ("change events measured", "count", r["changes"]),
        ("  e2e p50 / p99 of the phase's second half", "ms", _half(r)),
        ("  change events of the second half", "count", r.get("changes_second_half", math.nan)),
        ("worker CPU while offered that load", "CPU-s/s", r.get("worker_cpu_per_s", math.nan)),
        ("  events per handler batch meanwhile (mean)", "count", r.get("events_per_batch", math.nan)),
        ("machine busy meanwhile (all cores)", "share", r.get("machine_busy_share", math.nan)),
        ("  of which the broker", "CPU-s/s", r.get("broker_cpu_per_s", math.nan)),
        ("  of which the bench (producer, consumer)", "CPU-s/s", r.get("bench_cpu_per_s", math.nan)),
        *(
            (f"  {label} p50 / p99", "ms", f"{fmt(st['p50_ms'])} / {fmt(st['p99_ms'])}")
            for name, label in phases.STAGES
            if (st := r.get("stages", {}).get(name)) is not None
        ),
        ("feature lookup p50 (HTTP, under load)", "ms", r["lookup_p50_ms"]),
        ("feature lookup p99 (HTTP, under load)", "ms", r["lookup_p99_ms"]),
        ("feature lookups unanswered in 10 s", "count", r["lookup_timeouts"]),
        ("worker RSS after catch-up", "MiB", r["worker_rss_mb"]),
        ("recovery from changelogs", "s", r["recovery_s"]),
        ("start of a worker with nothing to recover", "s", r.get("recovery_start_s", math.nan)),
        ("recovery per 100k users, beyond that start", "s", r["recovery_s_per_100k_users"]),
        (
            "  changelog messages restored (rows written by checkpoints)",
            "count",
            r.get("changelog_messages", math.nan),
        ),
        (
            "  recovery per 100k changelog messages, beyond that start",
            "s",
            r.get("recovery_s_per_100k_messages", math.nan),
        ),
    ]
    for g in r["growth"]:
        u = f"{g['users']:,} users"
        out += [
            (f"growth {u}: per-event cost", "us/event", g["us_per_event"]),
            (f"growth {u}: per timer fire (quiet users)", "us/fire", g.get("us_per_fire", math.nan)),
            (f"growth {u}: peak RSS", "MiB", g["peak_rss_mb"]),
            (f"growth {u}: RocksDB bytes per user", "B/user", g["rocksdb_bytes_per_user"]),
        ]
    for g in r.get("growth_live", []):
        u = f"{g['users']:,.0f} users"
        out += [
            (f"live growth {u}: worker CPU per event", "us/event", g["us_per_event"]),
            (f"live growth {u}: worker CPU per new user (the fill)", "us/user", g["fill_us_per_user"]),
            (f"live growth {u}: worker RSS", "MiB", g["rss_mb"]),
            (f"live growth {u}: restored by an empty worker", "s", g["recovery_s"]),
        ]
    if len(r.get("growth_live", [])) > 1:
        first, last = r["growth_live"][0], r["growth_live"][-1]
        ratio = last["us_per_event"] / first["us_per_event"]
        slope = (last["recovery_s"] - first["recovery_s"]) * 100_000 / (last["users"] - first["users"])
        out += [
            ("live growth: per-event cost, largest / smallest", "ratio", ratio),
            ("live growth: recovery per 100k users (slope between the sizes)", "s", slope),
        ]
    if "real" in r:
        out.append((f"Taobao replay ({r['real']['events']:,} events)", "events/s", r["real"]["events_per_s"]))
    return out


def _sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated user counts, not {value!r}"
        raise click.BadParameter(msg) from None


def opt(*names: str, **kw: Any) -> Any:
    """A click option with its ``PROPSTREAM_BENCH_*`` environment fallback shown in ``--help``."""
    env = "PROPSTREAM_BENCH_" + names[0][2:].upper().replace("-", "_")
    return click.option(*names, envvar=env, show_envvar=True, show_default=True, **kw)


@click.command("bench")
@opt("--events", type=int, default=200_000, help="Simulated events preloaded for the throughput phases.")
@opt("--rate", type=int, default=5_000, help="Offered load of the latency phase, events/s.")
@opt(
    "--seconds",
    type=Duration(),
    default=20.0,
    help=f"Duration of the latency phase: {DURATION_HELP} (plain number: seconds).",
)
@opt("--naive-events", type=int, default=50_000, help="Events the naive baseline is timed over.")
@opt("--growth", type=str, default="10000,100000", callback=_sizes, help="User counts of the growth phase.")
@opt("--growth-events", type=int, default=50_000, help="Events timed at each growth size.")
@opt(
    "--growth-live",
    type=str,
    default="",
    callback=_sizes,
    help="User counts filled through a live worker, each in a fresh deployment, then --growth-live-events "
    "events of distinct random users timed by the worker's CPU (e.g. 10000,1000000; empty: skipped).",
)
@opt(
    "--growth-live-events",
    type=click.IntRange(min=100),
    default=5_000,
    help="Events timed at each live growth size (at most the smallest size).",
)
@opt(
    "--real",
    type=click.Path(path_type=Path),
    default=REAL,
    help="Taobao time-slice CSV to replay (skipped when absent).",
)
@opt("--skip-real", is_flag=True, default=False, help="Skip the real-data replay.")
@opt(
    "--guarantee",
    type=click.Choice(["at_least_once", "exactly_once"]),
    default="at_least_once",
    help="The pipeline worker's PROPSTREAM_PROCESSING_GUARANTEE (exactly_once: change events are "
    "read committed, visible at each checkpoint).",
)
@opt(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write every figure as JSON here.",
)
@opt(
    "--profile",
    type=click.Path(path_type=Path),
    default=None,
    help="Sample the pipeline worker with py-spy during catch-up (raw stacks to this file).",
)
@opt("--keep", is_flag=True, default=False, help="Keep the state folders and worker logs.")
@opt(
    "--keep-broker",
    is_flag=True,
    default=False,
    help="Leave running the local broker this run starts (one already running is always left).",
)
def bench_cmd(json_out: Path | None, **opts: Any) -> None:
    """Throughput, latency, memory and growth against the raw consumer and a naive baseline, in one run."""
    if opts["growth_live"] and opts["growth_live_events"] > min(opts["growth_live"]):
        msg = f"--growth-live-events ({opts['growth_live_events']:,}) exceeds the smallest --growth-live size"
        raise click.BadParameter(msg, param_hint="--growth-live-events")
    t0 = time.monotonic()
    result = bench(opts)
    result["duration_s"] = time.monotonic() - t0
    m = result["machine"]
    click.echo(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}")
    click.echo(
        f"{result['events']:,} simulated events of {result['users']:,} users; {result['duration_s']:.0f}s\n"
    )
    click.echo(table(rows(result)))
    if result.get("profile_top"):
        click.echo("\nprofile of the pipeline worker during catch-up (self %, inclusive %, function):")
        for own, incl, name in result["profile_top"]:
            click.echo(f"  {own:5.1f} {incl:5.1f}  {name}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        click.echo(f"\nwrote {json_out}", err=True)


def _half(r: dict[str, Any]) -> str:
    """The e2e p50 / p99 of the latency phase's second half ('-' when not measured)."""
    return f"{fmt(r.get('e2e_second_half_p50_ms'))} / {fmt(r.get('e2e_second_half_p99_ms'))}"
