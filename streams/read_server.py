"""The worker's HTTP front: single-user lookups on a thread of their own, the rest to Faust.

A lookup served on Faust's event loop waits for whatever the loop is doing: a partition's slice of
a batch, a checkpoint's writes. Its p99 under load was 70-180 ms. This server owns the public port
in a thread with its own loop: ``GET /users/{id}`` and ``GET /users/{id}/features`` of a user whose
partition this worker owns are answered here, from RocksDB and the outbox's held rows, while the
event loop works. Every other request, and a user this worker does not own (Faust routes it to the
owner, whose own front answers it), is passed to Faust's web server on a Unix socket.

The thread only reads: a row held by the outbox (written at the next checkpoint) first, then the
partition's RocksDB, which Faust writes before it forgets the held row, so a read never sees an
older row than the loop would. Python gives the GIL to a waiting thread every switch interval
(5 ms by default), and a lookup waits for it a few times, so the worker sets 1 ms
(:data:`SWITCH_INTERVAL_S`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from faust.utils import json as faust_json
from yarl import URL

from streams.ingest import decode_mark
from streams.outbox import Outbox
from streams.user_api import Answer

SWITCH_INTERVAL_S = 0.001
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}
)

log = logging.getLogger(__name__)


class NotLocal(LookupError):
    """The partition's store is not open on this worker (not assigned, or moving): ask Faust."""


class LocalReads:
    """Rows and watermarks of partitions this worker has open, safe to read from another thread.

    Faust's own ``table.get`` finds a key's partition from the current event or by opening
    stores, neither of which a second thread may do; this reads the partition's open database
    directly, never opening one.
    """

    def __init__(self, table: Any, marks: Any, outbox: Outbox) -> None:
        self.table = table
        self.marks = marks
        self.outbox = outbox

    def _read(self, table: Any, key: str, partition: int) -> bytes | None:
        held, value = self.outbox.get(table, key)
        if held:
            out: bytes | None = value
            return out
        db = table.data._dbs.get(partition)  # faust's RocksDB store: one open database per partition
        if db is None:
            raise NotLocal(partition)
        raw: bytes | None = db.get(key.encode())
        return raw

    def row(self, key: str, partition: int) -> bytes | None:
        return self._read(self.table, key, partition)

    def get_mark(self, topic: str, partition: int) -> int | None:
        raw = self._read(self.marks, f"{topic}|{partition}", partition)
        return decode_mark(raw) if raw is not None else None


# (user id, as_of query value, request headers, features only) -> the answer; None: not ours, ask Faust
Local = Callable[[str, str | None, Mapping[str, str], bool], Answer | None]


class ReadServer:
    """Public HTTP port: local single-user lookups in this thread, everything else proxied to Faust."""

    def __init__(
        self, host: str, port: int, faust_socket: str, local: Local, served: Callable[[str], None]
    ) -> None:
        self.host = host
        self.port = port
        self.faust_socket = faust_socket
        self.local = local
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="propstream-reads", daemon=True)
        self.served = served  # counts a user lookup by where it was answered ("thread", "faust")

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind the port and serve; raises what binding raised (the port is taken, say)."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            msg = f"the HTTP front did not start on {self.host}:{self.port} within {timeout_s} s"
            raise TimeoutError(msg)
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5.0)

    # --- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        runner = web.AppRunner(self._app(), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except BaseException as exc:  # reported by start()
            self._failure = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def _app(self) -> web.Application:
        app = web.Application()
        session: dict[str, aiohttp.ClientSession] = {}

        async def faust(request: web.Request) -> web.StreamResponse:
            """The request as it came, to Faust's web server; its answer as it comes back."""
            s = session.get("s")
            if s is None:
                connector = aiohttp.UnixConnector(path=self.faust_socket)
                s = session["s"] = aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=60)
                )
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            body = await request.read() if request.can_read_body else None
            url = URL("http://faust" + request.raw_path, encoded=True)
            try:
                async with s.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False
                ) as resp:
                    payload = await resp.read()
                    out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                message = f"the worker is starting or stopping ({type(exc).__name__}); retry"
                return _json(Answer(503, {"error": "not_ready", "message": message}))
            return web.Response(status=resp.status, body=payload, headers=out)

        def user(features_only: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
            async def get(request: web.Request) -> web.StreamResponse:
                user_id = request.match_info["user_id"]
                try:
                    answer = self.local(user_id, request.query.get("as_of"), request.headers, features_only)
                except NotLocal:
                    answer = None
                except Exception:  # a partition closing under the read, say: the loop's path knows
                    log.debug("local lookup failed; asking Faust", exc_info=True)
                    answer = None
                if answer is None:
                    self.served("faust")
                    return await faust(request)
                self.served("thread")
                return _json(answer)

            return get

        async def close(_: web.Application) -> None:
            if "s" in session:
                await session["s"].close()

        app.router.add_get("/users/{user_id}", user(features_only=False))
        app.router.add_get("/users/{user_id}/features", user(features_only=True))
        app.router.add_route("*", "/{tail:.*}", faust)
        app.on_cleanup.append(close)
        return app


def _json(answer: Answer) -> web.Response:
    """JSON as Faust's views write it (the same encoder), so either path answers byte-alike."""
    payload = faust_json.dumps(answer.body)
    body = payload if isinstance(payload, bytes) else payload.encode()
    return web.Response(status=answer.status, body=body, content_type="application/json", charset="utf-8")
