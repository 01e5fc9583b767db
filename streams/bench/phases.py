"""The measured phases of ``propstream bench``, each returning plain figures (see ``command.py``)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from kafka import KafkaConsumer

from streams.bench.proc import Proc, cpu_s_of, wait_until
from streams.bench.stats import busy_share, cpu_ticks, percentile
from streams.producer import Progress, make_producer, publish, topic_for
from streams.settings import Settings

Say = Callable[[str], None]


def preload(events: Iterable[Mapping[str, object]], settings: Settings, bootstrap: str, total: int) -> int:
    return publish(events, settings, bootstrap=bootstrap, progress=Progress("  preload", total, every_s=5.0))


def ending_at(events: Iterable[dict[str, object]], end_ms: int) -> list[dict[str, object]]:
    """The events with their times moved so that the newest is at ``end_ms``, gaps and order kept.

    A history cut at ``max_events`` ends days before the end of its simulated span, and the latency
    phase sends events stamped with the wall clock: its first batch would move every partition's
    clock days at once and fire every silence point and horizon of every user together (measured:
    60,000 events of 3,000 users ended 22 days before now, and the e2e p50 was 5.7 s at 1,000/s).
    Ending the history at the preload makes the latency phase measure a stream that goes on.
    """
    out = list(events)
    if out:
        shift = end_ms - max(int(e["ts"]) for e in out)  # type: ignore[call-overload]
        for e in out:
            e["ts"] = int(e["ts"]) + shift  # type: ignore[call-overload]
    return out


class Rate(NamedTuple):
    """A phase's throughput: events per wall-clock second, and per CPU second of the consuming process.

    The machines are noisy (other jobs share the cores, the broker too), so wall-clock rates drift;
    events per CPU second of the process doing the work hold far better.
    """

    per_s: float
    per_cpu_s: float


def raw_consume(settings: Settings, bootstrap: str, expect: int) -> Rate:
    """A bare aiokafka consumer that only decodes each value's JSON: Python's ceiling here.

    It runs in this process, so its CPU time is this process's over the timed span.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> Rate:
        c = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=8 * 1024 * 1024
        )
        await c.start()
        try:
            tps = [TopicPartition(t, p) for t in settings.source_topics for p in range(settings.partitions)]
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            dec = msgspec.json.Decoder()
            n = 0
            t0, cpu0 = time.perf_counter(), time.process_time()
            while n < expect:
                for records in (await c.getmany(timeout_ms=500, max_records=10_000)).values():
                    for r in records:
                        dec.decode(r.value)
                    n += len(records)
            return Rate(n / (time.perf_counter() - t0), n / max(time.process_time() - cpu0, 1e-9))
        finally:
            await c.stop()

    return asyncio.run(run())


def catch_up(
    proc: Proc,
    expect: int,
    count: Callable[[], float],
    say: Say,
    what: str,
    profile: Path | None = None,
    from_ready: bool = False,
) -> Rate:
    """Start ``proc``, then time it (wall clock and its CPU) to ``expect`` events, from its first
    consumed event or (``from_ready``) from ready.

    The pipeline worker is timed from ready: busy with its first batches it answers ``/metrics``
    late, and an exactly-once worker whose first transaction took seconds had consumed nearly
    everything by the first answer, so the rate was taken over the tail alone (130 events/s in one
    run). From ready, its span also holds the wait for the first fetch and any start-up work after
    ready: a conservative figure. The naive baseline keeps the first event (its counter answers at
    once), as in every earlier run.

    ``profile``: sample the process with py-spy meanwhile (raw collapsed stacks to that file).
    """
    proc.start()
    proc.wait_ready("/readyz" if "streams.cli" in proc.argv else "/count")
    if not from_ready:
        wait_until(lambda: count() > 0, 300, every_s=0.05, what=f"{what}: first events")
    spy = None
    if profile is not None and proc.proc is not None:
        cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(proc.proc.pid)]
        cmd += ["-r", "100", "-f", "raw", "-o", str(profile)]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, cpu0, first = time.perf_counter(), proc.cpu_s(), count()
    last = time.monotonic()
    while (n := count()) < expect:
        if time.monotonic() - last > 5:
            last = time.monotonic()
            rate = (n - first) / (time.perf_counter() - t0)
            say(f"  {what}: {n:,.0f}/{expect:,} events ({100 * n / expect:.0f}%), {rate:,.0f}/s")
        time.sleep(0.5)  # /metrics costs the worker a little: a few polls per second only
    rate = (expect - first) / (time.perf_counter() - t0)
    per_cpu = (expect - first) / max(proc.cpu_s() - cpu0, 1e-9)
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on interrupt
        spy.wait(30)
    return Rate(rate, per_cpu)


def live_events(users: list[str], n: int, seed: int) -> list[dict[str, object]]:
    """Events of known users for the latency phase (times are set when each is sent)."""
    rng = random.Random(seed)
    kinds = ["page_view"] * 40 + ["product_view"] * 30 + ["add_to_cart"] * 20 + ["checkout_start"] * 6
    kinds += ["purchase"] * 4
    out: list[dict[str, object]] = []
    for i in range(n):
        etype = rng.choice(kinds)
        ev: dict[str, object] = {"event_id": f"live{seed}-{i}", "user_id": rng.choice(users), "type": etype}
        if etype in ("product_view", "add_to_cart", "purchase"):
            ev["product_id"] = f"p{rng.randrange(500):05d}"
            ev["price"] = round(rng.uniform(5, 200), 2)
        if etype == "purchase":
            ev["order_id"] = f"lo{seed}-{i}"
        out.append(ev)
    return out


STAGES = (
    ("produce", "producer -> broker append"),
    ("to_batch", "append -> batch start in the worker"),
    ("batch", "batch processing"),
    ("out_append", "change-event send -> append"),
    ("to_bench", "append -> the bench's consumer"),
)


def stage_split(
    sent_ms: float, appended_ms: int, headers: Mapping[str, bytes], out_append_ms: int, seen_ms: float
) -> dict[str, float] | None:
    """One change event's latency, stage by stage (ms), from the five times it passed; None when the
    event lacks the worker's timing headers. Broker times are the topics' ``LogAppendTime``.

    >>> h = {"propstream.batch_ms": b"1010", "propstream.sent_ms": b"1040"}
    >>> stage_split(1000.0, 1002, h, 1045, 1046.5)
    {'produce': 2.0, 'to_batch': 8.0, 'batch': 30.0, 'out_append': 5.0, 'to_bench': 1.5}
    """
    from streams.outbox import BATCH_HEADER, SENT_HEADER

    try:
        batch, sent = int(headers[BATCH_HEADER]), int(headers[SENT_HEADER])
    except (KeyError, ValueError):
        return None
    times = (sent_ms, appended_ms, batch, sent, out_append_ms, seen_ms)
    return {name: float(times[i + 1] - times[i]) for i, (name, _) in enumerate(STAGES)}


def changelog_messages(bootstrap: str, app_id: str) -> int:
    """Offsets written to the features and watermarks changelogs (what an empty worker restores,
    less what compaction has removed: nothing, within a bench run)."""
    from kafka import TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [
            TopicPartition(topic, p)
            for topic in (f"{app_id}-features-changelog", f"{app_id}-watermarks-changelog")
            for p in sorted(c.partitions_for_topic(topic) or ())
        ]
        return sum(c.end_offsets(tps).values()) if tps else 0
    finally:
        c.close()


def broker_pid(bootstrap: str) -> int | None:
    """The local broker's process when it serves ``bootstrap`` (its CPU is measured); else None."""
    from streams.broker import LocalBroker

    state = LocalBroker(Settings()).read_state()
    if state is None or not bootstrap.endswith(f":{state.port}"):
        return None
    return state.pid


def latency(
    proc: Proc, settings: Settings, bootstrap: str, users: list[str], rate: float, seconds: float, say: Say
) -> dict[str, Any]:
    """Offer ``rate`` events/s for ``seconds``: produce -> change event consumed, split by stage, and
    lookups meanwhile. The bench's topics keep broker append times (``LogAppendTime``), so the
    producer's acknowledgement and the change event's record carry when each reached the log."""
    sent: dict[str, float] = {}  # event id -> wall ms sent
    appended: dict[str, int] = {}  # event id -> broker append ms
    seen: list[float] = []
    # the second half's alone: the first live event of each user after the catch-up moves most
    # scores, so the changes crowd into the phase's first seconds, after the catch-up's checkpoints
    steady: list[float] = []
    steady_from = time.time() * 1000 + seconds * 500
    stages: dict[str, list[float]] = {name: [] for name, _ in STAGES}
    stop = threading.Event()
    consumer = KafkaConsumer(
        settings.topic_changes,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        isolation_level="read_committed",  # an exactly-once worker's changes count once committed
    )
    consumer.poll(timeout_ms=1000)  # join before producing, so no change is missed

    def read_changes() -> None:
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=200).values():
                now = time.time() * 1000
                for r in records:
                    eid = json.loads(r.value).get("event_id", "")
                    t = sent.get(eid)
                    if t is None:
                        continue
                    seen.append(now - t)
                    if t >= steady_from:
                        steady.append(now - t)
                    at = appended.get(eid)
                    split = None if at is None else stage_split(t, at, dict(r.headers), r.timestamp, now)
                    for name, ms in (split or {}).items():
                        stages[name].append(ms)

    # lookups from a process of their own: in this one they waited for the GIL behind the producer
    client = subprocess.Popen(
        [sys.executable, "-m", "streams.bench.lookup_client", proc.url, str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None
    client.stdin.write(json.dumps(users))
    client.stdin.close()
    threads = [threading.Thread(target=read_changes, daemon=True)]
    for th in threads:
        th.start()
    producer = make_producer(bootstrap)
    enc = msgspec.json.Encoder()
    events = live_events(users, int(rate * seconds), seed=11)

    def on_append(eid: str) -> Callable[[Any], None]:
        def done(meta: Any) -> None:
            appended[eid] = meta.timestamp

        return done

    t_start = time.monotonic()
    broker = broker_pid(bootstrap)
    cpu_start, ticks = proc.cpu_s(), cpu_ticks()
    own_start, broker_start = time.process_time(), cpu_s_of(broker) if broker else math.nan
    # batches and events over the phase: the mean batch size tells a queue from a slow stage
    batches_start = proc.metric("propstream_batch_processing_seconds_count")
    consumed_start = proc.metric("propstream_events_consumed_total")
    last = t_start
    for i, ev in enumerate(events):
        ahead = i / rate - (time.monotonic() - t_start)
        if ahead > 0:
            time.sleep(ahead)
        now = time.time()
        ev["ts"] = int(now * 1000)
        eid = str(ev["event_id"])
        sent[eid] = now * 1000
        key = str(ev["user_id"]).encode()
        fut = producer.send(topic_for(ev["type"], settings), key=key, value=enc.encode(ev))
        fut.add_callback(on_append(eid))
        if time.monotonic() - last > 5:
            last = time.monotonic()
            say(f"  latency: {i:,}/{len(events):,} events offered, {len(seen):,} change events")
    producer.flush()
    offered = len(events) / (time.monotonic() - t_start)
    # CPU seconds per second of the worker while offered the load: about 1 means its Python
    # threads are saturated (one GIL), and a backlog, not a slow stage, makes the latency
    elapsed = time.monotonic() - t_start
    busy = (proc.cpu_s() - cpu_start) / elapsed
    machine_busy = busy_share(ticks, cpu_ticks())
    own = (time.process_time() - own_start) / elapsed  # this process: producer, consumer
    broker_busy = (cpu_s_of(broker) - broker_start) / elapsed if broker else math.nan
    time.sleep(3)  # the last batches' change events
    batches = proc.metric("propstream_batch_processing_seconds_count") - batches_start
    consumed = proc.metric("propstream_events_consumed_total") - consumed_start
    stop.set()
    for th in threads:
        th.join(5)
    assert client.stdout is not None
    looked = json.loads(client.stdout.read())
    client.wait(30)
    lookups: list[float] = looked["ms"]
    timeouts: int = looked["timeouts"]
    producer.close()
    consumer.close()
    out: dict[str, Any] = {
        "offered_events_per_s": offered,
        "worker_cpu_per_s": busy,
        "batches": batches,
        "events_per_batch": consumed / batches if batches else math.nan,
        "machine_busy_share": machine_busy,
        "bench_cpu_per_s": own,
        "broker_cpu_per_s": broker_busy,
        "changes": len(seen),
        "e2e_p50_ms": percentile(seen, 50),
        "e2e_p95_ms": percentile(seen, 95),
        "e2e_p99_ms": percentile(seen, 99),
        "changes_second_half": len(steady),
        "e2e_second_half_p50_ms": percentile(steady, 50),
        "e2e_second_half_p99_ms": percentile(steady, 99),
        "lookups": len(lookups),
        "lookup_timeouts": timeouts,
        "lookup_p50_ms": percentile(lookups, 50),
        "lookup_p99_ms": percentile(lookups, 99),
    }
    out["stages"] = {
        name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "n": len(v)}
        for name, v in stages.items()
    }
    return out


def quix_peer(
    settings: Settings, bootstrap: str, expect: int, folder: Path, group: str, say: Say
) -> Rate | None:
    """The Quix Streams peer (``streams/bench/quix_peer.py``) over the preloaded topics, in a process of
    its own; None (said why) when quixstreams is not installed or the run fails."""
    import importlib.util

    if importlib.util.find_spec("quixstreams") is None:
        say("  peer: quixstreams is not installed (pip install 'quixstreams>=3.28,<4'): skipped")
        return None
    argv = [sys.executable, "-m", "streams.bench.quix_peer", bootstrap, ",".join(settings.source_topics)]
    argv += [f"propstream-bench-quix-{group}", str(folder / "quix"), str(expect)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired:
        say("  peer: no result in 30 minutes: skipped")
        return None
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        say(f"  peer: failed (exit {res.returncode}): {res.stderr.strip()[-300:]}")
        return None
    row = json.loads(lines[-1])
    rate = Rate(row["events_per_s"], row["events_per_cpu_s"])
    say(f"  peer: {rate.per_s:,.0f} events/s, {rate.per_cpu_s:,.0f} per CPU second")
    return rate


def growth(sizes: list[int], events: int, folder: Path, say: Say) -> list[dict[str, float]]:
    out = []
    for users in sizes:
        say(f"  growth: {users:,} users (fill, then {events:,} timed events) ...")
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "streams.bench.growth",
                str(users),
                str(events),
                str(folder / f"g{users}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(res.stdout.strip().splitlines()[-1])
        say(
            f"  growth: {users:,} users: {row['us_per_event']:.0f} us/event, "
            f"{row['us_per_fire']:.0f} us per timer fire ({row['fires']:,}), "
            f"peak RSS {row['peak_rss_mb']:.0f} MiB, {row['rocksdb_bytes_per_user']:.0f} B/user"
        )
        out.append(row)
    return out
