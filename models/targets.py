"""Targets as data scientists declare them: ``purchase:7d,churn:14d,sign_up:30d``.

Each target gets its own model, ledger entries and score per user. ``purchase`` and any other
event type are event targets (did it happen within the horizon?); ``churn`` asks whether a
recently active user shows no activity at all within the horizon.
"""

from __future__ import annotations

import math
import re

from models.ledger import VALUE, Target, make_target

UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _seconds(text: str, what: str, bare_unit: str) -> float:
    text = text.strip().lower()
    given = next((u for u in UNITS_S if text.endswith(u)), "")  # "ms" before "s"
    number = text[: -len(given)] if given else text
    try:
        value = float(number) * UNITS_S[given or bare_unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        msg = f"{what} {text!r} is not a number with an optional unit ms, s, m, h or d"
        raise ValueError(msg)
    return value


def parse_duration(text: str, *, bare_unit: str = "s") -> float:
    """Seconds in ``90s``, ``30m``, ``24h``, ``7d``, or a bare number in ``bare_unit``; zero allowed.

    One syntax for every duration a user types (settings, CLI options, target horizons); the bare
    unit keeps old plain-number values meaning what they meant (days for ``user_ttl_days``).

    >>> parse_duration("2h"), parse_duration("0.05"), parse_duration("400", bare_unit="d")
    (7200.0, 0.05, 34560000.0)
    """
    seconds = _seconds(text, "duration", bare_unit)
    if seconds < 0:
        msg = f"duration {text.strip().lower()!r} must not be negative"
        raise ValueError(msg)
    return seconds


def parse_horizon(text: str) -> int:
    """Whole seconds above zero in ``90s``, ``30m``, ``24h``, ``7d`` or a bare number of seconds.

    >>> parse_horizon("7d"), parse_horizon("36h"), parse_horizon("600")
    (604800, 129600, 600)
    """
    seconds = int(_seconds(text, "horizon", "s"))
    if seconds <= 0:
        msg = f"horizon {text.strip().lower()!r} must be positive"
        raise ValueError(msg)
    return seconds


def parse_targets(
    spec: str, sample_every_s: int = 3600, max_pending: int = 64, value_sample_every_s: int | None = None
) -> tuple[Target, ...]:
    """The targets of a ``NAME:HORIZON,...`` spec; ``ValueError`` names the first bad entry.

    The value target samples every ``value_sample_every_s`` (None: like the others).

    >>> [(t.name, t.horizon_ms // 86_400_000, t.churn) for t in parse_targets("purchase:7d, churn:14d")]
    [('purchase', 7, False), ('churn', 14, True)]
    """
    out: list[Target] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, horizon = item.partition(":")
        name = name.strip()
        if not sep:
            msg = f"target {item!r} needs a horizon, as in {name}:7d"
            raise ValueError(msg)
        if not _NAME.match(name):
            msg = f"target name {name!r} must be an event type: lowercase letters, digits and _"
            raise ValueError(msg)
        if any(t.name == name for t in out):
            msg = f"target {name!r} is declared twice"
            raise ValueError(msg)
        every = value_sample_every_s if name == VALUE and value_sample_every_s is not None else sample_every_s
        out.append(make_target(name, parse_horizon(horizon), every, max_pending))
    if not out:
        msg = "declare at least one target, e.g. purchase:7d"
        raise ValueError(msg)
    return tuple(out)
