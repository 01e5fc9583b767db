"""Every worker follows the models topic and hot-swaps each target's newest version.

The models topic is read whole, from the beginning, by every worker (no consumer group: each
needs all of it), with aiokafka in the worker's event loop. A newer version replaces the entry in
the dict the scoring core reads, between two batches, so a batch never mixes versions. Each version
comes with the trust gate's verdict on the quality it was published with (``models/trust.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from models.ledger import VALUE
from models.persist import ModelSnapshot, load, model_of
from models.scoring import TargetModel
from models.value import fresh_model
from streams.faults import Faults, describe
from streams.settings import Settings

log = logging.getLogger(__name__)


class LiveModels:
    """The model each target is scored with on this worker, and the snapshot it came from."""

    def __init__(
        self,
        settings: Settings,
        on_swap: Callable[[str, TargetModel, ModelSnapshot], None],
        faults: Faults,
    ) -> None:
        self.settings = settings
        self.on_swap = on_swap
        self.faults = faults
        config = settings.learner_config()
        self.gate = settings.trust_gate()
        self.models: dict[str, TargetModel] = {
            t.name: TargetModel(
                fresh_model(t.name, config, settings.value_config()),
                0,
                settings.min_positives,
                settings.min_negatives,
                self.gate.judge({}, value=t.value),  # no version yet: no matured label to judge
            )
            for t in settings.target_list()
        }
        self.snapshots: dict[str, ModelSnapshot] = {}
        self.caught_up = asyncio.Event()
        self.refused = 0
        self.lock: asyncio.Lock | None = None  # held while a batch is processed (the worker's outbox)

    def apply(self, raw: bytes | None, where: str = "") -> bool:
        """Take one message of the models topic; True if it swapped a model in.

        A message that is no snapshot, or whose model cannot be rebuilt, is counted and skipped:
        the live model stays, and following (and so the trainer's catch-up) goes on.
        """
        if raw is None:
            return False
        try:
            snap = load(raw)
            live = self.models.get(snap.target)
            if live is None or snap.version <= live.version:
                return False  # a target not configured here, or an older version replayed
            model = model_of(snap)
        except Exception as exc:  # ValueError from load; anything from a snapshot with a bad state
            self.refused += 1
            self.faults.unreadable("model_snapshot", describe(exc), where)
            return False
        s = self.settings
        verdict = self.gate.judge(snap.quality, value=snap.target == VALUE)
        new = TargetModel(model, snap.version, s.min_positives, s.min_negatives, verdict)
        if new.warming_up != live.warming_up:  # trusted, or no longer: say why, once per flip
            if new.warming_up:
                log.warning(
                    "%s model version %d not trusted, warming up again: %s",
                    snap.target,
                    snap.version,
                    new.trust.reason,
                )
            else:
                log.info("%s model version %d trusted: %s", snap.target, snap.version, new.trust.reason)
        self.models[snap.target] = new
        self.snapshots[snap.target] = snap
        self.on_swap(snap.target, new, snap)
        return True

    async def follow(self, bootstrap: str, retry_s: float = 2.0) -> None:
        """Read the models topic from the start forever; ``caught_up`` is set once the backlog is read.

        Any failure (the broker went away, a client error) is counted and the feed starts again
        from the beginning after ``retry_s``: newer versions win, so rereading is harmless.
        """
        while True:
            try:
                await self._follow(bootstrap)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.faults.failed("models", exc)
                await asyncio.sleep(retry_s)

    async def _follow(self, bootstrap: str) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.settings.topic_models
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic)
            while not parts:  # metadata for a topic created a moment ago
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
                if not parts:
                    await asyncio.sleep(0.5)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while True:
                batch = await consumer.getmany(*tps, timeout_ms=500)
                if batch:
                    async with self.lock or contextlib.nullcontext():
                        for messages in batch.values():
                            for msg in messages:
                                self.apply(msg.value, f"{msg.topic}[{msg.partition}]@{msg.offset}")
                if not self.caught_up.is_set():
                    positions = [await consumer.position(tp) for tp in tps]
                    if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                        self.caught_up.set()
        finally:
            await consumer.stop()
