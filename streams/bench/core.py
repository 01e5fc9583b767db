"""The hot path in-process (no Kafka): the ingest handler plus the score stage over in-memory stores.

Used by the growth phase and for profiling (``python -m streams.bench.core [EVENTS]``): it isolates
our per-event cost from Faust's and the broker's.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from models.scoring import ScoringCore, TargetModel, input_names
from models.value import ValueModel, fresh_model
from streams.faults import Faults
from streams.ingest import IngestHandler, MemoryStore, Record, StateStore
from streams.metrics import Metrics
from streams.model_metrics import ModelMetrics
from streams.producer import topic_for
from streams.score_stage import KV, MemoryKV, ScoreStage
from streams.settings import Settings
from traffic.simulator import SimConfig, simulate


def trained_models(settings: Settings, n: int = 400, seed: int = 3) -> dict[str, TargetModel]:
    """Models with non-trivial weights and no warm-up, so scoring and change detection do real work."""
    import random

    rng = random.Random(seed)
    names = input_names()
    out = {}
    for t in settings.target_list():
        m = fresh_model(t.name, settings.learner_config(), settings.value_config())
        for _ in range(n):
            x = {k: rng.random() * 3 for k in names}
            y = int(x[names[0]] + rng.random() > 2.0)
            if isinstance(m, ValueModel):
                m.learn(x, y, math.exp(2.0 + x[names[1]]) if y else 0.0)
            else:
                m.learn(x, y)
        out[t.name] = TargetModel(m, 1, 0, 0)
    return out


def records_of(events: Iterable[Mapping[str, Any]], settings: Settings) -> list[Record]:
    enc = msgspec.json.Encoder()
    out = []
    for i, e in enumerate(events):
        key = str(e["user_id"]).encode()
        out.append(
            Record(
                topic_for(e["type"], settings), zlib.crc32(key) % settings.partitions, i, key, enc.encode(e)
            )
        )
    return out


def build(
    settings: Settings,
    store: StateStore | None = None,
    scores: KV | None = None,
    ledgers: KV | None = None,
    changes: list[bytes] | None = None,
    triggers: list[bytes] | None = None,
    examples: list[bytes] | None = None,
    models: dict[str, TargetModel] | None = None,
    clock: Callable[[], float] = time.time,
    audience: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] | None = None,
) -> IngestHandler:
    """Handler and stage as the worker wires them, over the given (default: in-memory) stores."""
    metrics = Metrics()
    faults = Faults(metrics)
    core = ScoringCore(
        settings.target_list(),
        settings.feature_params(),
        settings.change_rules(),
        models if models is not None else trained_models(settings),
        top_k=settings.top_factors,
        timers=settings.timer_config(),
        audiences=settings.audience_list(),
        audience_cooldown_ms=settings.audience_cooldown_s * 1000,
    )
    sink = changes if changes is not None else []
    stage = ScoreStage(
        core,
        scores if scores is not None else MemoryKV(),
        ledgers if ledgers is not None else MemoryKV(),
        lambda user, value: sink.append(value),
        (lambda target, value: examples.append(value)) if examples is not None else (lambda t, v: None),
        ModelMetrics(metrics.registry),
        wall_clock=clock,
        faults=faults,
        send_trigger=(lambda user, value: triggers.append(value)) if triggers is not None else None,
        index_slice=settings.index_slice,
        send_audience=(lambda k, v, h: audience.append((k, v, h))) if audience is not None else None,
    )
    return IngestHandler(
        settings, store or MemoryStore(), lambda dl: None, metrics, clock=clock, stage=stage, faults=faults
    )


def run(handler: IngestHandler, records: list[Record], batch: int) -> float:
    """Seconds to push ``records`` through ``handler`` in batches of ``batch``."""
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        handler.process(records[i : i + batch])
    return time.perf_counter() - t0


def cpu_per_event(handler: IngestHandler, records: list[Record], batch: int) -> float:
    """CPU microseconds of this process per record pushed through ``handler`` (robust to a busy
    machine, which slows the wall clock, not the work)."""
    t0 = time.process_time()
    for i in range(0, len(records), batch):
        handler.process(records[i : i + batch])
    return (time.process_time() - t0) / len(records) * 1e6


def main(argv: list[str]) -> None:
    """``python -m streams.bench.core [EVENTS] [--split] [--audiences DEFS] [--targets SPEC] [--repeat N]``.

    --split: the cost of decode, validation and the feature fold alone, beside the whole handler.
    --audiences: CPU per event without and with those definitions, alternated ``--repeat`` times
    (default 4) on the same records and models, medians and their ratio.
    --targets: likewise, the configured targets against ``SPEC`` (e.g. adding value:90d).
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m streams.bench.core")
    ap.add_argument("events", nargs="?", type=int, default=100_000)
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--audiences", default=None)
    ap.add_argument("--targets", default=None)
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args(argv)
    settings = Settings()
    n_events = args.events
    records = records_of(
        simulate(SimConfig(users=max(1000, n_events // 50), seed=1, max_events=n_events)), settings
    )
    handler = build(settings)
    dt = run(handler, records, settings.batch_size)
    print(
        f"{len(records):,} events in-process: {len(records) / dt:,.0f} events/s "
        f"({dt / len(records) * 1e6:.1f} us/event)"
    )
    if args.split:
        fold = IngestHandler(settings, MemoryStore(), lambda dl: None, Metrics())
        alone = cpu_per_event(fold, records, settings.batch_size)
        print(f"decode, validate and fold only: {alone:.1f} us CPU/event")
        whole = cpu_per_event(build(settings), records, settings.batch_size)
        print(f"the worker's handler and score stage: {whole:.1f} us CPU/event")
    if args.audiences is not None:
        moves: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = []
        off, on = _alternate(settings, Settings(audiences=args.audiences), records, args.repeat, moves)
        print(
            f"without audiences {off:.1f}, with {on:.1f} us CPU/event (median of {args.repeat}), "
            f"ratio {on / off:.3f}; {len(moves):,} audience messages for {len(records):,} events"
        )
    if args.targets is not None:
        off, on = _alternate(settings, Settings(targets=args.targets), records, args.repeat, [])
        print(
            f"targets {settings.targets}: {off:.1f}, {args.targets}: {on:.1f} us CPU/event "
            f"(median of {args.repeat}), ratio {on / off:.3f}"
        )


def _alternate(
    a: Settings,
    b: Settings,
    records: list[Record],
    repeat: int,
    moves: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]],
) -> tuple[float, float]:
    """Median CPU per event under settings ``a`` and ``b``, alternated ``repeat`` times on the same
    records and models (noise on a shared machine moves both alike)."""
    import statistics

    models = {**trained_models(a), **trained_models(b)}
    cost: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeat):
        for i, s in enumerate((a, b)):
            moves.clear()
            mine = {t.name: models[t.name] for t in s.target_list()}
            cost[i].append(cpu_per_event(build(s, models=mine, audience=moves), records, a.batch_size))
    return statistics.median(cost[0]), statistics.median(cost[1])


if __name__ == "__main__":
    main(sys.argv[1:])
