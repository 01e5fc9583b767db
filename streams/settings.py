"""One frozen settings object for the whole system, read from ``PROPSTREAM_*`` environment variables.

Every CLI option falls back to one of these fields, so the environment alone can configure a
deployment and ``--help`` shows which variable feeds which option.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PROPSTREAM_"


def env_name(field: str) -> str:
    """The environment variable that overrides settings field ``field``."""
    return ENV_PREFIX + field.upper()


class Settings(BaseSettings):
    """Configuration of broker, worker, ingestion rules and features. Immutable once built."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- Kafka -------------------------------------------------------------------------------
    bootstrap: str = Field(
        "",
        description="Existing Kafka cluster (host:port,...). Empty: use the local broker that "
        "`propstream broker start` runs.",
    )
    kafka_version: str = Field("3.9.1", description="Apache Kafka version fetched from Maven Central.")
    broker_port: int = Field(
        9092, ge=0, le=65535, description="Client port of the local broker (0: free port)."
    )
    broker_heap_mb: int = Field(512, ge=128, description="JVM heap of the local broker, MiB.")
    home: Path = Field(
        Path.home() / ".cache" / "propstream",
        description="Cache folder: Kafka jars, local broker data and logs, worker state.",
    )
    partitions: int = Field(
        4, ge=1, le=1024, description="Partitions of every event topic and table (fixed once topics exist)."
    )

    # --- Topics ------------------------------------------------------------------------------
    topic_clickstream: str = Field("events.clickstream", description="Page, product and search events.")
    topic_cart: str = Field("events.cart", description="Cart and checkout events.")
    topic_purchase: str = Field("events.purchase", description="Orders.")
    topic_deadletter: str = Field(
        "events.deadletter", description="Rejected input, original bytes plus reason."
    )

    # --- Worker ------------------------------------------------------------------------------
    app_id: str = Field("propstream", description="Faust app id: consumer group and changelog prefix.")
    web_host: str = Field("127.0.0.1", description="Interface the worker's HTTP API binds to.")
    web_advertise: str = Field(
        "", description="Host other workers use to reach this one (routed lookups). Default: web_host."
    )
    web_port: int = Field(6066, ge=0, le=65535, description="Port of the worker's HTTP API.")
    data_dir: Path | None = Field(
        None, description="Worker state (RocksDB). Default: <home>/worker-<web_port>."
    )
    batch_size: int = Field(2000, ge=1, description="Events taken per batch on the hot path.")
    batch_within_s: float = Field(0.05, gt=0, description="Max wait to fill a batch, seconds.")
    api_token: SecretStr | None = Field(None, description="Bearer token required for lookups, if set.")

    # --- Ingestion rules ---------------------------------------------------------------------
    max_event_bytes: int = Field(65536, ge=256, description="Larger payloads are rejected as oversize.")
    max_future_s: int = Field(300, ge=0, description="Reject events more than this ahead of wall-clock time.")
    earliest_event_time: str = Field(
        "2000-01-01T00:00:00Z", description="Reject events before this UTC time (ISO-8601)."
    )
    allowed_lateness_s: int = Field(
        3600, ge=0, description="Accept events at most this far behind the partition's event-time watermark."
    )
    dedup_capacity: int = Field(512, ge=16, description="Recent event ids remembered per user for dedup.")
    custom_events: str = Field(
        "",
        description="Extra custom event types accepted (comma-separated), beside sign_up, demo_request, ...",
    )
    default_currency: str = Field("USD", min_length=3, max_length=3, description="Currency when absent.")

    # --- Features ----------------------------------------------------------------------------
    session_gap_s: int = Field(1800, ge=60, description="Inactivity that starts a new derived session.")
    abandon_after_s: int = Field(1800, ge=60, description="Cart untouched and unbought this long: abandoned.")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Worker log level.")

    @field_validator("earliest_event_time")
    @classmethod
    def _parse_earliest(cls, value: str) -> str:
        from features.contract import parse_time_ms

        if parse_time_ms(value) is None:
            msg = f"earliest_event_time must be ISO-8601 UTC, got {value!r}"
            raise ValueError(msg)
        return value

    @property
    def earliest_event_ms(self) -> int:
        from features.contract import parse_time_ms

        ms = parse_time_ms(self.earliest_event_time)
        assert ms is not None  # checked by the validator
        return ms

    @property
    def source_topics(self) -> tuple[str, str, str]:
        return (self.topic_clickstream, self.topic_cart, self.topic_purchase)

    @property
    def state_dir(self) -> Path:
        return self.data_dir or self.home / f"worker-{self.web_port}"

    @property
    def broker_url(self) -> str:
        """``host:port,...`` of the cluster to use: the configured one or the local broker."""
        if self.bootstrap:
            return self.bootstrap
        from streams.broker import LocalBroker

        return LocalBroker(self).bootstrap()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
