"""What the worker survives, counted and logged in one place: unreadable bytes and isolated failures.

Bad bytes in a table or on a topic, and an unexpected exception inside one unit of work (one
user's events, one horizon, one training message), must never stop a task. The code that meets
them carries on (a fresh value, a skipped message, the user's events dead-lettered) and reports
here: ``propstream_decode_errors_total{what}`` and ``propstream_processing_errors_total{stage}``,
both alerted on (``deploy/prometheus/alerts.yml``). Logging is rate-limited per kind, so a
partition full of bad values costs a few lines, not one per user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from features.state import Corrupt
from streams.metrics import Metrics

log = logging.getLogger("propstream.faults")


class Faults:
    def __init__(
        self, metrics: Metrics, log_every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics = metrics
        self.log_every_s = log_every_s
        self.clock = clock
        self._logged: dict[str, float] = {}
        self._quiet: dict[str, int] = {}  # occurrences not logged since the last line, per kind

    def corrupt(self, exc: Corrupt, key: str = "") -> None:
        """Bytes that should have been ``exc.what`` could not be read; the caller carries on."""
        self.metrics.decode_errors.labels(exc.what).inc()
        if self._may_log(f"decode:{exc.what}"):
            log.warning(
                "%s%s; carrying on without it%s", exc, _of(key), self._suppressed(f"decode:{exc.what}")
            )

    def unreadable(self, what: str, detail: str, key: str = "") -> None:
        """A consumed message that is not ``what`` (skipped)."""
        self.corrupt(Corrupt(what, detail), key)

    def failed(self, stage: str, exc: BaseException, key: str = "") -> None:
        """An unexpected exception isolated to one unit of work in ``stage``; logged with its traceback."""
        self.metrics.processing_errors.labels(stage).inc()
        if self._may_log(f"fail:{stage}"):
            log.error(
                "%s failed%s: %s%s",
                stage,
                _of(key),
                describe(exc),
                self._suppressed(f"fail:{stage}"),
                exc_info=exc,
            )

    def _may_log(self, kind: str) -> bool:
        now = self.clock()
        last = self._logged.get(kind)
        if last is not None and now - last < self.log_every_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return False
        self._logged[kind] = now
        return True

    def _suppressed(self, kind: str) -> str:
        n = self._quiet.pop(kind, 0)
        return f" ({n} more like it not logged)" if n else ""


def describe(exc: BaseException) -> str:
    """``Type: message``, the detail a dead letter carries.

    >>> describe(KeyError("x"))
    "KeyError: 'x'"
    """
    return f"{type(exc).__name__}: {exc}"


def _of(key: str) -> str:
    return f" (key {key!r})" if key else ""
