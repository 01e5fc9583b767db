"""Two fixes to faust-streaming that the delivery guarantees depend on, installed by ``create_app``.

**A message skipped during a rebalance was committed.** While a rebalance suspends the flow,
Faust's stream iterator skips the message it is holding ("not flow_control.is_active()" or an old
generation) and acks it anyway, so that filtered messages do not add to the lag
(``faust/streams.py``, ``_py_aiter``). The consumer then counts its offset as done, the commit
covers it, and the seek to the committed offset after the rebalance starts *after* it: the event
is lost. Seen in ``tests/integration/test_scale_out.py`` as a row holding 49 of a user's first 50
events (one offset of the partition never reached the handler, and nothing was dead-lettered).

A message the stream processed, or filtered with ``Skip``, is *tracked* first; a message skipped
for the rebalance never is. So the consumer counts an untracked message of an acking topic as
done no longer: it is marked acked (nothing else waits for it) and left uncommitted, and the
seek after the rebalance delivers it again (counted in ``propstream_stale_records_total``).

**A fetch in flight across the seek delivered records of the old position.** After a rebalance
Faust seeks every partition to its committed offset c. A fetch already under way returns records
from where the partition was read up to before, say c + 1, ahead of c; Faust's read offset jumps to
c + 1, it drops c as "already read" when the seek's fetch brings it (``DROPPED MESSAGE ROFF``),
and its commit, which tolerates a gap of one offset at its head (faust-streaming issue #606), moves
past c: the event is lost. Seen in ``test_scale_out.py`` as one offset skipped on several partitions
in the first batch after a takeover, and a user's row missing one event. So when a seek overtook a
fetch, a partition whose fetched records start beyond the offset the seek set is left out of it and
sought to that offset again: its next fetch starts there. Only a fetch a seek overtook is checked,
so a partition whose committed offset falls on a gap (a transaction marker) goes on as before.
"""

from __future__ import annotations

from typing import Any

from faust.transport.consumer import Consumer

_original_ack = Consumer.ack
_original_seek = Consumer.perform_seek
_original_wait = Consumer._wait_next_records


def _ack(self: Any, message: Any) -> bool:
    if not message.tracked and not message.acked and self.app.topics.acks_enabled_for(message.topic):
        message.acked = True
        _count(self, 1)
        return False
    result: bool = _original_ack(self, message)
    return result


def _count(self: Any, n: int) -> None:
    metrics = getattr(self.app, "propstream_metrics", None)
    if metrics is not None:
        metrics.stale_records.inc(n)


async def _perform_seek(self: Any) -> None:
    self._propstream_seeks = getattr(self, "_propstream_seeks", 0) + 1
    await _original_seek(self)


async def _wait_next_records(self: Any, timeout: float) -> Any:
    seeks = getattr(self, "_propstream_seeks", 0)
    records, active = await _original_wait(self, timeout)
    if records and getattr(self, "_propstream_seeks", 0) != seeks:
        # a seek ran while this fetch was in flight: a partition whose records do not start where
        # the seek put Faust's read offset is fetched again from there
        kept = {}
        for tp, batch in records.items():
            expected = self._read_offset.get(tp)
            if batch and expected is not None and batch[0].offset > expected:
                _count(self, len(batch))
                await self.seek(tp, expected)
            else:
                kept[tp] = batch
        return kept, active
    return records, active


def install() -> None:
    """Patch Faust's consumer (idempotent): see the module docstring."""
    Consumer.ack = _ack  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]
    Consumer._wait_next_records = _wait_next_records  # type: ignore[method-assign]
