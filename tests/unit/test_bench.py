"""Pure helpers of ``propstream bench``: percentiles, the table, the profile summary, option parsing."""

from __future__ import annotations

import itertools
import math
import os
import random
from pathlib import Path

import click
import numpy as np
import pytest

from streams.bench.command import _sizes, rows
from streams.bench.stats import fmt, percentile, profile_top, table


@pytest.mark.parametrize("q", [0, 1, 50, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    rng = random.Random(q)
    values = [rng.expovariate(1.0) for _ in range(rng.randrange(1, 500))]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


def test_table_aligns_and_formats() -> None:
    text = table([("a", "events/s", 12345.6), ("longer name", "ms", 0.01234), ("missing", "ms", math.nan)])
    lines = text.splitlines()
    assert lines[0].split() == ["figure", "unit", "value"]
    assert lines[2].endswith("12,346") and lines[3].endswith("0.0123") and lines[4].endswith("-")
    assert len({len(line) for line in lines[1:]}) == 1  # value column right-aligned to one width
    assert fmt(3) == "3" and fmt(None) == "-"


def test_profile_top_counts_self_and_inclusive_time() -> None:
    raw = "\n".join(
        [
            "run (x.py:1);process (streams/ingest.py:10);compute (features/user.py:5) 6",
            "run (x.py:1);process (streams/ingest.py:11) 2",
            "run (x.py:1);select (/v/lib/python3.11/site-packages/sel.py:3) 2",
        ]
    )
    top = profile_top(raw, 3)
    assert top[0] == (60.0, 60.0, "compute (features/user.py)")
    assert (20.0, 80.0, "process (streams/ingest.py)") in top
    assert (20.0, 20.0, "select (sel.py)") in top


def test_growth_sizes_option() -> None:
    assert _sizes(None, None, "10000, 100000,1000000") == [10_000, 100_000, 1_000_000]  # type: ignore[arg-type]
    with pytest.raises(click.BadParameter):
        _sizes(None, None, "10k")  # type: ignore[arg-type]


def test_rows_hold_the_ratios_and_one_line_per_growth_figure() -> None:
    result = {
        "raw_events_per_s": 100.0,
        "events_per_s": 30.0,
        "naive_events_per_s": 6.0,
        "vs_raw": 0.3,
        "vs_naive": 5.0,
        "raw_events_per_cpu_s": 200.0,
        "worker_events_per_cpu_s": 40.0,
        "naive_events_per_cpu_s": 8.0,
        "vs_raw_cpu": 0.2,
        "vs_naive_cpu": 5.0,
        "offered_events_per_s": 5000.0,
        "e2e_p50_ms": 1.0,
        "e2e_p95_ms": 2.0,
        "e2e_p99_ms": 3.0,
        "changes": 10,
        "lookup_p50_ms": 0.5,
        "lookup_p99_ms": 0.9,
        "lookup_timeouts": 0,
        "worker_rss_mb": 200.0,
        "recovery_s": 4.0,
        "recovery_s_per_100k_users": 40.0,
        "growth": [
            {
                "users": 10,
                "us_per_event": 1.0,
                "us_per_fire": 4.0,
                "peak_rss_mb": 2.0,
                "rocksdb_bytes_per_user": 3.0,
            },
            {
                "users": 100,
                "us_per_event": 1.0,
                "us_per_fire": 4.0,
                "peak_rss_mb": 2.0,
                "rocksdb_bytes_per_user": 3.0,
            },
        ],
    }
    names = [r[0] for r in rows(result)]
    assert "pipeline / naive" in names and "pipeline / raw consumer" in names
    assert "full pipeline per worker CPU second" in names and "pipeline / naive, per CPU second" in names
    assert sum(n.startswith("growth") for n in names) == 8
    assert not any("Quix" in n for n in names)  # the peer did not run: no row, no made-up figure
    peer = {**result, "quix_events_per_s": 90.0, "quix_events_per_cpu_s": 80.0, "vs_quix_cpu": 0.5}
    figures = {r[0]: r[2] for r in rows(peer)}
    assert figures["Quix Streams peer per CPU second"] == 80.0
    assert figures["pipeline / Quix peer, per CPU second"] == 0.5
    assert figures["  e2e p50 / p99 of the phase's second half"] == "- / -"  # not measured: no figure
    half = {**result, "e2e_second_half_p50_ms": 12.0, "e2e_second_half_p99_ms": 1500.0}
    assert {r[0]: r[2] for r in rows(half)}["  e2e p50 / p99 of the phase's second half"] == "12 / 1,500"
    split = {**result, "stages": {"batch": {"p50_ms": 12.0, "p99_ms": 1500.0, "n": 3}}}
    figures = {r[0]: r[2] for r in rows(split)}
    assert figures["  batch processing p50 / p99"] == "12 / 1,500"  # only the stages measured
    assert not any("append -> batch start" in n for n in figures)


def test_a_process_cpu_seconds_come_from_proc_and_count_its_work(tmp_path: Path) -> None:
    """``Proc.cpu_s`` (behind the per-CPU-second figures) for a child that spins 0.6 CPU s, then sleeps."""
    import time

    from streams.bench.proc import Proc

    done = tmp_path / "done"
    spin = (
        "import pathlib, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.6: pass\n"
        f"pathlib.Path({str(done)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    p = Proc({}, tmp_path / "d", tmp_path / "log", ("-c", spin)).start()
    try:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.exists(), (tmp_path / "log").read_text()
        used = p.cpu_s()
        assert 0.6 <= used < 1.2, used  # the spin, plus the interpreter's start
    finally:
        assert p.proc is not None
        p.proc.kill()
        p.proc.wait()


def test_cpu_seconds_of_a_process_that_is_not_there_are_missing_not_zero(tmp_path: Path) -> None:
    """A 0 would make the per-CPU-second rate a huge number; NaN prints as missing ("-")."""
    from streams.bench.proc import Proc

    p = Proc({}, tmp_path / "d", tmp_path / "log", ("-c", "pass"))
    assert math.isnan(p.cpu_s())  # never started
    assert fmt(1000 / max(p.cpu_s() - 0.0, 1e-9)) == "-"


def test_the_preloaded_history_ends_at_the_preload_keeping_order_and_gaps() -> None:
    from streams.bench.phases import ending_at
    from traffic.simulator import SimConfig, simulate

    events = list(simulate(SimConfig(users=50, seed=3, max_events=2_000, start_ms=1_000_000_000_000)))
    before = [int(e["ts"]) for e in events]  # type: ignore[call-overload]
    assert 1_700_000_000_000 - max(before) > 86_400_000  # the cut history ends well before "now"
    moved = ending_at([dict(e) for e in events], 1_700_000_000_000)
    after = [int(e["ts"]) for e in moved]  # type: ignore[call-overload]
    assert max(after) == 1_700_000_000_000
    assert [b - a for a, b in itertools.pairwise(before)] == [b - a for a, b in itertools.pairwise(after)]
    assert [e["event_id"] for e in moved] == [e["event_id"] for e in events]
    assert ending_at([], 5) == []


def test_growth_times_events_before_any_filled_user_goes_quiet_then_every_fire(tmp_path: Path) -> None:
    from streams.bench.growth import measure

    row = measure(300, 400, tmp_path / "g")
    # the fill and the timed events lie within one hour of the fill's start, then the clock passes
    # two hours: every user's first silence point (1 h) fires once, and only then
    assert row["fires"] == 300
    assert row["us_per_event"] > 0 and row["us_per_fire"] > 0


def test_machine_ticks_count_a_spin_as_busy() -> None:
    """``cpu_ticks`` behind the bench's 'machine busy' figure: 0.3 s of CPU spun here is busy time."""
    import time

    from streams.bench.stats import cpu_ticks

    before = cpu_ticks()
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    after = cpu_ticks()
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    assert after[0] - before[0] >= 0.25 * ticks_per_s  # this process's spin, whatever else ran
    assert after[1] - before[1] >= after[0] - before[0]
