"""``GET /audiences`` and ``GET /audiences/{name}``: definitions, sizes and members, from any worker.

A worker knows only its own partitions: their audience figures (kept per partition by the score
stage, ``models/audience_stats.py``) and their users' rows. So any worker answers for the whole
deployment by asking each owner for its part (``?local=1`` for figures, ``?partition=P`` for a
page of members) and merging. A member page walks the partitions in order; its cursor names the
partition and the last user read, so an export resumes wherever it stopped, across workers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from models.audiences import Audience
from streams.lookup import BadQuery, Lookups, decode_cursor, encode_cursor, page_query
from streams.score_stage import ScoreStage

PAGE_BUDGET_S = 2.0  # a member page stops gathering after this long: the cursor goes on from there
LOCAL = "1"
Fetch = Callable[[str, Mapping[str, str]], Any]  # url, params -> awaitable (status, body)


def encode_position(partition: int, after: str | None) -> str:
    """A cursor over every partition's members: where the next page starts.

    >>> decode_position(encode_position(2, "u-9"), partitions=4)
    (2, 'u-9')
    """
    raw = json.dumps([partition, after], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_position(cursor: str, partitions: int) -> tuple[int, str | None]:
    """The partition and last user a cursor stands for; :class:`BadQuery` for anything else."""
    try:
        p, after = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        ok = isinstance(p, int) and 0 <= p < partitions and (after is None or isinstance(after, str))
    except (binascii.Error, UnicodeError, ValueError, TypeError):
        ok = False
    if not ok:
        msg = "cursor: not a cursor this API returned (for this partition count)"
        raise BadQuery(msg, code="bad_cursor")
    return p, after


def describe(audiences: tuple[Audience, ...]) -> dict[str, dict[str, Any]]:
    """What each definition is, for ``GET /audiences``."""
    return {
        a.name: {
            "condition": a.condition,
            "targets": sorted(a.targets),
            "percentiles": [
                {"target": c.target, "side": "top" if c.top else "bottom", "pct": c.pct} for c in a.cuts
            ],
            "estimated_by": a.primary,
        }
        for a in audiences
    }


def merge_figures(
    audiences: tuple[Audience, ...], parts: list[dict[str, Any]], partitions: int
) -> dict[str, Any]:
    """Each worker's figures over its partitions, summed: sizes and Braze-style estimates.

    ``expected_converters`` is the sum of the members' calibrated scores of the audience's first
    target (``estimated_by``): how many of them the model expects to convert within its horizon.
    """
    counted: set[int] = set()
    complete = True
    sums = {a.name: [0, 0.0] for a in audiences}
    for part in parts:
        counted.update(part["partitions"])
        complete = complete and part["complete"]
        for name, fig in part["audiences"].items():
            if name in sums:
                sums[name][0] += fig["members"]
                sums[name][1] += fig["expected_converters"]
    out = []
    for name, info in describe(audiences).items():
        members, expected = sums[name]
        entry: dict[str, Any] = {"name": name, **info, "members": members}
        if info["estimated_by"] is not None:
            entry["expected_converters"] = round(expected, 3)
            entry["expected_non_converters"] = round(members - expected, 3)
        out.append(entry)
    missing = sorted(set(range(partitions)) - counted)
    return {"audiences": out, "missing_partitions": missing, "complete": complete and not missing}


def local_figures(stage: ScoreStage, owned: list[int]) -> dict[str, Any]:
    """This worker's figures over the partitions it owns; complete once each one's index is built."""
    complete = all(p in stage.parts and stage.parts[p].indexed for p in owned)
    return {"partitions": owned, "complete": complete, "audiences": stage.audience_figures(set(owned))}


def http_fetch(authorization: str | None, timeout_s: float = 10.0) -> Fetch:
    """GET JSON from another worker, passing the caller's token on."""

    async def fetch(url: str, params: Mapping[str, str]) -> tuple[int, Any]:
        headers = {"Authorization": authorization} if authorization else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, params=dict(params), headers=headers) as resp,
            ):
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return 502, {"error": "worker_unreachable", "message": f"{url}: {exc or type(exc).__name__}"}

    return fetch


class AudienceReader:
    """The deployment-wide answers, over this worker's parts and its peers'."""

    def __init__(
        self,
        audiences: tuple[Audience, ...],
        partitions: int,
        stage: ScoreStage,
        lookups: Lookups,
        owners: Callable[[], dict[int, str]],
        owns: Callable[[int], bool],
        me: str,
    ) -> None:
        self.audiences = audiences
        self.names = {a.name for a in audiences}
        self.partitions = partitions
        self.stage = stage
        self.lookups = lookups
        self.owners = owners
        self.owns = owns
        self.me = me.rstrip("/")

    def owned(self) -> list[int]:
        return [p for p in range(self.partitions) if self.owns(p)]

    async def figures(self, fetch: Fetch) -> dict[str, Any]:
        """Every audience with its size over every partition (each owner asked once)."""
        peers = sorted({url for url in self.owners().values() if url and url.rstrip("/") != self.me})
        parts = [local_figures(self.stage, self.owned())]
        answers = await asyncio.gather(*(fetch(f"{url}/audiences", {"local": LOCAL}) for url in peers))
        unreachable = []
        for url, (status, body) in zip(peers, answers, strict=True):
            if status == 200:
                parts.append(body)
            else:
                unreachable.append({"worker": url, "status": status, "error": body.get("message", "")})
        merged = merge_figures(self.audiences, parts, self.partitions)
        return {**merged, "partitions": self.partitions, "unreachable": unreachable}

    async def local_page(self, name: str, query: Mapping[str, str]) -> dict[str, Any]:
        q = page_query(query, self.partitions)
        return await self.lookups.page(q, None, audience=name)

    async def page(
        self, name: str, cursor: str | None, limit: int, fetch: Fetch
    ) -> tuple[int, dict[str, Any]]:
        """Up to ``limit`` members from the cursor on, partition after partition, within
        :data:`PAGE_BUDGET_S`; ``next`` is null once the last partition is done."""
        p, after = (0, None) if cursor is None else decode_position(cursor, self.partitions)
        users: list[dict[str, Any]] = []
        started = time.monotonic()
        while p < self.partitions and len(users) < limit and time.monotonic() - started < PAGE_BUDGET_S:
            params = {"partition": str(p), "limit": str(limit - len(users))}
            if after is not None:
                params["after"] = encode_cursor(after)
            if self.owns(p):
                status, body = 200, await self.local_page(name, params)
            else:
                owner = self.owners().get(p)
                if owner is None:
                    return 503, {"error": "not_ready", "message": f"partition {p} has no owner yet; retry"}
                status, body = await fetch(f"{owner.rstrip('/')}/audiences/{name}", params)
            if status != 200:
                return status, body
            users.extend(body["users"])
            nxt = body["next"]
            if nxt is None:
                p, after = p + 1, None
            else:
                after = decode_cursor(nxt)
        done = p >= self.partitions
        return 200, {
            "audience": name,
            "users": users,
            "next": None if done else encode_position(p, after),
            "partition": min(p, self.partitions),
            "partitions": self.partitions,
        }
