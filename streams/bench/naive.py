"""The naive baseline: the same features and model written the straightforward Faust way.

Per event: stdlib ``json.loads``, one table read and one table write (so one changelog message),
features computed and the model's ``predict_proba_one`` and ``learn_one`` called, all inside a plain
``async for event in stream`` agent. No batching, no coalescing. Run by ``propstream bench`` as
``python -m streams.bench.naive`` (settings from ``PROPSTREAM_*``); ``GET /count`` reports progress.
"""

from __future__ import annotations

import json
from typing import Any

import faust
from faust.web import Request, Response, View
from faust.worker import Worker

from features.contract import Event
from features.state import decode, encode
from features.user import apply, compute, finalize
from models.online import OnlineModel, inputs
from streams.settings import Settings


def event_of(d: dict[str, Any]) -> Event:
    return Event(
        event_id=str(d["event_id"]),
        user_id=str(d["user_id"]),
        type=str(d["type"]),
        ts_ms=int(d["ts"]),
        session_id=d.get("session_id"),
        product_id=d.get("product_id"),
        price=d.get("price"),
        quantity=int(d.get("quantity", 1)),
        revenue=d.get("revenue"),
    )


def create_naive_app(settings: Settings) -> faust.App:
    app = faust.App(
        settings.app_id + "-naive",
        broker=",".join(f"kafka://{s}" for s in settings.broker_url.split(",")),
        store="rocksdb://",
        datadir=str(settings.state_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
    )
    table = app.Table("naive-features", partitions=settings.partitions, key_type=bytes, value_type=bytes)
    source = app.topic(*settings.source_topics, key_serializer="raw", value_serializer="raw")
    params = settings.feature_params()
    model = OnlineModel(settings.learner_config())
    count = [0]

    @app.agent(source, name="naive")
    async def naive(stream: Any) -> None:
        async for value in stream:
            count[0] += 1
            d = json.loads(value)
            user = str(d["user_id"])
            st = decode(table.get(user))
            ev = event_of(d)
            if apply(st, ev, params) is None:
                finalize(st)
                table[user] = encode(st)
                x = inputs(compute(st, st.last_ms, params))
                model.pipeline.predict_proba_one(x)
                model.pipeline.learn_one(x, ev.type == "purchase")

    @app.page("/count")
    class Count(View):
        async def get(self, request: Request) -> Response:
            return self.json({"consumed": count[0]})

    return app


if __name__ == "__main__":
    Worker(create_naive_app(Settings()), loglevel="warning", quiet=True).execute_from_commandline()
