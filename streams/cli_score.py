"""``propstream score``: every user's scores as of a time, fetched from the workers' HTTP APIs.

Any worker says who owns which partition (``GET /partitions``); each partition's owner then pages
through its users in key order (``GET /scores``, a cursor per page), so the export works with any
number of workers and never asks one to hold a whole partition in one answer. A partition whose
owner moves during the export (a rebalance) is picked up at the same cursor by the new owner.
Without ``--as-of`` each partition is scored as of its own event-time clock, fixed at its first
page so every user of a partition is scored at the same time.

Kept free of Faust and the scoring code: this runs on an operator's machine and must start fast.
"""

from __future__ import annotations

import csv
import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import click

from models.ledger import VALUE
from streams.cli_common import DURATION_HELP, Duration, build_settings, fail, setting_option

# status 0: no HTTP answer at all (refused, reset, timed out)
Get = Callable[[str], tuple[int, dict[str, Any]]]
RETRY = {0, 409, 502, 503, 504}  # an owner that moved, is rebalancing or is away: ask again
PAGE_SIZE_HELP = "Users per request, 1..5000 (default: the workers' 500)."
FIELDS = ("score", "tier", "warming_up", "model_version")


class ExportError(Exception):
    """The export cannot go on (a refused request, no owner within the wait); the message says why."""


def http_get(token: str | None, timeout_s: float = 30.0) -> Get:
    """GET a JSON document, with the bearer token when one is configured."""

    def get(url: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(url)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            return exc.code, body if isinstance(body, dict) else {}
        except (OSError, ValueError) as exc:  # URLError is an OSError; a truncated body a ValueError
            return 0, {"error": "unreachable", "message": f"{type(exc).__name__}: {exc}"}

    return get


class Writer:
    """One user per CSV row (``user_id``, each target's score, and ``value_tier``) or per JSON line."""

    def __init__(self, out: TextIO, fmt: str, targets: Sequence[str]) -> None:
        self.out = out
        self.fmt = fmt
        self.targets = tuple(targets)
        self.rows = 0
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        # the CSV's cells per user, after user_id: each target's score, and the value target's tier
        self._cells = [
            (t, k) for t in self.targets for k in (("score", "tier") if t == VALUE else ("score",))
        ]
        if self._csv is not None:
            self._csv.writerow(["user_id", *(t if k == "score" else f"{t}_{k}" for t, k in self._cells)])

    def write(self, user: dict[str, Any]) -> None:
        scores = user["scores"]
        if self._csv is not None:
            self._csv.writerow([user["user_id"], *(scores[t][k] for t, k in self._cells)])
        else:
            entry = {
                "user_id": user["user_id"],
                "as_of_ms": user["as_of_ms"],
                "scores": {t: {k: scores[t][k] for k in FIELDS} for t in self.targets},
            }
            self.out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.rows += 1


@dataclass
class Layout:
    partitions: int
    targets: list[str]
    owners: dict[int, str | None]  # partition -> base URL of its owner (None: unknown just now)


@dataclass
class Stats:
    users: int = 0
    corrupt: int = 0
    partitions_done: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self, partitions: int) -> str:
        took = max(time.monotonic() - self.started, 1e-9)
        skipped = f", {self.corrupt:,} unreadable rows skipped" if self.corrupt else ""
        return (
            f"score: {self.users:,} users written, {self.partitions_done}/{partitions} partitions done, "
            f"{self.users / took:,.0f} users/s ({took:.1f} s){skipped}"
        )


def _problem(status: int, body: dict[str, Any]) -> str:
    return f"{status} {body.get('error', '?')}: {body.get('message', '')}".strip()


class Exporter:
    """Pages every partition from its owner, one thread per partition in flight, in any worker count."""

    def __init__(self, get: Get, entry: str, wait_s: float = 60.0, concurrency: int = 4) -> None:
        self.get = get
        self.entry = entry.rstrip("/")
        self.wait_s = wait_s
        self.concurrency = concurrency
        self.layout: Layout | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # --- who owns what -----------------------------------------------------------------------
    def discover(self) -> Layout:
        """The partition layout, once every partition has an owner (waits through a rebalance)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            layout = self._ask_layout()
            if layout is not None and all(layout.owners.values()):
                return layout
            if time.monotonic() > deadline:
                missing = sorted(p for p, u in (layout.owners if layout else {}).items() if not u)
                msg = f"no owner known for partitions {missing} after {self.wait_s:.0f}s (rebalancing?)"
                raise ExportError(msg)
            time.sleep(0.5)

    def _ask_layout(self) -> Layout | None:
        with self._lock:
            seen = self.layout.owners.values() if self.layout else ()
            known = [self.entry, *sorted({u for u in seen if u})]
        last: tuple[int, dict[str, Any]] = (0, {})
        for url in dict.fromkeys(known):
            status, body = self.get(f"{url}/partitions")
            if status == 200:
                owners = {int(p): (u.rstrip("/") if u else None) for p, u in body["owners"].items()}
                layout = Layout(body["partitions"], list(body["targets"]), owners)
                layout.owners = {p: owners.get(p) for p in range(layout.partitions)}
                with self._lock:
                    self.layout = layout
                return layout
            if status not in RETRY:
                msg = f"{url}/partitions: {_problem(status, body)}"
                raise ExportError(msg)
            last = (status, body)
        if self.layout is None and last[0] == 0:
            msg = f"no worker answers on {self.entry} ({last[1].get('message')})"
            raise ExportError(msg)
        return None

    def _owner(self, partition: int) -> str | None:
        with self._lock:
            return self.layout.owners.get(partition) if self.layout else None

    def _moved(self, partition: int, hint: str | None) -> None:
        if hint:
            with self._lock:
                if self.layout is not None:
                    self.layout.owners[partition] = hint.rstrip("/")
            return
        self._ask_layout()

    # --- pages -------------------------------------------------------------------------------
    def run(
        self,
        emit: Callable[[dict[str, Any]], None],
        as_of: str | None,
        page_size: int | None,
        on_progress: Callable[[Stats, int], None] = lambda s, n: None,
    ) -> Stats:
        """Every user of every partition handed to ``emit`` exactly once; returns the totals."""
        layout = self.layout or self.discover()
        stats = Stats()
        pages: queue.Queue[tuple[int, Any]] = queue.Queue()
        with ThreadPoolExecutor(max(1, min(self.concurrency, layout.partitions))) as pool:
            for p in range(layout.partitions):
                pool.submit(self._partition, p, as_of, page_size, pages)
            done = 0
            try:
                while done < layout.partitions:
                    p, item = pages.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        done += 1
                        stats.partitions_done = done
                    else:
                        for user in item["users"]:
                            emit(user)
                        stats.users += len(item["users"])
                        stats.corrupt += item.get("corrupt", 0)
                    on_progress(stats, layout.partitions)
            finally:
                self._stop.set()  # a failed export stops the other partitions' threads
        return stats

    def _partition(self, p: int, as_of: str | None, page_size: int | None, pages: queue.Queue[Any]) -> None:
        try:
            self._pages(p, as_of, page_size, pages)
        except BaseException as exc:  # surfaced by run() in the main thread
            pages.put((p, exc))

    def _pages(self, p: int, as_of: str | None, page_size: int | None, pages: queue.Queue[Any]) -> None:
        cursor: str | None = None
        at = as_of
        deadline: float | None = None
        backoff = 0.2
        while not self._stop.is_set():
            query: dict[str, Any] = {"partition": p}
            if page_size is not None:
                query["limit"] = page_size
            if cursor is not None:
                query["after"] = cursor
            if at is not None:
                query["as_of"] = at
            owner = self._owner(p)
            status, body = self.get(f"{owner}/scores?{urlencode(query)}") if owner else (409, {})
            if status == 200:
                pages.put((p, body))
                at = at if at is not None else str(body["as_of_ms"])  # the whole partition at one time
                cursor = body["next"]
                if cursor is None:
                    pages.put((p, None))
                    return
                deadline, backoff = None, 0.2
                continue
            if status not in RETRY:
                msg = f"partition {p} on {owner}: {_problem(status, body)}"
                raise ExportError(msg)
            now = time.monotonic()
            deadline = deadline or now + self.wait_s
            if now > deadline:
                last = _problem(status, body)
                msg = f"partition {p}: no owner answered within {self.wait_s:.0f}s (last {last})"
                raise ExportError(msg)
            self._moved(p, body.get("owner"))
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


class Reporter:
    """A progress line on stderr every ``every_s``, and one at the end."""

    def __init__(self, every_s: float = 2.0, out: TextIO = sys.stderr) -> None:
        self.every_s = every_s
        self.out = out
        self.last = time.monotonic()

    def __call__(self, stats: Stats, partitions: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(stats.line(partitions), file=self.out, flush=True)

    def done(self, stats: Stats, partitions: int) -> None:
        print(stats.line(partitions), file=self.out, flush=True)


def export(
    exporter: Exporter,
    out: TextIO,
    fmt: str,
    as_of: str | None,
    page_size: int | None,
    reporter: Reporter | None = None,
) -> Stats:
    """Discover the layout, write the header, then every user; the totals."""
    layout = exporter.discover()
    writer = Writer(out, fmt, layout.targets)
    report = reporter or Reporter()
    stats = exporter.run(writer.write, as_of, page_size, report)
    report.done(stats, layout.partitions)
    return stats


@click.command("score")
@click.option(
    "--as-of",
    default=None,
    envvar="PROPSTREAM_SCORE_AS_OF",
    show_envvar=True,
    help="Score everyone as of this event time (epoch ms or ISO-8601 with offset). Default: now, "
    "i.e. each partition's event-time clock. A user whose last event is later is scored as of it.",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    envvar="PROPSTREAM_SCORE_OUT",
    show_envvar=True,
    help="Write here ('-': standard output). Written to FILE.part and renamed when complete.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    envvar="PROPSTREAM_SCORE_FORMAT",
    show_envvar=True,
    help="csv: user_id and one score column per target (value: the expected value, then value_tier); "
    "jsonl: per user as_of_ms and, per target, score, tier, warming_up and model_version.",
)
@click.option("--page-size", type=click.IntRange(min=1), default=None, show_envvar=True, help=PAGE_SIZE_HELP)
@click.option(
    "--wait",
    "wait_s",
    type=Duration(),
    default=60.0,
    show_default=True,
    envvar="PROPSTREAM_SCORE_WAIT",
    show_envvar=True,
    help=f"How long to wait for a partition's owner during a rebalance: {DURATION_HELP} "
    "(plain number: seconds).",
)
@setting_option("web_port", "--web-port", type=int)
@setting_option("web_host", "--web-host")
def score(
    as_of: str | None, out_path: Path, fmt: str, page_size: int | None, wait_s: float, **opts: Any
) -> None:
    """Write every user's scores as of a time, from the workers (any number of them).

    User ids are as stored: with PROPSTREAM_PSEUDONYMIZE_KEY set they are the pseudonyms.
    """
    settings = build_settings(**opts)
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    exporter = Exporter(http_get(token), f"http://{settings.web_host}:{settings.web_port}", wait_s)
    if str(out_path) == "-":
        try:
            export(exporter, sys.stdout, fmt, as_of, page_size)
        except ExportError as exc:
            fail(str(exc))
        return
    part = out_path.with_name(out_path.name + ".part")
    try:
        with part.open("w", newline="", encoding="utf-8") as fh:
            stats = export(exporter, fh, fmt, as_of, page_size)
    except ExportError as exc:
        part.unlink(missing_ok=True)
        fail(str(exc))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(out_path)
    click.echo(f"{stats.users:,} users in {out_path}", err=True)
