"""What the demo prints per tick: status lines only when they change, one summary when traffic is done."""

from __future__ import annotations

from streams.demo import Status, StatusLog

WARM = "purchase warming up (3+/5-), churn warming up (0+/2-)"


def line(clock: str, consumed: int, labels: int = 0, models: str = WARM) -> str:
    return f"{clock} {consumed:,} events, 2 rejected, {labels:,} labels matured, 0 changes | {models}"


def test_status_line_is_printed_only_when_it_changes() -> None:
    log = StatusLog("curl -s http://127.0.0.1:6066/models")
    assert log.tick("10:00:00", None, None) == ["10:00:00 worker: not answering yet"]
    assert log.tick("10:00:03", None, None) == []
    assert log.tick("10:00:06", Status(1200, 2, 0, 0, WARM), None) == [line("10:00:06", 1200)]
    assert log.tick("10:00:09", Status(1200, 2, 0, 0, WARM), None) == []
    assert log.tick("10:00:12", Status(2500, 2, 7, 0, WARM), None) == [line("10:00:12", 2500, 7)]


def test_one_summary_once_traffic_has_ended_and_the_worker_caught_up() -> None:
    log = StatusLog("curl -s http://127.0.0.1:6066/models")
    log.tick("10:00:00", Status(1000, 2, 0, 0, WARM), None)
    # traffic ended with 3,000 events published; the worker has read 2,000 of them: still catching up
    assert log.tick("10:00:03", Status(2000, 2, 5, 0, WARM), 3000) == [line("10:00:03", 2000, 5)]
    summary = log.tick("10:00:06", Status(3000, 2, 9, 0, WARM), 3000)
    assert summary[0] == line("10:00:06", 3000, 9)
    assert any("traffic done: 3,000 events published, all consumed" in s for s in summary)
    assert any("curl -s http://127.0.0.1:6066/models" in s for s in summary)
    for clock in ("10:00:09", "10:00:12", "10:00:15"):  # nothing changes: nothing printed
        assert log.tick(clock, Status(3000, 2, 9, 0, WARM), 3000) == []
    # the trainer publishes a version later: only that change is printed, and only once
    later = "purchase v1 auc 0.71, churn warming up (0+/2-)"
    assert log.tick("10:00:18", Status(3000, 2, 9, 0, later), 3000) == [line("10:00:18", 3000, 9, later)]
    assert log.tick("10:00:21", Status(3000, 2, 9, 0, later), 3000) == []


def test_the_summary_is_not_repeated_when_the_worker_reads_past_the_count() -> None:
    log = StatusLog("hint")
    first = log.tick("10:00:00", Status(3000, 0, 0, 0, WARM), 3000)
    assert sum("traffic done" in s for s in first) == 1
    again = log.tick("10:00:03", Status(3001, 0, 0, 0, WARM), 3000)  # e.g. a retried send
    assert again == ["10:00:03 3,001 events, 0 rejected, 0 labels matured, 0 changes | " + WARM]
