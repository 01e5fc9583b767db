"""``propstream audience list|export``: audiences and their members, from any worker's HTTP API.

The worker asked merges every worker's part (``streams/audience_api.py``), so one address is
enough. An export follows the pages' cursors to the end, retrying a page while partitions move,
and writes to ``FILE.part`` until it is complete, so a half-written file never looks done.

Kept free of Faust and the scoring code: this runs on an operator's machine and must start fast.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import click

from streams.cli_common import build_settings, fail, setting_option
from streams.cli_score import RETRY, Get, http_get
from streams.settings import Settings

WAIT_S = 60.0  # how long a page is retried while partitions move or a worker is away


def _base(opts: dict[str, Any]) -> tuple[Get, str]:
    settings = build_settings(**opts)
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    return http_get(token), f"http://{settings.web_host}:{settings.web_port}"


def _ask(get: Get, url: str, wait_s: float = WAIT_S) -> dict[str, Any]:
    """GET ``url``, retrying what a rebalance explains; exits with the worker's message otherwise."""
    deadline = time.monotonic() + wait_s
    while True:
        status, body = get(url)
        if status == 200:
            return body
        if status not in RETRY or time.monotonic() > deadline:
            fail(f"{url}: {status} {body.get('error', '')}: {body.get('message', 'no answer')}")
        time.sleep(0.5)


def format_list(body: dict[str, Any]) -> str:
    """The audiences as a table a human reads: size, and the converters the scores expect."""
    rows = [("audience", "members", "exp. converters", "condition")]
    for a in body["audiences"]:
        expected = a.get("expected_converters")
        rows.append(
            (a["name"], f"{a['members']:,}", "-" if expected is None else f"{expected:,.1f}", a["condition"])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    if body.get("missing_partitions"):
        lines.append(f"partitions not counted (no owner answered): {body['missing_partitions']}")
    elif not body.get("complete", True):
        lines.append("a worker is still indexing a partition it just took over: sizes are partial")
    return "\n".join(lines)


@click.group()
def audience() -> None:
    """Audiences (PROPSTREAM_AUDIENCES): sizes, and their members as CSV or JSON lines."""


@audience.command("list")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="PROPSTREAM_AUDIENCE_JSON",
    show_envvar=True,
    help="Print the JSON answer.",
)
@setting_option("web_port", "--web-port", type=int)
@setting_option("web_host", "--web-host")
def list_cmd(as_json: bool, **opts: Any) -> None:
    """Every audience with its members over all partitions and its expected converters (the sum
    of the members' calibrated scores of the audience's first target)."""
    get, base = _base(opts)
    body = _ask(get, f"{base}/audiences")
    click.echo(json.dumps(body, indent=2) if as_json else format_list(body))


@audience.command("export")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    envvar="PROPSTREAM_AUDIENCE_FORMAT",
    show_envvar=True,
    help="Output format.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    default=Path("-"),
    envvar="PROPSTREAM_AUDIENCE_OUT",
    show_envvar=True,
    help="File (default: stdout).",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 5000),
    default=500,
    show_default=True,
    envvar="PROPSTREAM_AUDIENCE_PAGE_SIZE",
    show_envvar=True,
    help="Members per request.",
)
@click.option(
    "--reidentify",
    "ids_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="PROPSTREAM_AUDIENCE_REIDENTIFY",
    show_envvar=True,
    help="With pseudonymisation on: a file of your own user ids, one per line. Members whose "
    "pseudonym is one of theirs are written with your id (column reidentified true); the rest keep "
    "the pseudonym. Needs PROPSTREAM_PSEUDONYMIZE_KEY here, on this machine only.",
)
@setting_option("web_port", "--web-port", type=int)
@setting_option("web_host", "--web-host")
def export_cmd(
    name: str, fmt: str, out_path: Path, page_size: int, ids_path: Path | None, **opts: Any
) -> None:
    """Write the members of audience NAME with their scores as of their partition's clock.

    User ids are as stored: with PROPSTREAM_PSEUDONYMIZE_KEY set they are pseudonyms, unless
    --reidentify maps them back through your own list of ids (docs/audiences.md).
    """
    get, base = _base(opts)
    ids = None if ids_path is None else reidentified(ids_path, build_settings(**opts))
    if str(out_path) == "-":
        n = export(get, base, name, sys.stdout, fmt, page_size, ids)
        click.echo(f"{n:,} members of {name}", err=True)
        return
    part = out_path.with_name(out_path.name + ".part")
    try:
        with part.open("w", newline="", encoding="utf-8") as fh:
            n = export(get, base, name, fh, fmt, page_size, ids)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(out_path)
    click.echo(f"{n:,} members of {name} in {out_path}", err=True)


def reidentified(ids_path: Path, settings: Settings) -> dict[str, str]:
    """Pseudonym -> your id, for the ids in ``ids_path``: the only way back, since a pseudonym is a
    keyed hash and the deployment keeps no raw id."""
    if settings.pseudonymize_key is None:
        fail("--reidentify needs PROPSTREAM_PSEUDONYMIZE_KEY: without it the ids are not pseudonyms")
    from streams.privacy import Pseudonymizer

    pseudonym = Pseudonymizer(settings.pseudonymize_key)
    raw = (line.strip() for line in ids_path.read_text(encoding="utf-8").splitlines())
    return {pseudonym(r): r for r in raw if r}


def export(
    get: Get, base: str, name: str, out: TextIO, fmt: str, page_size: int, ids: dict[str, str] | None = None
) -> int:
    """Follow the member pages to the end; progress (partitions done, members) on stderr.

    With ``ids`` (pseudonym -> your id) a member found there is written with your id."""
    cursor: str | None = None
    written = 0
    writer: Any = None
    last_note = 0.0
    while True:
        query = {"limit": str(page_size), **({"cursor": cursor} if cursor else {})}
        page = _ask(get, f"{base}/audiences/{quote(name, safe='')}?{urlencode(query)}")
        for user in page["users"]:
            scores = {t: s["score"] for t, s in user["scores"].items()}
            uid = user["user_id"]
            row: dict[str, Any] = {"user_id": uid, "as_of_ms": user["as_of_ms"]}
            if ids is not None:
                row["user_id"] = ids.get(uid, uid)
                row["reidentified"] = uid in ids
            if fmt == "jsonl":
                out.write(json.dumps({**row, "scores": scores}) + "\n")
            else:
                if writer is None:
                    writer = csv.writer(out)
                    writer.writerow([*row, *scores])
                writer.writerow([*row.values(), *scores.values()])
            written += 1
        cursor = page["next"]
        if cursor is None:
            if writer is None and fmt == "csv":
                csv.writer(out).writerow(["user_id", "as_of_ms"])  # no members: still a CSV
            return written
        if time.monotonic() - last_note >= 2.0:
            last_note = time.monotonic()
            click.echo(
                f"{name}: {written:,} members, partition {page['partition']}/{page['partitions']}", err=True
            )
