"""The trainer: learning in log order exactly once, restarts, publishing, warm-up, rollback, refusals."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any

import msgspec
import pytest

from models.online import ModelConfig, OnlineModel
from models.persist import dump, load, model_of, model_state
from models.scoring import input_names
from models.training import Example, Rollback, Trainer, TrainerState, decode_message, inputs_hash

CONFIG = ModelConfig(optimizer="sgd", learning_rate=0.05)
ENC = msgspec.msgpack.Encoder()


def examples(n: int, seed: int = 0, target: str = "purchase") -> list[Example]:
    rng = random.Random(seed)
    names = input_names()
    out = []
    for i in range(n):
        x = [rng.uniform(0, 3) for _ in names]
        label = int(x[0] - x[1] + rng.gauss(0, 0.5) > 0)
        out.append(Example(target, 1_000 * i, x, label, rng.random(), 1, inputs_hash()))
    return out


def trainer(**kw: Any) -> Trainer:
    args: dict[str, Any] = {
        "config": CONFIG,
        "min_positives": 0,
        "min_negatives": 0,
        "publish_every": 10**9,
        "publish_interval_ms": 10**12,
        "window": 1000,
    }
    return Trainer("purchase", **{**args, **kw})


def wire(msg: Example | Rollback) -> Example | Rollback:
    """The message as the trainer receives it: msgpack bytes off the training log."""
    return decode_message(ENC.encode(msg))


def reference(exs: list[Example]) -> OnlineModel:
    model = OnlineModel(CONFIG)
    for e in exs:
        model.learn(dict(zip(input_names(), e.x)), e.label)
    return model


def test_learns_in_log_order_and_skips_what_it_already_handled() -> None:
    exs = examples(80)
    once = trainer()
    assert [once.handle(i, wire(e)) for i, e in enumerate(exs)] == ["learnt"] * 80
    assert model_state(once.model) == model_state(reference(exs))
    assert model_state(once.model) != model_state(reference(exs[::-1]))  # order matters: it is log order
    twice = trainer()
    for i, e in enumerate(exs[:50]):
        twice.handle(i, wire(e))
    outcomes = [twice.handle(i, wire(e)) for i, e in enumerate(exs)]  # redelivered from offset 0
    assert outcomes == ["skipped"] * 50 + ["learnt"] * 30
    assert model_state(twice.model) == model_state(once.model)
    assert (twice.model.positives, twice.model.negatives) == (once.model.positives, once.model.negatives)
    assert twice.handle(10, wire(exs[10])) == "skipped"  # below the last offset, even if never seen
    assert twice.st.offset == 79 and twice.st.trained_to_ms == exs[-1].ts_ms


@pytest.mark.parametrize(
    "optimizer",
    ["sgd", "adagrad", "adam"],
)
def test_a_trainer_restored_from_its_state_continues_like_an_uninterrupted_one(optimizer: str) -> None:
    exs = examples(120, seed=1)
    config = ModelConfig(optimizer=optimizer, learning_rate=0.05)
    live = trainer(window=50, config=config)
    for i, e in enumerate(exs[:70]):
        live.handle(i, wire(e))
    live.publish(5)
    live.handle(70, wire(exs[70]))
    raw = ENC.encode(live.state())
    restarted = trainer(window=50, config=CONFIG, state=msgspec.msgpack.decode(raw, type=TrainerState))
    assert restarted.model.config == config  # the stored configuration wins over the one passed
    assert restarted.handle(70, wire(exs[70])) == "skipped"  # redelivered after the crash
    for i, e in enumerate(exs[71:], start=71):
        assert restarted.handle(i, wire(e)) == live.handle(i, wire(e)) == "learnt"
    assert model_state(restarted.model) == model_state(live.model)
    assert restarted.quality() == live.quality() and restarted.quality()["matured"] == 50
    a, b = restarted.publish(9), live.publish(9)
    assert (a.version, a.state, a.quality, a.trained_to_ms) == (2, b.state, b.quality, exs[-1].ts_ms)


def test_publishes_every_n_labels_or_after_the_interval() -> None:
    tr = trainer(publish_every=10, publish_interval_ms=60_000)
    due = []
    for i, e in enumerate(examples(25)):
        tr.handle(i, e)
        due.append(tr.due(now_ms=1_000))
        if due[-1]:
            snap = tr.publish(1_000)
            assert (snap.version, snap.target, snap.created_ms) == (
                len([d for d in due if d]),
                "purchase",
                1_000,
            )
    assert [i for i, d in enumerate(due) if d] == [9, 19]
    assert not tr.due(1_000 + 59_999)  # 5 learnt since, interval not over
    assert tr.due(1_000 + 60_000)
    tr.publish(61_000)
    assert not tr.due(10**9)  # nothing new learnt: nothing to publish however long it has been


def test_publishes_as_soon_as_warm_up_ends() -> None:
    tr = trainer(min_positives=3, min_negatives=2)
    labels = [1, 1, 0, 1, 1, 1, 0, 1, 0, 0]  # warm at the 7th: 5 positives, 2 negatives
    exs = examples(len(labels))
    due = []
    for i, (e, y) in enumerate(zip(exs, labels)):
        assert tr.handle(i, msgspec.structs.replace(e, label=y)) == "learnt"
        due.append(tr.due(0))
        if due[-1]:
            snap = tr.publish(0)
            assert (snap.positives, snap.negatives) == (5, 2)
    assert due == [False] * 6 + [True] + [False] * 3  # forced once, not again


def test_rollback_republishes_the_old_weights_with_a_note() -> None:
    exs = examples(70, seed=2)
    tr = trainer()
    for i, e in enumerate(exs[:30]):
        tr.handle(i, wire(e))
    v1 = tr.publish(1)
    for i, e in enumerate(exs[30:60], start=30):
        tr.handle(i, wire(e))
    v2 = tr.publish(2)
    assert v2.state["weights"] != v1.state["weights"]
    back = wire(Rollback("purchase", v1.version, dump(v1)))
    assert isinstance(back, Rollback)
    assert tr.handle(60, back) == "rollback"
    assert tr.due(2)  # forced, with nothing learnt since
    v3 = tr.publish(3)
    assert (v3.version, v3.note) == (3, "rollback to 1")
    assert v3.state == v1.state and (v3.positives, v3.negatives) == (v1.positives, v1.negatives)
    assert tr.handle(60, back) == "skipped"
    # learning resumes from version 1, exactly like a model restored from it
    old = model_of(load(dump(v1)))
    for i, e in enumerate(exs[60:], start=61):
        tr.handle(i, wire(e))
        old.learn(dict(zip(input_names(), e.x)), e.label)
    assert model_state(tr.model) == model_state(old)
    assert tr.publish(4).note == ""


def test_examples_with_another_input_layout_are_refused() -> None:
    tr = trainer()
    [a, b, c] = examples(3)
    tr.handle(0, a)
    before = model_state(tr.model)
    assert tr.handle(1, msgspec.structs.replace(b, inputs=inputs_hash() ^ 1)) == "refused"
    assert tr.handle(2, msgspec.structs.replace(c, x=c.x[:-1])) == "refused"
    assert model_state(tr.model) == before and tr.st.since_publish == 1
    assert tr.handle(2, c) == "skipped"  # the refused offset is consumed all the same


def test_inputs_hash_is_the_crc32_of_the_layout_and_moves_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("n_events_1h", "cart_value", "tenure_days")
    monkeypatch.setattr("models.training.input_names", lambda: names)
    # CRC-32 (IEEE 802.3, as in zlib) of b"n_events_1h,cart_value,tenure_days", computed bit by bit
    crc = 0xFFFFFFFF
    for byte in b"n_events_1h,cart_value,tenure_days":
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    assert inputs_hash() == crc ^ 0xFFFFFFFF
    # every change of the layout a sender could make is seen: order, a dropped, an added, a renamed input
    for other in (
        ("cart_value", "n_events_1h", "tenure_days"),
        ("n_events_1h", "cart_value"),
        (*names, "cart_items"),
        ("n_events_1h", "cart_value", "tenure_day"),
    ):
        monkeypatch.setattr("models.training.input_names", lambda other=other: other)
        assert inputs_hash() != crc ^ 0xFFFFFFFF, other


def test_inputs_hash_is_the_same_in_every_process() -> None:
    """Workers and the trainer are separate processes: the fingerprint must not depend on hash()."""
    code = "from models.training import inputs_hash; print(inputs_hash())"
    seen = set()
    for seed in ("0", "1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        seen.add(int(out.stdout))
    assert seen == {inputs_hash()}


def test_garbage_on_the_training_log_is_a_value_error() -> None:
    for raw in (b"", b"\x93\x01\x02", ENC.encode({"target": "purchase"})):
        with pytest.raises(ValueError, match="not a training message"):
            decode_message(raw)
    e = examples(1)[0]
    assert decode_message(ENC.encode(e)) == e
