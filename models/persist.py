"""Model snapshots as plain msgpack: what the trainer publishes and every worker hot-swaps.

Explicit fields rather than pickle: a snapshot travels over a Kafka topic, and unpickling bytes
from a topic would let anyone who can write to it run code in every worker. The snapshot holds the
model's configuration, the scaler's running statistics, the weights, the intercept and the
optimiser's state, so a restored model scores *and keeps learning* exactly like the original.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Any

import msgspec
from river.utils import VectorDict

from models.online import ModelConfig, OnlineModel

FORMAT = 1


class ModelSnapshot(msgspec.Struct, kw_only=True):
    """One published version of one target's model, with its provenance and measured quality."""

    format: int = FORMAT
    target: str
    version: int
    created_ms: int  # wall-clock time of publication
    trained_to_ms: int = 0  # event time of the newest snapshot learnt
    positives: int = 0  # matured labels learnt, by class
    negatives: int = 0
    quality: dict[str, float] = msgspec.field(default_factory=dict)  # rolling, on matured labels
    note: str = ""  # e.g. "rollback to 7"
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    state: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def key(self) -> bytes:
        """Kafka key on the compacted models topic: every version is kept."""
        return f"{self.target}@{self.version:010d}".encode()


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(ModelSnapshot)


def model_state(model: OnlineModel) -> dict[str, Any]:
    scaler, lr = model.pipeline.steps.values()
    opt = lr.optimizer
    # AdaGrad keeps g2, Adam m and v (created on Adam's first step: absent before)
    opt_state = {k: dict(v) for k, v in vars(opt).items() if k in ("g2", "m", "v") and v is not None}
    return {
        "counts": dict(scaler.counts),
        "means": dict(scaler.means),
        "vars": dict(scaler.vars),
        "weights": dict(lr._weights),
        "intercept": float(lr.intercept),
        "n_iterations": int(opt.n_iterations),
        "optimizer": opt_state,
        "positives": model.positives,
        "negatives": model.negatives,
    }


def restore(config: dict[str, Any], state: dict[str, Any]) -> OnlineModel:
    """A model built from ``config`` and loaded with ``state`` (empty state: a fresh model)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = OnlineModel(ModelConfig(**{k: v for k, v in config.items() if k in known}))
    if not state:
        return model
    scaler, lr = model.pipeline.steps.values()
    scaler.counts = Counter(state["counts"])
    scaler.means = defaultdict(float, state["means"])
    scaler.vars = defaultdict(float, state["vars"])
    for k, w in state["weights"].items():
        lr._weights[k] = w
    lr.intercept = state["intercept"]
    opt = lr.optimizer
    opt.n_iterations = state["n_iterations"]
    for k, v in state["optimizer"].items():
        # the types river creates: Adam steps weights as vectors, AdaGrad per key
        setattr(opt, k, VectorDict(v) if k in ("m", "v") else defaultdict(float, v))
    model.positives = state["positives"]
    model.negatives = state["negatives"]
    return model


def snapshot_of(model: OnlineModel, **meta: Any) -> ModelSnapshot:
    return ModelSnapshot(
        config=dataclasses.asdict(model.config),
        state=model_state(model),
        positives=model.positives,
        negatives=model.negatives,
        **meta,
    )


def dump(snap: ModelSnapshot) -> bytes:
    return _enc.encode(snap)


def load(raw: bytes) -> ModelSnapshot:
    """Decode a published snapshot; raises ``ValueError`` for bytes that are not one."""
    try:
        snap = _dec.decode(raw)
    except msgspec.DecodeError as exc:
        msg = f"not a model snapshot: {exc}"
        raise ValueError(msg) from exc
    if snap.format != FORMAT:
        msg = f"model snapshot format {snap.format}, this version reads {FORMAT}"
        raise ValueError(msg)
    return snap


def model_of(snap: ModelSnapshot) -> OnlineModel:
    return restore(snap.config, snap.state)
