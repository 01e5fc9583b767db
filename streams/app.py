"""The Faust application: topics, the RocksDB-backed tables, the ingest agent and web views.

One row per user in the ``features`` table holds feature state, score state and ledger
(``streams/rows.py``); ``watermarks`` and ``trainer`` are the other tables. Built by
:func:`create_app` from a :class:`Settings`, never at import time, so tests and the CLI can run
several differently configured apps in one interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import aiohttp
import faust
from aiohttp.web import Response as AioResponse
from faust.sensors.monitor import Monitor
from faust.streams import _current_event
from faust.types import TP
from faust.web import Request, Response, View
from faust.web.exceptions import WebError
from prometheus_client import CONTENT_TYPE_LATEST

from models.scoring import ScoringCore
from streams.audience_api import AudienceReader, http_fetch, local_figures
from streams.checkpoint_producer import CheckpointProducer
from streams.direct import Committer, DirectIngest, RecordSink
from streams.erasure import attach_erasure
from streams.faults import Faults
from streams.faust_fixes import current_events, recover_transactions
from streams.faust_fixes import install as install_faust_fixes
from streams.ingest import DeadLetter, IngestHandler, Record, decode_mark, encode_mark
from streams.lookup import BadQuery, Lookups, PartitionClock, page_query, partition_of
from streams.metrics import Metrics
from streams.model_feed import LiveModels
from streams.model_metrics import ModelMetrics
from streams.outbox import DELETE, Outbox, drain_buffer
from streams.privacy import Pseudonymizer
from streams.read_server import LocalReads, ReadServer
from streams.rows import LEDGER, SCORES, PartKV, RowStore, UserRows
from streams.score_stage import ScoreStage
from streams.settings import Settings
from streams.trainer import attach_trainer
from streams.user_api import BAD_AS_OF, Answer, UserAnswers, as_of_query, refused, token_refused

FEATURE_TABLE = "features"
EXIT_BATCH_FAILED = 70  # EX_SOFTWARE: the supervisor restarts the worker; its events are redelivered

log = logging.getLogger(__name__)


class FaustMarks:
    """The partition context and the persisted watermarks for :class:`streams.rows.RowStore`.

    Faust picks the changelog partition and the RocksDB file from the *current event*; a batch
    mixes partitions, so each partition's writes run with one of its own events made current.
    """

    def __init__(self, marks: Any, outbox: Outbox) -> None:
        self.marks = marks
        self.outbox = outbox

    @contextmanager
    def partition(self, record: Record) -> Iterator[None]:
        token = _current_event.set(weakref.ref(record.ctx))
        try:
            yield
        finally:
            _current_event.reset(token)

    def get_mark(self, topic: str, partition: int) -> int | None:
        key = f"{topic}|{partition}"
        held, raw = self.outbox.get(self.marks, key)
        if not held:
            raw = self.marks.get(key)
        return decode_mark(raw) if raw is not None else None

    def set_mark(self, topic: str, partition: int, ts_ms: int) -> None:
        # after the rows: a watermark durable without its batch's rows would refuse them as late
        self.outbox.write(self.marks, f"{topic}|{partition}", encode_mark(ts_ms), last=True)


def current_records(batch: Any, generation: int) -> tuple[list[Record], int]:
    """The batch's records of consumer generation ``generation``, and how many were of an older one.

    Faust's ``take_events`` buffer outlives a rebalance, so a batch can hold records fetched before
    it: of partitions another worker owns now, or that this one owns again from their committed
    offset. Processing them wrote rows the new owner also writes, and moved a watermark past records
    the seek delivers again, which were then refused as late. They are dropped instead
    (:func:`streams.faust_fixes.current_events`): the partition's owner reads them again.
    """
    events, stale = current_events(batch, generation)
    out = [
        Record(
            ev.message.topic, ev.message.partition, ev.message.offset, ev.message.key, ev.message.value, ev
        )
        for ev in events
    ]
    return out, stale


class FaustKV:
    """:class:`streams.rows.Backend` over a Faust table whose writes are held in the batch's
    :class:`~streams.outbox.Outbox` until its outputs allow them (writes need the partition context)."""

    def __init__(self, table: Any, outbox: Outbox) -> None:
        self.table = table
        self.outbox = outbox

    def get(self, key: str) -> bytes | None:
        held, value = self.outbox.get(self.table, key)
        if held:
            out: bytes | None = value
            return out
        ref = _current_event.get(None)
        event = ref() if ref is not None else None
        if event is not None:
            # Inside a partition's work: that partition's RocksDB, read once. The table's own get
            # reads it twice (a contains, then the get) through four layers: 3.5% of the worker.
            db = self.table.data._db_for_partition(event.message.partition)
            raw: bytes | None = db.get(key.encode())
            return raw
        out = self.table.get(key)  # lookups between batches: the table finds the partition
        return out

    def set(self, key: str, value: bytes) -> None:
        self.outbox.write(self.table, key, value)

    def delete(self, key: str) -> None:
        self.outbox.write(self.table, key, DELETE)

    def scan(self, partition: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        """The rows of ``partition`` in key order, as stored with the outbox's held writes (rows of
        batches since the last checkpoint) merged in; the batch's own are ``UserRows``' to add."""
        store = self.table.data  # faust's RocksDB store: one database per partition
        db = store._db_for_partition(partition)
        start = after.encode() if after is not None else None
        held = self.outbox.held_keys(self.table, partition, after)
        i = 0
        for raw_key, value in db.items(from_key=start):
            if raw_key == start or raw_key == store.offset_key:
                continue
            key = raw_key.decode()
            while i < len(held) and held[i][0] < key:
                if held[i][1] is not DELETE:
                    yield held[i]
                i += 1
            if i < len(held) and held[i][0] == key:
                if held[i][1] is not DELETE:
                    yield held[i]
                i += 1
                continue
            yield key, value
        for key, v in held[i:]:
            if v is not DELETE:
                yield key, v


class QuietMonitor(Monitor):
    """Faust's monitor without its per-message, per-event and per-table-access bookkeeping.

    Nothing reads those statistics (``/metrics`` is our own registry), yet Faust's ``Monitor``
    records them for every event; the hooks the consumer needs for commits and offsets stay.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_table_get(self, table: Any, key: Any) -> None:
        pass

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        pass

    def on_table_del(self, table: Any, key: Any) -> None:
        pass

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> None:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        pass


def create_app(settings: Settings, bootstrap: str | None = None) -> faust.App:
    """A configured Faust app with its agent, table and views attached."""
    install_faust_fixes()  # a message skipped during a rebalance must not be committed
    servers = bootstrap or settings.broker_url
    faust_socket = os.path.join(tempfile.mkdtemp(prefix="propstream-web-"), "faust.sock")
    app = faust.App(
        settings.app_id,
        broker=",".join(f"kafka://{s}" for s in servers.split(",")),
        store="rocksdb://",  # faust's RocksDB store, on the rocksdict driver (see Table options)
        datadir=str(settings.state_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=True,
        # Faust's views listen on a private Unix socket; the public port is the read server's
        # (streams/read_server.py), which answers local lookups off the loop and passes the rest on.
        web_transport=f"unix://{faust_socket}",
        web_host=settings.web_host,
        web_port=settings.web_port,
        canonical_url=f"http://{settings.web_advertise or settings.web_host}:{settings.web_port}",
        web_in_thread=False,  # faust's web thread crashes its conductor (a mode Event of another loop)
        producer_linger_ms=5,
        # One changelog message per user and table per batch: fill large produce requests (Faust's
        # default is 16 KiB) so the broker sees a few big requests per batch, not hundreds.
        producer_max_batch_size=1024 * 1024,
        Monitor=QuietMonitor,
        # Deep per-partition buffers and large fetches keep the batched agent fed during catch-up.
        stream_buffer_maxsize=max(16384, settings.batch_size * 4),
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    app.propstream_fetch_wait_s = settings.fetch_wait_s  # type: ignore[attr-defined]  # streams.faust_fixes

    metrics = Metrics()
    faults = Faults(metrics)
    app.propstream_metrics = metrics  # type: ignore[attr-defined]
    metrics.watch_app(app)
    table = app.Table(
        FEATURE_TABLE,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        options={"driver": "rocksdict"},
        help="Per user: feature state, score state and pending-label ledger in one value "
        "(streams/rows.py), one changelog message per user per batch.",
    )
    marks = app.Table(
        "watermarks",
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        options={"driver": "rocksdict"},
        help="Newest event time per source topic and partition: the lateness watermark survives restarts.",
    )
    source = app.topic(*settings.source_topics, key_serializer="raw", value_serializer="raw")
    deadletter = app.topic(settings.topic_deadletter, key_serializer="raw", value_serializer="raw")

    # rows, watermarks and examples go out at checkpoints (streams/outbox.py) through the worker's
    # own producer; exactly-once, each checkpoint is a transaction. Without direct consume a
    # checkpoint follows every batch.
    exactly_once = settings.processing_guarantee == "exactly_once"
    checkpoints = CheckpointProducer(
        servers, settings.app_id, settings.worker_transactional_id() if exactly_once else None
    )
    if exactly_once:
        recover_transactions(app, servers)
    outbox = Outbox(
        checkpoints,
        settings.checkpoint_interval_s if settings.direct_consume else 0.0,
        settings.checkpoint_rows,
        push=lambda: drain_buffer(app.producer.buffer),
        observe=metrics.record_checkpoint,
    )

    def send_dead_letter(dl: DeadLetter) -> None:  # at the batch's end, with its other outputs
        outbox.send_early(deadletter, dl.record.key, dl.record.value, dl.headers())

    rows = UserRows(FaustKV(table, outbox))
    # The HTTP API's own rows: lookups run on the loop while a batch is processed in its thread
    # (batch_in_thread), and must neither see nor add to the row cache of the partition being
    # processed. They read what is stored, or held by the outbox.
    lookup_rows = UserRows(FaustKV(table, outbox))
    stage, live = _scoring(app, settings, metrics, faults, rows, outbox)
    store = RowStore(rows, FaustMarks(marks, outbox))
    pseudonym = Pseudonymizer(settings.pseudonymize_key)  # lookups and erasure take raw ids
    attach_erasure(app, settings, table, pseudonym, faults, outbox, stage.erased)

    def caught_up(topic: str, partition: int) -> bool:
        """Has this worker read everything of the topic partition so far (no lag)?"""
        consumer = getattr(app, "_consumer", None)
        if consumer is None:
            return False
        tp = TP(topic, partition)
        try:
            high = consumer.highwater(tp)
        except Exception:  # not assigned (any more), or no fetch answered yet
            return False
        if high is None or high < 0:
            return False
        read = consumer._read_offset.get(tp)
        return high == 0 if read is None else read + 1 >= high

    handler = IngestHandler(
        settings, store, send_dead_letter, metrics, stage=stage, faults=faults, caught_up=caught_up
    )
    app.propstream_handler = handler  # type: ignore[attr-defined]
    sink: RecordSink | None = None
    committer: Committer | None = None
    if settings.direct_consume:
        sink = RecordSink(settings.source_topics, max(16384, settings.batch_size * 4))
        app.propstream_sink = sink  # type: ignore[attr-defined]  # read by streams.faust_fixes

        async def commit(offsets: dict[TP, int]) -> None:
            consumer: Any = app.consumer  # Faust's own commit: flush, commit, table offsets
            await consumer._commit_offsets(offsets)

        committer = Committer(commit, lambda exc: faults.failed("commit", exc))

    async def ingest(stream: Any) -> None:  # faust's StreamT stub lacks take_events
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            started_ms = int(time.time() * 1000)  # the outputs' timing header (streams/outbox.py)
            # Score a backlog with the published models, not version 0. The wait is inside the loop:
            # until the stream is iterated it has no channel, and Faust's conductor hands a record
            # that arrives then to nobody (its offset is committed all the same: the event is lost).
            if not live.caught_up.is_set():
                await live.caught_up.wait()
            async with outbox.lock:
                # judged after every wait: a rebalance may have come while the batch waited
                records, stale = current_records(batch, app.consumer_generation_id)
                if stale:
                    metrics.stale_records.inc(stale)
                if not records:
                    continue
                outbox.started_ms = started_ms
                try:
                    await off_loop(handler.process, records)
                    await outbox.release()
                except asyncio.CancelledError as exc:
                    # Faust acks the batch on the way out (take_events): finish its writes first,
                    # or die before a commit could cover events whose rows were never written.
                    try:
                        await asyncio.wait_for(outbox.release(), 10.0)
                    except BaseException:
                        stop_unacked(exc, records)
                    raise
                except BaseException as exc:
                    stop_unacked(exc, records)

    async def off_loop(fun: Any, *args: Any) -> Any:
        """``fun(*args)`` in a thread (``batch_in_thread``), so lookups, fetches and heartbeats go on
        meanwhile; awaited to its end even when cancelled: nothing else may touch the handler's
        state while it runs (revocations, ticks and erasures wait for ``outbox.lock``)."""
        if not settings.batch_in_thread:
            return fun(*args)
        work = asyncio.ensure_future(asyncio.to_thread(fun, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            failure = work.exception()
            if failure is not None:
                raise failure from None
            raise

    if sink is not None and committer is not None:
        direct = DirectIngest(
            sink,
            outbox,
            committer,
            functools.partial(off_loop, handler.process),
            lambda: app.consumer_generation_id,
            metrics.stale_records.inc,
            stop_unacked,
            settings.batch_size,
        )

        @app.task
        async def ingest_direct() -> None:
            """The hot path: batches of source records straight from the fetches (streams/direct.py)."""
            await live.caught_up.wait()  # score a backlog with the published models, not version 0
            await direct.run()

    @app.timer(1.0)
    async def idle_clock() -> None:
        """Live only: quiet partitions move their event-time clock on, so their timers fire."""
        async with outbox.lock:
            outbox.started_ms = int(time.time() * 1000)
            try:
                await off_loop(handler.tick)
            except Exception as exc:
                faults.failed("tick", exc)
            try:
                await outbox.send_outputs()
                await outbox.checkpoint()
            except Exception as exc:  # the rows or outputs of a checkpoint could not be written
                stop_unacked(exc, [])

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked_ingest(app: Any, revoked: set[Any], **kwargs: Any) -> None:
        async with outbox.lock:  # after the batch in hand: its thread reads these partitions' state
            await outbox.release()  # a checkpoint: the batches processed so far, committed below
            handler.forget_partitions({tp.partition for tp in revoked if tp.topic in settings.source_topics})
            if sink is not None:  # fetched before the rebalance: each owner reads it from the commit
                metrics.stale_records.inc(sink.clear())
            if committer is not None:  # what was processed, committed by the old generation
                await committer.drain()

    stop_consumer = app._stop_consumer

    async def checkpoint_then_stop_consumer() -> None:
        """A graceful stop writes what the outbox holds and commits it while the consumer, the
        tables and the producer still run (Faust stops them first thing in ``App.on_stop``)."""
        try:
            async with asyncio.timeout(15):
                async with outbox.lock:
                    await outbox.release()
                if committer is not None:
                    await committer.drain()
        except Exception as exc:  # the next owner reads the uncommitted records again
            faults.failed("checkpoint", exc)
        with contextlib.suppress(Exception):  # an open transaction is aborted by the broker in time
            await checkpoints.stop()
        await stop_consumer()

    app._stop_consumer = checkpoint_then_stop_consumer  # type: ignore[method-assign]
    app.agent(source, name="ingest")(ingest)
    params = settings.feature_params()

    token = settings.api_token.get_secret_value() if settings.api_token is not None else None

    def unauthorized(web: Any, request: Request) -> Response | None:
        """The 401 to answer when a token is configured and the request lacks it."""
        denied = token_refused(token, request.headers.get("Authorization", ""))
        return None if denied is None else web.json(denied.body, status=denied.status)

    async def routable() -> None:
        """Faust routes a lookup with its producer's metadata of the features changelog, which the
        producer only has once it has written there: fetch it first (a lookup right after start
        otherwise fails inside aiokafka's partitioner with a TypeError, answered 500)."""
        producer = app.producer._ensure_producer()  # type: ignore[attr-defined]  # faust's aiokafka driver
        topic = table.changelog_topic.get_topic_name()
        if producer._metadata.partitions_for_topic(topic) is None:
            await asyncio.wait_for(producer.partitions_for(topic), 5.0)

    def checked(fun: Any) -> Any:
        """Token and user id checked *before* routing (the router hashes the id as UTF-8), JSON errors.

        A bad id is a 400; an owner that does not answer (it died, the group is rebalancing) a 503;
        anything unexpected a 500, logged here. The owner re-checks the token of a forwarded request.
        """

        @functools.wraps(fun)
        async def get(view: View, request: Request, user_id: str) -> Response:
            denied = refused(token, request.headers.get("Authorization", ""), user_id)
            if denied is not None:
                return view.json(denied.body, status=denied.status)
            try:
                await routable()
                return await fun(view, request, user_id=user_id)
            except WebError:
                raise  # Faust answers these as JSON itself (e.g. 503 while no owner is known)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                detail = f"the worker owning this user did not answer ({type(exc).__name__}); retry"
                return error(view, 503, "owner_unavailable", detail)
            except Exception:
                log.exception("lookup of user %r failed", pseudonym(user_id))
                return error(view, 500, "internal", "lookup failed; see the worker's log")

        return get

    # scores and features as of an event time (streams/lookup.py): the partition's clock by default
    clock = PartitionClock(handler.watermarks.clock, store, settings.source_topics)
    lookups = Lookups(stage.core, lookup_rows, clock, faults)
    served_by = app.conf.canonical_url.human_repr()
    answers = UserAnswers(stage.core, params, pseudonym, faults, settings.partitions, served_by)
    changelog = table.changelog_topic.get_topic_name()

    def moving() -> bool:
        """Are partitions moving or tables recovering? Only the loop's views answer then."""
        return bool(app.rebalancing or app.in_recovery)

    def owns(partition: int) -> bool:
        """Is ``partition`` of the features table actively assigned to this worker?"""
        return bool(app.assignor.is_active(TP(changelog, partition)))

    def loop_row(key: str, partition: int) -> bytes | None:
        """A user's row as Faust's views read it, on the loop (the table finds the partition)."""
        return lookup_rows.backend.get(key)

    # The read server's thread: its own reads of open partitions, and its own clock over them.
    reads = LocalReads(table, marks, outbox)
    thread_clock = PartitionClock(handler.watermarks.clock, reads, settings.source_topics)

    def local(
        user_id: str, as_of: str | None, headers: Mapping[str, str], features_only: bool
    ) -> Answer | None:
        """Answered on the read thread when this worker owns the user's partition and nothing is
        moving; None passes the request to Faust's views (routing, rebalances, recovery)."""
        denied = refused(token, headers.get("Authorization", ""), user_id)
        if denied is not None:
            return denied
        if moving() or not owns(partition_of(user_id, settings.partitions)):
            return None
        return answers.answer(user_id, as_of, reads.row, thread_clock, features_only=features_only)

    served = metrics.lookups.labels
    front = ReadServer(
        settings.web_host, settings.web_port, faust_socket, local, lambda how: served(how).inc()
    )
    app.propstream_front = front  # type: ignore[attr-defined]

    @app.task
    async def serve_reads() -> None:
        """Open the public port: lookups of this worker's users are answered off the loop."""
        front.start()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def close_front(app: Any, **kwargs: Any) -> None:
        front.stop()
        shutil.rmtree(os.path.dirname(faust_socket), ignore_errors=True)

    def owners() -> dict[int, str]:
        """Partition -> base URL of the worker owning it in the features table (the assignor's view)."""
        out = {}
        for url, topics in app.router.table_metadata(FEATURE_TABLE).items():
            for p in topics.get(changelog, ()):
                out[p] = str(url).rstrip("/")
        return out

    @app.page("/users/{user_id}")
    class UserView(View):
        """Features plus, per target, score, tier, model version and top factors, as of the user's
        partition's event-time clock (or ``as_of``; never before the user's last event). The read
        server answers the users of this worker itself; these views answer what it passes on."""

        @checked
        @app.table_route(table=table, match_info="user_id")  # type: ignore[arg-type]
        async def get(self, request: Request, user_id: str) -> Response:
            answer = answers.answer(user_id, request.query.get("as_of"), loop_row, clock)
            return self.json(answer.body, status=answer.status)

    @app.page("/models")
    class ModelsView(View):
        """The model versions this worker scores with, and their rolling quality on matured labels."""

        async def get(self, request: Request) -> Response:
            out = {}
            for name, m in live.models.items():
                snap = live.snapshots.get(name)
                out[name] = {
                    "version": m.version,
                    "warming_up": m.warming_up,
                    "trust": m.trust.as_dict(),  # trusted, and why (label counts, then the trust gate)
                    "positives": m.model.positives,
                    "negatives": m.model.negatives,
                    "created_ms": snap.created_ms if snap else None,
                    "trained_to_ms": snap.trained_to_ms if snap else None,
                    "note": snap.note if snap else "",
                    "quality": _finite(snap.quality) if snap else {},
                }
            return self.json({"served_by": app.conf.canonical_url.human_repr(), "models": out})

    def error(web: Any, status: int, code: str, message: str) -> Response:
        return web.json({"error": code, "message": message}, status=status)

    @app.page("/users/{user_id}/features")
    class UserFeatures(View):
        """Current features of one user, answered by the worker owning the user's partition."""

        @checked
        @app.table_route(table=table, match_info="user_id")  # type: ignore[arg-type]
        async def get(self, request: Request, user_id: str) -> Response:
            answer = answers.answer(user_id, request.query.get("as_of"), loop_row, clock, features_only=True)
            return self.json(answer.body, status=answer.status)

    @app.page("/partitions")
    class PartitionsView(View):
        """Which worker owns which partition of the features table, and the targets: any worker
        answers (``propstream score`` starts here, then asks each owner for its partitions)."""

        async def get(self, request: Request) -> Response:
            denied = unauthorized(self, request)
            if denied is not None:
                return denied
            known = owners()
            return self.json(
                {
                    "partitions": settings.partitions,
                    "targets": [t.name for t in settings.target_list()],
                    "owners": {str(p): known.get(p) for p in range(settings.partitions)},
                    "served_by": app.conf.canonical_url.human_repr(),
                }
            )

    @app.page("/scores")
    class ScoresView(View):
        """A page of one partition's users, in key order, with their scores as of a time (default:
        the partition's clock); only the partition's owner answers, others say who owns it (409)."""

        async def get(self, request: Request) -> Response:
            denied = unauthorized(self, request)
            if denied is not None:
                return denied
            try:
                q = page_query(request.query, settings.partitions)
            except BadQuery as exc:
                return error(self, 400, exc.code, str(exc))
            ok, requested = as_of_query(request.query.get("as_of"))
            if not ok:
                return error(self, 400, "bad_as_of", BAD_AS_OF)
            if moving():
                return error(self, 503, "not_ready", "partitions are moving or recovering; retry")
            if not owns(q.partition):
                owner = owners().get(q.partition)
                body = {"error": "not_owner", "message": f"partition {q.partition} is served by {owner}"}
                return self.json({**body, "owner": owner}, status=409)
            page = await lookups.page(q, requested)
            return self.json({**page, "served_by": app.conf.canonical_url.human_repr()})

    audiences = AudienceReader(
        stage.core.audiences, settings.partitions, stage, lookups, owners, owns, served_by
    )

    @app.page("/audiences")
    class AudiencesView(View):
        """Every audience: definition, members and expected converters over all partitions (any
        worker answers, asking the others); ``?local=1``: this worker's partitions only."""

        async def get(self, request: Request) -> Response:
            denied = unauthorized(self, request)
            if denied is not None:
                return denied
            if moving():
                return error(self, 503, "not_ready", "partitions are moving or recovering; retry")
            if request.query.get("local") == "1":
                return self.json(local_figures(stage, audiences.owned()))
            fetch = http_fetch(request.headers.get("Authorization"))
            return self.json({**await audiences.figures(fetch), "served_by": served_by})

    @app.page("/audiences/{name}")
    class AudienceMembers(View):
        """A page of an audience's members with their scores as of their partition's clock;
        ``cursor`` from the previous page's ``next`` (null: done); ``?partition=P``: one partition,
        answered by its owner only."""

        async def get(self, request: Request, name: str) -> Response:
            denied = unauthorized(self, request)
            if denied is not None:
                return denied
            if name not in audiences.names:
                known = ", ".join(sorted(audiences.names)) or "none (PROPSTREAM_AUDIENCES)"
                return error(self, 404, "unknown_audience", f"no audience {name!r}; defined: {known}")
            if moving():
                return error(self, 503, "not_ready", "partitions are moving or recovering; retry")
            q = request.query
            try:
                if "partition" in q:
                    p = page_query(q, settings.partitions).partition
                    if not owns(p):
                        owner = owners().get(p)
                        body = {"error": "not_owner", "message": f"partition {p} is served by {owner}"}
                        return self.json({**body, "owner": owner}, status=409)
                    return self.json(await audiences.local_page(name, q))
                limit = page_query({**q, "partition": "0"}, settings.partitions).limit
                fetch = http_fetch(request.headers.get("Authorization"))
                status, page = await audiences.page(name, q.get("cursor"), limit, fetch)
            except BadQuery as exc:
                return error(self, 400, exc.code, str(exc))
            return self.json({**page, "served_by": served_by}, status=status)

    @app.page("/healthz")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok", "time": time.time()})

    @app.page("/readyz")
    class Ready(View):
        """Ready once partitions are assigned and table recovery has finished."""

        async def get(self, request: Request) -> Response:
            recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
            assigned = bool(app.consumer.assignment()) if recovered else False
            ready = recovered and assigned and not app.rebalancing
            body = {
                "ready": ready,
                "recovered": recovered,
                "assigned": assigned,
                "rebalancing": app.rebalancing,
            }
            return self.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> AioResponse:
            # aiohttp refuses a charset inside content_type=, so set the exact Prometheus header.
            return AioResponse(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app


def stop_unacked(exc: BaseException, records: list[Record]) -> NoReturn:
    """A batch failed outside any one user (the store, the producer): stop the process now.

    Faust acks a batch's events when its body ends, even by an exception, so carrying on would
    commit offsets of events that were never written. Exiting at once, inside the body, leaves
    them uncommitted: the next owner of the partitions (this worker restarted, or another) gets
    them again, and per-user dedup makes the part already written harmless (docs/guarantees.md).
    """
    first = records[0] if records else None
    where = f" (first {first.topic}[{first.partition}]@{first.offset})" if first else ""
    log.critical("a batch of %d events failed%s; stopping unacknowledged", len(records), where, exc_info=exc)
    logging.shutdown()
    os._exit(EXIT_BATCH_FAILED)


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: a figure that is undefined so far (one class only) is null."""
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def _scoring(
    app: faust.App, settings: Settings, metrics: Metrics, faults: Faults, rows: UserRows, outbox: Outbox
) -> tuple[ScoreStage, LiveModels]:
    """Topics, live models, the trainer and the score stage the ingest handler calls (the score
    state and the ledger it keeps are parts of the user's row in ``rows``; its outputs go through
    ``outbox``, in the order that module explains)."""
    model_metrics = ModelMetrics(metrics.registry)
    live = LiveModels(
        settings, lambda name, m, snap: model_metrics.record_model(name, m, snap.quality), faults
    )
    live.lock = outbox.lock  # versions swap in between batches, never inside one
    for name, m in live.models.items():
        model_metrics.record_model(name, m, {})

    # the score state and the ledger are parts of the user's row in the features table
    scores, ledgers = PartKV(rows, SCORES), PartKV(rows, LEDGER)
    changes = app.topic(settings.topic_changes, key_serializer="raw", value_serializer="raw")
    training = app.topic(settings.topic_training, key_serializer="raw", value_serializer="raw")

    def send_change(user_id: str, value: bytes) -> None:
        outbox.send_early(changes, user_id.encode(), value)

    def send_example(target: str, value: bytes) -> None:
        outbox.send_late(training, target.encode(), value)

    triggers = app.topic(settings.topic_triggers, key_serializer="raw", value_serializer="raw")

    def send_trigger(user_id: str, value: bytes) -> None:
        outbox.send_early(triggers, user_id.encode(), value)

    audiences = app.topic(settings.topic_audiences, key_serializer="raw", value_serializer="raw")

    def send_audience(key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        outbox.send_early(audiences, key, value, headers)

    core = ScoringCore(
        settings.target_list(),
        settings.feature_params(),
        settings.change_rules(),
        live.models,
        top_k=settings.top_factors,
        timers=settings.timer_config(),
        audiences=settings.audience_list(),
        audience_cooldown_ms=settings.audience_cooldown_s * 1000,
        currency=settings.default_currency,
    )
    stage = ScoreStage(
        core,
        scores,
        ledgers,
        send_change,
        send_example,
        model_metrics,
        faults=faults,
        send_trigger=send_trigger,
        index_slice=settings.index_slice,
        send_audience=send_audience,
    )
    trainers = attach_trainer(app, settings, live, model_metrics, faults)
    servers = app.conf.broker[0]

    @app.task
    async def follow_models() -> None:
        await live.follow(f"{servers.host}:{servers.port}")

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: Any, revoked: set[Any], **kwargs: Any) -> None:
        async with outbox.lock:  # after the batch in hand (its thread may be reading the heaps)
            stage.forget({tp.partition for tp in revoked if tp.topic in settings.source_topics})
        trainers.clear()  # the next owner of the training log may move on: reload from the table

    return stage, live
