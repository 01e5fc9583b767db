"""A batch's table writes and outputs, released in the one order a SIGKILL cannot turn into a loss
of a trigger or a second copy of a training example.

Faust writes a table value to the local RocksDB at once and to its changelog a little later, and a
same-disk restart trusts the disk. So whatever a row records as done (a trigger fired, a snapshot
matured) must not be durable before, respectively must be durable before, the output that does it:

1. **triggers and change events** are sent and flushed first: a kill before the rows land redoes
   them from the old rows (at-least-once, the same ids);
2. **the rows and watermarks** are written (local RocksDB and changelog) and flushed: nothing of
   the batch can be replayed over them from an older changelog message any more;
3. **training examples** are sent last: a kill before they leave loses them (at-most-once), but
   no restart can mature them a second time, so the trainer never learns one twice.

Step 1 and 3 cost a producer flush each, and only in a batch that has such outputs. The ingest
agent, the idle clock and the erasure agent hold :attr:`Outbox.lock` while they work, so no other
writer sees or overwrites a row that is held here.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from faust.streams import _current_event

DELETE = object()  # a held write that removes the key


class Outbox:
    """Held writes (read through by :meth:`get`) and outputs of the batch being processed."""

    def __init__(self, flush: Callable[[], Awaitable[None]]) -> None:
        self.flush = flush
        self.lock = asyncio.Lock()
        self.early: list[tuple[Any, bytes, bytes]] = []  # (topic, key, value): before the rows
        self.late: list[tuple[Any, bytes, bytes]] = []  # after the rows
        self.writes: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}  # (table, key) -> (table, event, value)
        self._sent_early = False  # early outputs sent, not yet known delivered

    def write(self, table: Any, key: Any, value: Any) -> None:
        """Hold ``table[key] = value`` (or :data:`DELETE`) with the current event, which routes it to
        its partition's RocksDB file and changelog partition when it is released."""
        ref = _current_event.get()
        event = ref() if ref is not None else None
        if event is None:
            msg = "a table write outside any partition's context"
            raise RuntimeError(msg)
        self.writes[(id(table), key)] = (table, event, value)

    def get(self, table: Any, key: Any) -> tuple[bool, Any]:
        """(held, value) of a held write to ``table[key]``; value None for a held delete."""
        held = self.writes.get((id(table), key))
        if held is None:
            return False, None
        value = held[2]
        return True, (None if value is DELETE else value)

    def send_early(self, topic: Any, key: bytes, value: bytes) -> None:
        self.early.append((topic, key, value))

    def send_late(self, topic: Any, key: bytes, value: bytes) -> None:
        self.late.append((topic, key, value))

    async def release(self) -> None:
        """Outputs and writes in the order above. Each step forgets what it has done, so a release
        that was interrupted (cancelled in a flush) can be called again and finishes the rest."""
        if self.early:
            for topic, key, value in self.early:
                topic.send_soon(key=key, value=value)
            self.early.clear()
            self._sent_early = True
        if self._sent_early:
            await self.flush()
            self._sent_early = False
        if self.writes:
            for (_, key), (table, event, value) in self.writes.items():
                token = _current_event.set(weakref.ref(event))
                try:
                    if value is DELETE:
                        table.pop(key, None)
                    else:
                        table[key] = value
                finally:
                    _current_event.reset(token)
            self.writes.clear()
        if self.late:
            await self.flush()  # the rows' changelog messages first: see the module docstring
            for topic, key, value in self.late:
                topic.send_soon(key=key, value=value)
            self.late.clear()
