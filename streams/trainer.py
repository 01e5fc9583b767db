"""The trainer agent: the one consumer of the one-partition training topic, one model per target.

Faust assigns the single partition to one worker of the group, so exactly one process learns at
a time; if it dies, another worker takes the partition over and restores the trainer's state
(model, version, last offset learnt) from the ``trainer`` table's changelog. Published versions
go to the compacted models topic, from which every worker hot-swaps (:mod:`streams.model_feed`).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import faust
import msgspec
from faust.streams import _current_event

from features.state import Corrupt
from models.persist import dump
from models.training import Trainer, decode_message, decode_trainer_state
from streams.faults import Faults
from streams.faust_fixes import current_events
from streams.model_feed import LiveModels
from streams.model_metrics import ModelMetrics
from streams.settings import Settings

log = logging.getLogger(__name__)

_state_enc = msgspec.msgpack.Encoder()


def attach_trainer(
    app: faust.App, settings: Settings, live: LiveModels, metrics: ModelMetrics, faults: Faults
) -> dict[str, Any]:
    """Add the trainer table and agent to ``app``; returns the in-memory trainers (dropped on rebalance)."""
    table = app.Table(
        "trainer",
        partitions=1,
        key_type=bytes,
        value_type=bytes,
        options={"driver": "rocksdict"},
        help="Per target: the trainer's model, version and last training-log offset learnt.",
    )
    source = app.topic(settings.topic_training, partitions=1, key_serializer="raw", value_serializer="raw")
    models_topic = app.topic(settings.topic_models, key_serializer="raw", value_serializer="raw")
    trainers: dict[str, Trainer] = {}
    targets = {t.name for t in settings.target_list()}
    config = settings.learner_config()

    def trainer_for(target: str) -> Trainer:
        tr = trainers.get(target)
        if tr is None:
            try:
                state = decode_trainer_state(table.get(target))
            except Corrupt as exc:  # continue from the newest published version, as a fresh trainer
                faults.corrupt(exc, target)
                state = None
            tr = trainers[target] = Trainer(
                target,
                config=config,
                min_positives=settings.min_positives,
                min_negatives=settings.min_negatives,
                publish_every=settings.publish_every,
                publish_interval_ms=int(settings.publish_interval_s * 1000),
                window=settings.quality_window,
                trust=live.gate,  # the workers' own gate: a flip of their verdict is published at once
                value=settings.value_config(),
                state=state,
                seed=None if state is not None else live.snapshots.get(target),
            )
        return tr

    async def train(stream: Any) -> None:
        async for batch in stream.take_events(1000, within=0.5):
            if not live.caught_up.is_set():  # a fresh trainer starts from the newest published version
                await live.caught_up.wait()
            # a batch fetched before a rebalance: this worker may have lost the training log, and
            # learning it here (from a stale table copy) could publish a version the new owner does too
            batch, stale = current_events(batch, app.consumer_generation_id)
            if stale:
                faults.metrics.stale_records.inc(stale)
            if not batch:
                continue
            token = _current_event.set(weakref.ref(batch[0]))
            try:
                touched: set[str] = set()
                for ev in batch:
                    offset = ev.message.offset
                    try:
                        msg = decode_message(ev.message.value)
                    except ValueError as exc:
                        faults.unreadable("training_message", str(exc), f"offset {offset}")
                        continue
                    if msg.target not in targets:
                        continue
                    try:
                        outcome = trainer_for(msg.target).handle(offset, msg)
                    except Corrupt as exc:
                        faults.corrupt(exc, f"{msg.target} offset {offset}")
                        touched.add(msg.target)  # its offset is recorded: stored with the state
                        continue
                    except Exception as exc:  # one message: the model and the log go on
                        faults.failed("trainer", exc, f"{msg.target} offset {offset}")
                        continue
                    if outcome == "learnt":
                        metrics.learning_steps.labels(msg.target).inc()
                    elif outcome == "refused":
                        log.warning(
                            "training message refused (offset %d): %s", offset, trainers[msg.target].refusal
                        )
                    touched.add(msg.target)
                now_ms = int(time.time() * 1000)
                for target in touched:
                    tr = trainers[target]
                    if tr.due(now_ms):
                        snap = tr.publish(now_ms)
                        models_topic.send_soon(key=snap.key, value=dump(snap))
                        log.info("published %s model version %d", target, snap.version)
                    table[target] = _state_enc.encode(tr.state())
            finally:
                _current_event.reset(token)

    app.agent(source, name="trainer")(train)
    return trainers
