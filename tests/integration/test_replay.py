"""Real public samples replayed through the real pipeline: nothing rejected without a reason we can name.

Skipped when ../shared/data is absent (a fresh machine has none).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from typing import Any

import pytest

from streams.settings import Settings
from tests.conftest import ROOT, SHARED_DATA
from tests.integration.harness import consume_all, wait_until
from tests.reference import HOUR, assert_features_equal, reference_features

pytestmark = pytest.mark.integration

SAMPLES = {
    "taobao": SHARED_DATA / "taobao" / "user_behavior_sample.csv",
    "rees46": SHARED_DATA / "rees46" / "events_2019_10_head.csv",
}


def rows(path: Any) -> int:
    with open(path, newline="") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_real_sample_replays_without_unexplained_rejections(
    fmt: str, settings: Settings, make_worker: Any, env: dict[str, str], kafka: str
) -> None:
    path = SAMPLES[fmt]
    if not path.exists():
        pytest.skip(f"{path} absent (no ../shared)")
    from traffic.datasets import read_events

    n_rows = rows(path)
    worker = make_worker().start()
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", "replay", str(path), "--format", fmt],
        env=worker.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    def all_consumed() -> bool:
        return worker.metric("propstream_events_consumed_total") >= n_rows

    wait_until(all_consumed, 240, every_s=1, what=f"{n_rows} {fmt} events consumed")
    accepted = worker.metric("propstream_events_accepted_total")
    rejected = worker.metric("propstream_events_rejected_total")
    assert accepted + rejected == n_rows
    if rejected:
        dead = consume_all(kafka, settings.topic_deadletter, int(rejected))
        reasons = {(dict(m.headers)["propstream.reason"], dict(m.headers)["propstream.detail"]) for m in dead}
        pytest.fail(f"{int(rejected)} of {n_rows} {fmt} rows rejected: {sorted(reasons)[:10]}")

    # and the features of a few users equal the brute-force recount of their rows
    events = list(read_events(path, fmt))
    by_user: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_user.setdefault(str(e["user_id"]), []).append(e)
    sample = sorted(by_user, key=lambda u: -len(by_user[u]))[:5] + sorted(by_user)[:5]
    as_of = max(int(e["ts"]) for e in events) + HOUR
    for u in sample:
        got = worker.features(u, as_of)
        assert got is not None, u
        assert_features_equal(got["features"], reference_features(by_user[u], as_of), f"{fmt} user {u}")
