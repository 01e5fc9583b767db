"""Create the event topics with the configured partition count, and check existing ones match.

All source topics and the feature tables must share one partition count: a user's events and
state live in the same partition number everywhere (co-partitioning).
"""

from __future__ import annotations

from collections.abc import Mapping

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.settings import Settings


class TopicMismatch(RuntimeError):
    """An existing topic has another partition count than the settings ask for."""


def topic_specs(settings: Settings) -> dict[str, tuple[int, dict[str, str]]]:
    """Every topic the system owns: name -> (partitions, configs).

    The training log has one partition, so one trainer learns every label of a target in one
    order; the models topic is compacted with one key per version, so every version is kept for
    ``propstream model list|rollback``; change events are keyed by user on the event partitions.
    """
    n = settings.partitions
    specs: dict[str, tuple[int, dict[str, str]]] = {t: (n, {}) for t in settings.source_topics}
    specs[settings.topic_deadletter] = (n, {})
    specs[settings.topic_changes] = (n, {"cleanup.policy": "compact,delete"})  # erasure tombstones
    specs[settings.topic_triggers] = (n, {"cleanup.policy": "compact,delete"})  # likewise
    # compact only: a member who entered long ago stays on the topic until a tombstone removes them
    specs[settings.topic_audiences] = (n, {"cleanup.policy": "compact"})
    specs[settings.topic_forward_deadletter] = (n, {})
    specs[settings.topic_erasure] = (n, {})  # keyed by user id: lands on the partition's owner
    specs[settings.topic_erasure_done] = (1, {})
    specs[settings.topic_training] = (1, {})
    specs[settings.topic_models] = (1, {"cleanup.policy": "compact"})
    return specs


def ensure_topics(
    settings: Settings, bootstrap: str | None = None, extra: Mapping[str, str] | None = None
) -> list[str]:
    """Create missing event topics; returns the names created. Raises on partition mismatch.

    ``extra``: topic configs added to every topic created (the bench asks for broker append times).
    """
    servers = bootstrap or settings.broker_url
    admin = KafkaAdminClient(
        bootstrap_servers=servers, client_id="propstream-admin", request_timeout_ms=30000
    )
    try:
        wanted = topic_specs(settings)
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created = []
        if missing:
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            t,
                            num_partitions=wanted[t][0],
                            replication_factor=1,
                            topic_configs={**wanted[t][1], **(extra or {})},
                        )
                        for t in missing
                    ]
                )
                created = missing
            except TopicAlreadyExistsError:
                pass  # another process won the race: fine
        present = [t for t in settings.source_topics if t in existing]
        if present:
            for meta in admin.describe_topics(present):
                n = len(meta["partitions"])
                if n != settings.partitions:
                    msg = (
                        f"topic {meta['topic']} has {n} partitions but PROPSTREAM_PARTITIONS="
                        f"{settings.partitions}: all event topics and tables must share one partition count"
                    )
                    raise TopicMismatch(msg)
        return created
    finally:
        admin.close()
