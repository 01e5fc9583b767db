"""One stored value per user: feature state, score state and ledger, written once per user per batch.

The worker used to keep three tables (features, scores, ledger), so a user touched by a batch cost
up to three RocksDB puts and three changelog messages. :class:`UserRows` keeps the three parts in one
value of one table instead: parts are read from the row on first use and the row is written once,
when the handler leaves the partition's context (:meth:`RowStore.partition`), still inside it, so
the write lands in that partition's file and changelog. The parts stay
the same bytes as before, so the pure code (``features/``, ``models/``) is untouched, and one
message now holds a user's features, dedup memory and pending snapshots together, atomically.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import msgspec

FEATURES, SCORES, LEDGER = 0, 1, 2


class UserRow(msgspec.Struct, array_like=True):
    features: bytes = b""
    scores: bytes = b""
    ledger: bytes = b""


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(UserRow)


def encode_row(parts: list[bytes]) -> bytes:
    return _enc.encode(UserRow(parts[0], parts[1], parts[2]))


class _FeaturesHead(msgspec.Struct, array_like=True):
    features: bytes = b""


_head = msgspec.msgpack.Decoder(_FeaturesHead)


def features_of_row(raw: bytes) -> bytes:
    """The features part of a stored row, the rest skipped unread (the retention sweep reads
    hundreds of rows a batch for this part alone); as :func:`decode_row` otherwise."""
    try:
        return _head.decode(raw).features
    except msgspec.DecodeError:
        return raw  # a UserState written before rows existed


def decode_row(raw: bytes | None) -> list[bytes]:
    """The three parts of a stored row; a value of the old features-only table is its features."""
    if not raw:
        return [b"", b"", b""]
    try:
        row = _dec.decode(raw)
    except msgspec.DecodeError:
        return [raw, b"", b""]  # a UserState written before rows existed (msgpack array, int first)
    return [row.features, row.scores, row.ledger]


class Backend(Protocol):
    """The table underneath: a Faust table in the worker (writes need the partition context)."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes) -> None: ...

    def scan(self, partition: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        """Keys and values of ``partition`` in key order, from the first key after ``after``."""

    def delete(self, key: str) -> None: ...


class UserRows:
    """Read-once, write-once access to the parts of each user's row within one partition's work."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._rows: dict[str, list[bytes]] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()  # whole rows to delete at the flush (retention)
        self.active = False  # inside a partition's work: rows read are kept until the flush
        self.writes = 0

    def get(self, user_id: str, part: int) -> bytes | None:
        if user_id in self._deleted:
            return None
        row = self._rows.get(user_id)
        if row is None:
            row = decode_row(self.backend.get(user_id))
            if self.active:  # lookups between batches read the table and keep nothing
                self._rows[user_id] = row
        return row[part] or None

    def set(self, user_id: str, part: int, value: bytes) -> None:
        if user_id in self._deleted:
            self._deleted.discard(user_id)
            self._rows[user_id] = [b"", b"", b""]
        row = self._rows.get(user_id)
        if row is None:
            row = self._rows[user_id] = decode_row(self.backend.get(user_id))
        row[part] = value
        self._dirty.add(user_id)

    def delete(self, user_id: str) -> None:
        """Remove the whole row at the flush: one tombstone on the changelog."""
        self._rows.pop(user_id, None)
        self._dirty.discard(user_id)
        self._deleted.add(user_id)

    def drop(self, user_id: str) -> None:
        """Forget this batch's unwritten changes to one user: its row stays as stored."""
        self._rows.pop(user_id, None)
        self._dirty.discard(user_id)
        self._deleted.discard(user_id)

    def held(self, user_id: str, part: int, stored: bytes) -> bytes:
        """``part`` of the user's row as this batch left it so far, ``stored`` being the table's value."""
        if user_id in self._deleted:
            return b""
        row = self._rows.get(user_id)
        if row is not None:
            return row[part]
        return features_of_row(stored) if part == FEATURES and stored else decode_row(stored)[part]

    def discard(self) -> None:
        """Forget unwritten changes (the partition's work failed: the worker stops, see app.py)."""
        self._dirty.clear()
        self._deleted.clear()
        self._rows.clear()

    def flush(self) -> int:
        """Write every changed row (call inside the partition's context); returns how many."""
        rows = self._rows
        n = 0
        for user_id in self._dirty:
            self.backend.set(user_id, encode_row(rows[user_id]))
            n += 1
        for user_id in self._deleted:
            self.backend.delete(user_id)
        self._dirty.clear()
        self._deleted.clear()
        rows.clear()  # lookups and other partitions read the table itself
        self.writes += n
        return n

    def scan(self, partition: int, part: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        """Every user's ``part`` in ``partition``, unwritten changes included (the rows held are
        the current partition's: the handler works one partition at a time)."""
        held = self._rows
        for user_id, raw in self.backend.scan(partition, after):
            row = held.get(user_id)
            value = (row if row is not None else decode_row(raw))[part]
            if value:
                yield user_id, value
        for user_id in [u for u in self._dirty if self.backend.get(u) is None]:
            if held[user_id][part]:
                yield user_id, held[user_id][part]


class PartKV:
    """:class:`streams.score_stage.KV` over one part of the rows (the scores or the ledger)."""

    def __init__(self, rows: UserRows, part: int) -> None:
        self.rows = rows
        self.part = part

    def get(self, key: str) -> bytes | None:
        return self.rows.get(key, self.part)

    def set(self, key: str, value: bytes) -> None:
        self.rows.set(key, self.part, value)

    def delete(self, key: str) -> None:
        if self.rows.get(key, self.part) is not None:
            self.rows.set(key, self.part, b"")

    def scan(self, partition: int, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        return self.rows.scan(partition, self.part, after)


class RowStore:
    """:class:`streams.ingest.StateStore` whose feature states live in the rows; marks elsewhere."""

    def __init__(self, rows: UserRows, marks: Any) -> None:
        self.rows = rows
        self.marks = marks  # a StateStore for partition contexts and watermarks

    @contextmanager
    def partition(self, record: Any) -> Iterator[None]:
        """The partition's context; every row changed inside it is written once, on the way out."""
        rows = self.rows
        with self.marks.partition(record):
            rows.active = True
            try:
                yield
            except BaseException:
                rows.discard()  # no half-applied user: the batch is redelivered, dedup sorts it out
                raise
            else:
                rows.flush()
            finally:
                rows.active = False

    def get(self, user_id: str) -> bytes | None:
        return self.rows.get(user_id, FEATURES)

    def set(self, user_id: str, value: bytes) -> None:
        self.rows.set(user_id, FEATURES, value)

    def get_mark(self, topic: str, partition: int) -> int | None:
        value: int | None = self.marks.get_mark(topic, partition)
        return value

    def set_mark(self, topic: str, partition: int, ts_ms: int) -> None:
        self.marks.set_mark(topic, partition, ts_ms)

    def scan_users(self, partition: int, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        """Feature states for the retention sweep, as this batch left them (rows without features
        are skipped): a user who came back in this batch is judged by the events just applied."""
        rows = self.rows
        out = []
        for user_id, raw in rows.backend.scan(partition, after):
            features = rows.held(user_id, FEATURES, raw)
            if features:
                out.append((user_id, features))
            if len(out) >= limit:
                break
        return out

    def delete(self, user_id: str) -> None:
        self.rows.delete(user_id)

    def discard(self, user_id: str) -> None:
        self.rows.drop(user_id)
