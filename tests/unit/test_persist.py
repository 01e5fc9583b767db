"""Model snapshots: a restored model scores and keeps learning exactly like the original; no pickle."""

from __future__ import annotations

import random

import msgspec
import pytest

from models.online import ModelConfig, OnlineModel
from models.persist import ModelSnapshot, dump, load, model_of, model_state, snapshot_of
from models.scoring import input_names

NAMES = input_names()
OPTIMISERS = ["sgd", "adagrad", "adam"]


def sample(rng: random.Random) -> tuple[dict[str, float], int]:
    x = {k: rng.uniform(-1, 4) for k in NAMES}
    return x, int(x["n_page_view_1h"] - x["tenure_days"] + rng.gauss(0, 0.5) > 0)


def round_trip(model: OnlineModel) -> OnlineModel:
    return model_of(load(dump(snapshot_of(model, target="purchase", version=3, created_ms=1))))


@pytest.mark.parametrize("optimizer", OPTIMISERS)
def test_a_restored_model_scores_and_keeps_learning_like_the_original(optimizer: str) -> None:
    rng = random.Random(7)
    original = OnlineModel(ModelConfig(optimizer=optimizer, learning_rate=0.05, l2=0.001))
    opt = original.pipeline.steps["LogisticRegression"].optimizer
    assert type(opt).__name__.lower() == optimizer  # the configured optimiser really is the one used
    for _ in range(150):
        original.learn(*sample(rng))
    restored = round_trip(original)
    assert restored.config == original.config
    probes = [sample(rng)[0] for _ in range(30)]
    assert [restored.score(x) for x in probes] == [original.score(x) for x in probes]
    assert len({original.score(x) for x in probes}) == 30  # the model learnt something
    for _ in range(150):
        x, y = sample(rng)
        original.learn(x, y)
        restored.learn(x, y)
    assert [restored.score(x) for x in probes] == [original.score(x) for x in probes]
    assert model_state(restored) == model_state(original)


@pytest.mark.parametrize(
    "optimizer",
    ["sgd", "adagrad", "adam"],
)
def test_a_fresh_model_round_trips(optimizer: str) -> None:
    fresh = OnlineModel(ModelConfig(optimizer=optimizer))
    assert type(fresh.pipeline.steps["LogisticRegression"].optimizer).__name__.lower() == optimizer
    restored = round_trip(fresh)
    x = sample(random.Random(1))[0]
    assert restored.score(x) == pytest.approx(fresh.score(x), abs=1e-12)
    assert fresh.score(x) == pytest.approx(fresh.config.prior)  # untrained: the configured prior
    assert (restored.positives, restored.negatives) == (0, 0)


def test_snapshot_carries_provenance() -> None:
    rng = random.Random(3)
    model = OnlineModel(ModelConfig(optimizer="sgd", learning_rate=0.05))
    labels = []
    for _ in range(40):
        x, y = sample(rng)
        model.learn(x, y)
        labels.append(y)
    snap = load(dump(snapshot_of(model, target="churn", version=12, created_ms=5, note="rollback to 3")))
    assert (snap.target, snap.version, snap.created_ms, snap.note) == ("churn", 12, 5, "rollback to 3")
    assert (snap.positives, snap.negatives) == (sum(labels), 40 - sum(labels))
    assert snap.key == b"churn@0000000012"
    assert b"\x80" not in dump(snap)[:2]  # msgpack, not a pickle stream (which starts with 0x80)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x80\x04\x95garbage", b"not msgpack at all", msgspec.msgpack.encode([1, 2, 3])],
    ids=["empty", "pickle", "text", "array"],
)
def test_load_of_garbage_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not a model snapshot: "):
        load(raw)


def test_load_refuses_another_format() -> None:
    raw = dump(ModelSnapshot(format=2, target="purchase", version=1, created_ms=0))
    with pytest.raises(ValueError, match="format 2, this version reads 1"):
        load(raw)
