"""The trainer's logic: one ordered log of matured examples per deployment in, model versions out.

Workers send every labelled snapshot whose horizon passed to a one-partition training topic; the
one trainer consuming it learns them in log order, so there is one model per target, not one per
partition. Its state records the last log offset learnt, so a redelivered message after a crash
is skipped (learning is exactly-once over the log) and a restart resumes where it stopped.
Pure: the Faust agent in ``streams/trainer.py`` feeds it and publishes what it returns.
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import Any

import msgspec

from features.state import Corrupt
from models import quality
from models.online import ModelConfig
from models.persist import ModelSnapshot, load, model_config, model_of, model_state, restore, snapshot_of
from models.scoring import input_names
from models.trust import TrustGate
from models.value import AnyModel, ValueConfig, ValueModel, fresh_model, learn_matured, matured_y
from models.value import figures as value_figures


def inputs_hash() -> int:
    """Fingerprint of the input layout: examples built with another layout are refused."""
    return zlib.crc32(",".join(input_names()).encode())


class Example(msgspec.Struct, array_like=True, tag="example"):
    target: str
    ts_ms: int  # snapshot event time
    x: list[float]  # model inputs in ``input_names()`` order
    label: int
    score: float  # the live score at snapshot time (test-then-train: before this label was learnt)
    model_version: int
    inputs: int  # ``inputs_hash()`` of the sender
    value: float = 0.0  # value targets: the revenue in the horizon (``label``: was there a purchase)


class Rollback(msgspec.Struct, array_like=True, tag="rollback"):
    target: str
    to_version: int
    snapshot: bytes  # the published ModelSnapshot of ``to_version``


_msg_dec = msgspec.msgpack.Decoder(Example | Rollback)


def decode_message(raw: bytes) -> Example | Rollback:
    try:
        return _msg_dec.decode(raw)
    except msgspec.DecodeError as exc:
        msg = f"not a training message: {exc}"
        raise ValueError(msg) from exc


class TrainerState(msgspec.Struct):
    """What survives a trainer restart (stored in a changelogged table)."""

    target: str
    version: int = 0  # last published version
    offset: int = -1  # last training-log offset handled
    since_publish: int = 0
    trained_to_ms: int = 0
    published_wall_ms: int = 0
    note: str = ""
    force: bool = False  # publish at the next chance (a rollback)
    trusted: bool = False  # the last published version passed the counts and the trust gate
    # (live score, label; of a value target: its revenue)
    window: list[tuple[float, float]] = msgspec.field(default_factory=list)
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    model: dict[str, Any] = msgspec.field(default_factory=dict)


_state_dec = msgspec.msgpack.Decoder(TrainerState)


def decode_trainer_state(raw: bytes | None) -> TrainerState | None:
    """The stored trainer state (None when absent); :class:`Corrupt` when unreadable.

    The model inside is checked too, so a state that decodes but cannot be restored is refused
    here rather than failing later in the trainer.
    """
    if not raw:
        return None
    try:
        state = _state_dec.decode(raw)
        restore(state.config, state.model)
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise Corrupt(what="trainer_state", detail=f"{type(exc).__name__}: {exc}") from None
    return state


class Trainer:
    def __init__(
        self,
        target: str,
        *,
        config: ModelConfig,
        min_positives: int,
        min_negatives: int,
        publish_every: int,
        publish_interval_ms: int,
        window: int,
        state: TrainerState | None = None,
        seed: ModelSnapshot | None = None,
        trust: TrustGate | None = None,
        value: ValueConfig | None = None,
    ) -> None:
        self.target = target
        self.min = (min_positives, min_negatives)
        self.trust = trust  # the workers' gate (models/trust.py); None: counts only
        self._quality: tuple[int, dict[str, float]] | None = None  # (log offset, report) cache
        self.publish_every = publish_every
        self.publish_interval_ms = publish_interval_ms
        self.names = input_names()
        self.hash = inputs_hash()
        self.window: deque[tuple[float, float]] = deque(maxlen=window)
        self.model: AnyModel
        self.refusal = ""  # why the last message was refused
        if state is not None:
            self.st = state
            self.model = restore(state.config, state.model)
            self.window.extend(state.window)
        elif seed is not None:  # a fresh trainer continues from the newest published version
            self.st = TrainerState(
                target,
                version=seed.version,
                trained_to_ms=seed.trained_to_ms,
                published_wall_ms=seed.created_ms,
            )
            self.model = model_of(seed)
            self.st.trusted = self._trusted(seed.quality)  # what the workers hold now
        else:
            self.st = TrainerState(target)
            self.model = fresh_model(target, config, value)
            self.st.trusted = self._trusted({})  # what the workers make of version 0

    @property
    def warm(self) -> bool:
        """What every worker will make of a version published now: enough labels, and the gate passed."""
        return self._trusted(None)

    def _trusted(self, quality: dict[str, float] | None) -> bool:
        """The counts, then the gate on ``quality`` (``None``: the window's, computed only when needed)."""
        if self.model.positives < self.min[0] or self.model.negatives < self.min[1]:
            return False
        if self.trust is None:
            return True
        report = self.quality() if quality is None else quality
        return self.trust.judge(report, value=isinstance(self.model, ValueModel)).trusted

    def handle(self, offset: int, msg: Example | Rollback) -> str:
        """Learn one log entry; returns what happened (``learnt``, ``skipped``, ``rollback``, ``refused``).

        A rollback whose snapshot cannot be read raises :class:`Corrupt` (after recording the
        offset, so it is not retried).
        """
        if offset <= self.st.offset:
            return "skipped"  # redelivered after a crash: already in the model
        self.st.offset = offset
        if isinstance(msg, Rollback):
            try:
                snap = load(msg.snapshot)
                model = model_of(snap)
            except (ValueError, KeyError, TypeError) as exc:  # skipped: the offset is recorded
                detail = f"rollback to {msg.to_version}: the snapshot is unreadable ({exc})"
                raise Corrupt(what="training_message", detail=detail) from None
            if snap.target != self.target or snap.version != msg.to_version:
                self.refusal = f"rollback to {msg.to_version}: the snapshot is {snap.target} v{snap.version}"
                return "refused"
            self.model = model
            self.st.trained_to_ms = snap.trained_to_ms  # the weights know nothing newer
            self.st.note = f"rollback to {msg.to_version}"
            self.st.force = True
            return "rollback"
        if msg.inputs != self.hash or len(msg.x) != len(self.names):
            self.refusal = "training example with another input layout"
            return "refused"
        learn_matured(self.model, dict(zip(self.names, msg.x, strict=True)), msg.label, msg.value)
        self.window.append((msg.score, matured_y(self.model, msg.label, msg.value)))
        self.st.since_publish += 1
        self.st.trained_to_ms = max(self.st.trained_to_ms, msg.ts_ms)
        return "learnt"

    def due(self, now_ms: int) -> bool:
        """Publish now? Forced, enough labels or time since the last version, or the verdict flipped.

        Judged once per trainer batch: a model leaves warm-up everywhere as soon as it earns it, and
        goes back to it as soon as its quality falls below the gate.
        """
        if self.st.force or self.st.since_publish >= self.publish_every:
            return True
        if self.st.since_publish == 0:
            return False
        return self.warm != self.st.trusted or now_ms - self.st.published_wall_ms >= self.publish_interval_ms

    def quality(self) -> dict[str, float]:
        """The rolling quality report of the window (computed once per log offset)."""
        if self._quality is None or self._quality[0] != self.st.offset:
            scores = [s for s, _ in self.window]
            if not self.window:
                rep: dict[str, float] = {}
            elif isinstance(self.model, ValueModel):
                rep = value_figures(scores, [y for _, y in self.window])
            else:
                rep = quality.report(scores, [int(y) for _, y in self.window])
            self._quality = (self.st.offset, rep)
        return self._quality[1]

    def publish(self, now_ms: int) -> ModelSnapshot:
        self.st.version += 1
        snap = snapshot_of(
            self.model,
            target=self.target,
            version=self.st.version,
            created_ms=now_ms,
            trained_to_ms=self.st.trained_to_ms,
            quality=self.quality(),
            note=self.st.note,
        )
        self.st.trusted = self.warm
        self.st.since_publish = 0
        self.st.published_wall_ms = now_ms
        self.st.note = ""
        self.st.force = False
        return snap

    def state(self) -> TrainerState:
        self.st.window = list(self.window)
        self.st.config = model_config(self.model)
        self.st.model = model_state(self.model)
        return self.st
