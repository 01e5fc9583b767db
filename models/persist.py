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
from models.value import AnyModel, ValueConfig, ValueModel, regressor

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


def _pipeline_state(pipeline: Any) -> dict[str, Any]:
    """A ``StandardScaler | LinearRegression/LogisticRegression`` pipeline's numbers."""
    scaler, lr = pipeline.steps.values()
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
    }


def _load_pipeline(pipeline: Any, state: dict[str, Any]) -> None:
    scaler, lr = pipeline.steps.values()
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


_VALUE_FIGURES = ("revenue_sum", "log_sum", "log_n", "log_sq", "smear_avg", "smear_n")


def model_state(model: AnyModel) -> dict[str, Any]:
    if isinstance(model, ValueModel):
        return {
            "classifier": model_state(model.classifier),
            "severity": _pipeline_state(model.severity),
            "positives": model.positives,
            "negatives": model.negatives,
            **{k: getattr(model, k) for k in _VALUE_FIGURES},
        }
    return {**_pipeline_state(model.pipeline), "positives": model.positives, "negatives": model.negatives}


def model_config(model: AnyModel) -> dict[str, Any]:
    """What rebuilds an empty ``model``: its configuration, plus the kind and form of a value model."""
    out = dataclasses.asdict(model.config)
    if isinstance(model, ValueModel):
        out.update(kind=ValueModel.kind, **dataclasses.asdict(model.value_config))
    return out


def _known(cls: Any, config: dict[str, Any]) -> Any:
    """``cls`` (a config dataclass) from the keys of ``config`` it has: others belong to another part."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known})


def _restore_online(config: dict[str, Any], state: dict[str, Any]) -> OnlineModel:
    model = OnlineModel(_known(ModelConfig, config))
    if state:
        _load_pipeline(model.pipeline, state)
        model.positives = state["positives"]
        model.negatives = state["negatives"]
    return model


def restore(config: dict[str, Any], state: dict[str, Any]) -> AnyModel:
    """A model built from ``config`` and loaded with ``state`` (empty state: a fresh model)."""
    if config.get("kind") != ValueModel.kind:
        return _restore_online(config, state)
    vc = _known(ValueConfig, config)
    model = ValueModel(_known(ModelConfig, config), vc)
    if state:
        model.classifier = _restore_online(config, state["classifier"])
        model.severity = regressor(vc.severity_lr)
        _load_pipeline(model.severity, state["severity"])
        model.positives = state["positives"]
        model.negatives = state["negatives"]
        for k in _VALUE_FIGURES:
            setattr(model, k, state.get(k, getattr(model, k)))  # a figure added later: its start value
    return model


def snapshot_of(model: AnyModel, **meta: Any) -> ModelSnapshot:
    return ModelSnapshot(
        config=model_config(model),
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


def model_of(snap: ModelSnapshot) -> AnyModel:
    return restore(snap.config, snap.state)
