"""Pure helpers of the benchmark: percentiles, the printed table, the machine description.

>>> percentile([1.0, 2.0, 3.0, 4.0], 50)
2.5
>>> print(table([("raw consumer", "events/s", 10.0)]))
figure        unit      value
------------  --------  -----
raw consumer  events/s     10
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile, interpolated between closest ranks (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt(value: object) -> str:
    """A figure for humans: thousands separators, 3 significant digits below 100, '-' when unmeasured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[tuple[str, str, object]]) -> str:
    """Rows of (figure, unit, value) as an aligned plain-text table (values right-aligned)."""
    head = ("figure", "unit", "value")
    cells = [(a, b, fmt(c)) for a, b, c in rows]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(3)]
    lines = [
        f"{head[0]:<{widths[0]}}  {head[1]:<{widths[1]}}  {head[2]:<{widths[2]}}".rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in cells]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU model, cores, memory, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu
        )
    except (OSError, subprocess.SubprocessError):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def profile_top(collapsed: str, n: int = 15) -> list[tuple[float, float, str]]:
    """From py-spy's raw (collapsed) stacks: the ``n`` functions with most self time (where it is spent).

    Returns ``(self %, inclusive %, function)``; line numbers and site-packages paths are dropped.

    >>> profile_top("main (a.py:1);f (a.py:2) 3\\nmain (a.py:1);g (b.py:9) 1\\n", 2)
    [(75.0, 75.0, 'f (a.py)'), (25.0, 25.0, 'g (b.py)')]
    """
    import re

    incl: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [re.sub(r"\(.*site-packages/", "(", re.sub(r":\d+\)$", ")", f)) for f in stack.split(";")]
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
        own[frames[-1]] = own.get(frames[-1], 0) + k
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return [(round(100 * v / total, 1), round(100 * incl[f] / total, 1), f) for f, v in ranked]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot, from /proc/stat; (0, 0) without it.

    Two readings give the share of the machine in use between them: the broker, the bench and
    the worker share these cores, and a saturated machine explains a latency no stage does.
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all cores busy between two :func:`cpu_ticks` readings (NaN when unreadable).

    >>> busy_share((100, 400), (250, 600))
    0.75
    """
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else math.nan
