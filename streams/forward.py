"""``propstream forward``: deliver change, trigger and audience events to a webhook, at least once.

aiokafka and an aiohttp client in one asyncio loop, rather than kafka-python and a thread: aiokafka
heartbeats the group in the background and lets us pause partitions, so a batch can be retried for
minutes while the member stays in the group, and a revocation or a SIGTERM can interrupt a backoff
at once; aiohttp gives per-request timeouts and keep-alive. Both already come with faust-streaming.

The loop: fetch up to ``forward_batch`` records, pause every partition (the backpressure: nothing
more is fetched while a batch is out, however long the receiver takes), render and POST them
(``streams/webhook.py`` holds every rule: rendering, keys, signing, retries, splitting), write the
events the receiver refused or never took to the dead-letter topic, and only then commit the
batch's offsets. A crash or a kill anywhere before the commit sends the batch again, with the same
idempotency keys. While a batch is out the loop still polls the consumer (its partitions paused),
so a long retry never exceeds ``max.poll.interval.ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, start_http_server

from streams.forward_metrics import ForwardMetrics
from streams.settings import Settings
from streams.webhook import (
    Abandoned,
    Action,
    Answer,
    Event,
    Policy,
    Record,
    Skip,
    dead_letter_headers,
    deliver,
    idempotency_key,
    kinds_of,
    render,
    request_body,
    request_headers,
    retry_after_s,
)

log = logging.getLogger("propstream.forward")
LAG_EVERY_S = 5.0  # how often the lag gauge asks the broker for end offsets
POLL_EVERY_S = 1.0  # while a batch is out: poll the (paused) consumer this often to stay in the group
LOG_EVERY_S = 1.0  # at most one retry line per reason this often; the rest are counted into the next


class ForwardError(RuntimeError):
    """The forwarder cannot start as configured (a topic to deliver does not exist)."""


def forward_topics(settings: Settings) -> list[str]:
    """The topics to deliver: ``forward_topics``, or the change, trigger and audience topics."""
    given = [t.strip() for t in settings.forward_topics.split(",") if t.strip()]
    return given or [settings.topic_changes, settings.topic_triggers, settings.topic_audiences]


def shown_url(url: str) -> str:
    """The URL without credentials or query (either may hold a token), for logs.

    >>> shown_url("https://user:pw@hooks.example.com:8443/in?token=abc")
    'https://hooks.example.com:8443/in'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _record(m: ConsumerRecord[Any, Any]) -> Record:
    return Record(m.topic, m.partition, m.offset, m.key, m.value, tuple(m.headers or ()))


class Forwarder:
    """One forwarder process: a member of the ``forward_group`` consumer group."""

    def __init__(
        self,
        settings: Settings,
        metrics: ForwardMetrics,
        *,
        start_at: str = "earliest",
    ) -> None:
        s = settings
        self.settings = s
        self.metrics = metrics
        self.start_at = start_at
        self.topics = forward_topics(s)
        self.kinds = kinds_of(s.topic_changes, s.topic_triggers, s.topic_audiences, self.topics)
        self.group = s.forward_group or f"{s.app_id}-forward"
        secret = s.forward_secret.get_secret_value() if s.forward_secret is not None else ""
        self.secret = secret.encode() or None  # an empty variable (compose's default) signs nothing
        self.policy = Policy(s.forward_attempts, s.forward_backoff_s, s.forward_backoff_max_s)
        self.rng = random.Random()
        self._stopping = asyncio.Event()
        self._abandon = asyncio.Event()  # set: give up the batch out after its current request
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[TopicPartition, int] = {}  # first offset of the batch out, per partition
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last line, lines held back since)

    def stop(self) -> None:
        """Finish the request in flight, abandon the rest of the batch (uncommitted), and return."""
        self._stopping.set()
        self._abandon.set()

    async def run(self, bootstrap: str) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=self.group,
            client_id="propstream-forward",
            enable_auto_commit=False,
            auto_offset_reset=self.start_at,
            isolation_level="read_committed",  # an exactly-once worker's outputs once committed, only
            max_poll_records=s.forward_batch,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id="propstream-forward", acks="all", enable_idempotence=True
        )
        async with contextlib.AsyncExitStack() as stack:
            await consumer.start()
            stack.push_async_callback(consumer.stop)  # leaves the group: the others take over at once
            await producer.start()
            stack.push_async_callback(producer.stop)
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=s.forward_timeout_s),
                    headers={"User-Agent": "propstream-forward/1"},
                )
            )
            missing = sorted(set(self.topics) - await consumer.topics())
            if missing:
                msg = f"topic(s) {', '.join(missing)} do not exist (PROPSTREAM_FORWARD_TOPICS)"
                raise ForwardError(msg)
            consumer.subscribe(self.topics, listener=_Rebalance(self))
            lag = asyncio.create_task(self._watch_lag(consumer))
            try:
                await self._loop(consumer, producer, session)
            finally:
                lag.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lag

    async def _loop(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, session: aiohttp.ClientSession
    ) -> None:
        held: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        while not self._stopping.is_set():
            if not held:
                held = await consumer.getmany(timeout_ms=500, max_records=self.settings.forward_batch)
            mine = consumer.assignment()
            records = [_record(m) for tp in sorted(held) if tp in mine for m in held[tp]]
            held = {}
            if not records:
                continue
            consumer.pause(*mine)
            self._inflight = {}
            for r in records:
                self._inflight.setdefault(TopicPartition(r.topic, r.partition), r.offset)
            self._abandon.clear()
            if self._stopping.is_set():
                break
            task = self._task = asyncio.create_task(self._handle(records, consumer, producer, session))
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=POLL_EVERY_S)
                    if not task.done():
                        # keeps the member alive; only a new assignment (after a rebalance) is unpaused
                        for tp, more in (await consumer.getmany(timeout_ms=0)).items():
                            held.setdefault(tp, []).extend(more)
                await task
            except Abandoned:
                log.info(
                    "abandoned a batch of %d records, uncommitted: it will be delivered again", len(records)
                )
            finally:
                self._task = None
                self._inflight = {}
                consumer.resume(*consumer.assignment())

    async def _handle(
        self,
        records: Sequence[Record],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        session: aiohttp.ClientSession,
    ) -> None:
        """Deliver one batch, dead-letter what failed, then commit it."""
        events: list[Event] = []
        dead: list[tuple[Record, str, str, int]] = []
        skipped: Counter[tuple[str, str]] = Counter()
        for r in records:
            out = render(r, self.kinds.get(r.topic, "event"))
            if isinstance(out, Event):
                events.append(out)
            elif isinstance(out, Skip):
                skipped[(r.topic, out.reason)] += 1
            else:
                dead.append((r, out.reason, out.detail, 0))
                self._note(
                    "reject", f"{r.topic}[{r.partition}]@{r.offset} is no event ({out.reason}: {out.detail})"
                )

        async def post(chunk: Sequence[Event]) -> Answer:
            return await self._post(session, chunk)

        delivered, failed = await deliver(
            events,
            post,
            self.policy,
            rng=self.rng,
            wait=self._wait,
            stopped=self._abandon.is_set,
            report=self._report,
        )
        for e in delivered:
            self.metrics.sent.labels(e.kind).inc()
        dead += [(e.record, f.reason, f.detail, f.attempts) for f in failed for e in f.events]
        if dead:
            topic = self.settings.topic_forward_deadletter
            sends = [
                await producer.send(
                    topic,
                    key=r.key,
                    value=r.value,
                    headers=dead_letter_headers(r, why, detail, n, idempotency_key(r)),
                )
                for r, why, detail, n in dead
            ]
            await asyncio.gather(*sends)  # acknowledged by the broker before the offsets move on
            for _, why, _, _ in dead:
                self.metrics.dead_letters.labels(why).inc()
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("commit of %d records failed (%s): they will be delivered again", len(records), exc)
            return
        for (topic, reason), n in skipped.items():
            self.metrics.skipped.labels(topic, reason).inc(n)

    async def _post(self, session: aiohttp.ClientSession, events: Sequence[Event]) -> Answer:
        now_ms = int(time.time() * 1000)
        body = request_body(events, now_ms)
        headers = request_headers(body, events, self.secret, now_ms // 1000)
        t0 = time.perf_counter()
        try:
            async with session.post(
                self.settings.forward_url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()  # drained, so the connection is kept alive
                    return Answer(resp.status, "ok")
                head = (await resp.content.read(200)).decode("utf-8", "replace").strip()
                wait = retry_after_s(resp.headers.get("Retry-After"), time.time())
                detail = f"HTTP {resp.status} {resp.reason}" + (f": {head}" if head else "")
                return Answer(resp.status, f"http_{resp.status}", detail, wait)
        except TimeoutError:
            return Answer(None, "timeout", f"no answer within {self.settings.forward_timeout_s:g}s")
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            return Answer(None, "tls", str(exc))
        except aiohttp.ClientConnectorError as exc:
            return Answer(None, "connect", str(exc))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            return Answer(None, "disconnected", str(exc) or type(exc).__name__)
        except aiohttp.ClientError as exc:
            return Answer(None, "client_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.metrics.request_seconds.observe(time.perf_counter() - t0)

    async def _wait(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._abandon.wait(), delay_s)

    def _report(self, answer: Answer, n: int, attempt: int, action: Action, delay_s: float) -> None:
        self.metrics.failed.labels(answer.reason).inc()
        why = answer.detail or answer.reason
        if action == "retry":
            tries = f"try {attempt}/{self.policy.attempts}"
            self._note(answer.reason, f"POST of {n} events failed ({tries}): {why}; next in {delay_s:.2f}s")
        elif action == "split":
            log.warning(
                "the receiver refused %d events (%s): halving the request to find the refused ones", n, why
            )
        else:
            where = self.settings.topic_forward_deadletter
            log.error("%d events go to %s after %d tries: %s", n, where, attempt, why)

    def _note(self, key: str, line: str) -> None:
        """A warning line, at most one per ``key`` each LOG_EVERY_S; the lines held back are counted."""
        now = time.monotonic()
        last, held = self._logged.get(key, (0.0, 0))
        if now - last < LOG_EVERY_S:
            self._logged[key] = (last, held + 1)
            return
        log.warning("%s%s", line, f" ({held} more like it not shown)" if held else "")
        self._logged[key] = (now, 0)

    async def _watch_lag(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                behind = dict.fromkeys(self.topics, 0)
                mine = sorted(consumer.assignment())
                ends = await consumer.end_offsets(mine) if mine else {}
                for tp in mine:
                    done = self._inflight.get(tp)
                    if done is None:
                        done = await asyncio.wait_for(consumer.position(tp), 5)
                    behind[tp.topic] += max(0, ends[tp] - done)
                for topic, n in behind.items():
                    self.metrics.lag.labels(topic).set(n)
            except (KafkaError, IllegalStateError, TimeoutError) as exc:  # a rebalance or the broker away
                log.debug("lag not measured this time: %r", exc)
            await asyncio.sleep(LAG_EVERY_S)


class _Rebalance(ConsumerRebalanceListener):
    """On revocation, let the batch out finish its current request (committed if it was the last),
    and abandon its retries: the partitions' next owner starts from the committed offsets."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        task = self.forwarder._task
        if task is not None and not task.done():
            log.info("partitions revoked while a batch is out: finishing its request, then letting it go")
            self.forwarder._abandon.set()
            await asyncio.wait({task})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "assigned %d partitions: %s", len(assigned), ", ".join(f"{t}[{p}]" for t, p in sorted(assigned))
        )


async def serve(settings: Settings, bootstrap: str, *, start_at: str = "earliest") -> None:
    """Run a forwarder until SIGTERM or SIGINT, with its metrics on ``forward_metrics_port``."""
    s = settings
    registry = CollectorRegistry()
    forwarder = Forwarder(s, ForwardMetrics(registry), start_at=start_at)
    server = None
    if s.forward_metrics_port:
        server, _ = start_http_server(s.forward_metrics_port, addr=s.web_host, registry=registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forwarder.stop)
    log.info(
        "forwarding %s to %s (%s), group %s, new partitions from the %s, up to %d events a request, "
        "%d tries (timeout %gs, backoff %gs..%gs), dead letters to %s, metrics %s",
        ", ".join(forwarder.topics),
        shown_url(s.forward_url),
        "signed" if forwarder.secret is not None else "NOT signed: set PROPSTREAM_FORWARD_SECRET",
        forwarder.group,
        start_at,
        s.forward_batch,
        s.forward_attempts,
        s.forward_timeout_s,
        s.forward_backoff_s,
        s.forward_backoff_max_s,
        s.topic_forward_deadletter,
        f"on {s.web_host}:{s.forward_metrics_port}/metrics" if server is not None else "off",
    )
    try:
        await forwarder.run(bootstrap)
    finally:
        if server is not None:
            server.shutdown()
    log.info("stopped")
