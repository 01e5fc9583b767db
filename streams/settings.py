"""One frozen settings object for the whole system, read from ``PROPSTREAM_*`` environment variables.

Every CLI option falls back to one of these fields, so the environment alone can configure a
deployment and ``--help`` shows which variable feeds which option.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from features.contract import Rules
    from features.state import FeatureParams
    from models.audiences import Audience
    from models.changes import ChangeRules
    from models.ledger import Target
    from models.online import ModelConfig
    from models.timers import TimerConfig
    from models.trust import TrustGate
    from models.value import ValueConfig

ENV_PREFIX = "PROPSTREAM_"


def env_name(field: str) -> str:
    """The environment variable that overrides settings field ``field``."""
    return ENV_PREFIX + field.upper()


def _duration(bare_unit: str, *, whole: bool = False) -> Callable[[Any, ValidationInfo], Any]:
    """A validator reading ``2h`` or ``90s`` from text; numbers (keywords, plain values) pass as they are."""

    def parse(value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        from models.targets import UNITS_S, parse_duration

        name = env_name(info.field_name or "")
        try:
            seconds = parse_duration(value, bare_unit=bare_unit)
        except ValueError as exc:
            msg = f"{name}: {exc} (e.g. 90s, 30m, 2h, 7d)"
            raise ValueError(msg) from None
        if whole and not seconds.is_integer():
            msg = f"{name}: {value.strip()!r} is not a whole number of seconds"
            raise ValueError(msg)
        return int(seconds) if whole else seconds / UNITS_S[bare_unit]

    return parse


# Duration fields keep their names and types; only how the environment may spell them grows.
Seconds = Annotated[int, BeforeValidator(_duration("s", whole=True))]
FloatSeconds = Annotated[float, BeforeValidator(_duration("s"))]
Days = Annotated[float, BeforeValidator(_duration("d"))]
IN_SECONDS = " Duration: 90s, 30m, 2h, 7d (plain number: seconds)."
IN_DAYS = " Duration: 90s, 30m, 2h, 7d (plain number: days)."


def _names(value: str) -> frozenset[str]:
    return frozenset(v.strip() for v in value.split(",") if v.strip())


def _value_tiers(value: str) -> tuple[float, float, bool]:
    """``1x,3x`` as ``(1.0, 3.0, True)`` (multiples of the mean), ``50,200`` as ``(50.0, 200.0, False)``."""
    parts = [p.strip().lower() for p in value.split(",")]
    relative = bool(parts) and all(p.endswith("x") for p in parts)
    try:
        cuts = [float(p.removesuffix("x")) for p in parts]
    except ValueError:
        cuts = []
    mixed = any(p.endswith("x") for p in parts) and not relative
    if len(cuts) != 2 or mixed or not 0 < cuts[0] < cuts[1] < math.inf:
        msg = (
            f"value_tiers must be two ascending positive amounts (50,200) or multiples (1x,3x), got {value!r}"
        )
        raise ValueError(msg)
    return cuts[0], cuts[1], relative


def _rates(value: str) -> tuple[tuple[str, float], ...]:
    """``EUR=1.08,GBP=1.27`` as ``(("EUR", 1.08), ("GBP", 1.27))``; ``ValueError`` names a bad entry."""
    out: list[tuple[str, float]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        code, _, rate = item.partition("=")
        try:
            r = float(rate)
        except ValueError:
            r = math.nan
        if len(code.strip()) != 3 or not code.strip().isalpha() or not (math.isfinite(r) and r > 0):
            msg = f"currency_rates entry {item!r}: write CODE=RATE with a 3-letter code and a positive rate"
            raise ValueError(msg)
        out.append((code.strip().upper(), r))
    return tuple(out)


def _silence_ms(value: str) -> tuple[int, ...]:
    """Milliseconds of a ``1h,1d,...`` list (empty: no silence points).

    >>> _silence_ms("1h, 1d"), _silence_ms("")
    ((3600000, 86400000), ())
    """
    from models.targets import parse_duration

    return tuple(int(parse_duration(v) * 1000) for v in value.split(",") if v.strip())


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
    topic_changes: str = Field(
        "propensity.changes", description="Outbound propensity-change events (JSON, keyed by user)."
    )
    topic_training: str = Field(
        "propstream.training", description="Matured labelled snapshots, one partition: the trainer's log."
    )
    topic_models: str = Field(
        "propstream.models", description="Published model versions (compacted; every version kept)."
    )
    topic_erasure: str = Field(
        "users.erasure", description="Erasure requests, keyed by user id (propstream forget sends them)."
    )
    topic_erasure_done: str = Field("users.erasure.done", description="Erasure confirmations.")
    topic_triggers: str = Field(
        "propensity.triggers",
        description="Outbound behavioural trigger events (cart_abandoned, ...; JSON, keyed by user).",
    )
    topic_audiences: str = Field(
        "propensity.audiences",
        description="Audience membership (compacted, keyed audience|user): JSON entered events; a "
        "left event is a tombstone with headers, so the compacted topic holds the current members.",
    )
    topic_forward_deadletter: str = Field(
        "propensity.forward.deadletter",
        description="Events propstream forward could not deliver after forward_attempts tries, with "
        "the reason in headers.",
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
    batch_within_s: FloatSeconds = Field(
        0.05, gt=0, description="Max wait to fill a batch (Faust's stream only)." + IN_SECONDS
    )
    checkpoint_interval_s: FloatSeconds = Field(
        1.0,
        ge=0,
        description="Direct consume: rows, watermarks and training examples are written, and the "
        "offsets committed, at most this long after a batch (outputs leave after every batch). "
        "Longer: fewer changelog messages, more redelivered after a crash. 0: after every batch."
        + IN_SECONDS,
    )
    fetch_wait_s: FloatSeconds = Field(
        0.01,
        gt=0,
        description="How long the broker may hold a fetch that finds no new records (Kafka's "
        "fetch.max.wait.ms; Faust fixes it at 1.5 s). A fetch covers only partitions with nothing "
        "buffered, one at a time per broker, so a fetch of quiet partitions held this long delays "
        "the busy ones' next records as long: 1.5 s was the bench's e2e p99. Shorter: lower "
        "latency, more empty fetches while idle." + IN_SECONDS,
    )
    checkpoint_rows: int = Field(
        10_000, ge=1, description="Direct consume: a checkpoint as soon as this many users' rows are held."
    )
    direct_consume: bool = Field(
        True,
        description="Take source records out of Faust's fetches in batches and commit their offsets "
        "after each batch (streams/direct.py), skipping Faust's per-message stream; false: Faust's "
        "stream and take_events.",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="at_least_once: outputs leave after every batch and a crash may repeat some "
        "(same ids). exactly_once (direct consume only): each checkpoint is one Kafka transaction "
        "of the outputs, changelog rows, training examples and source offsets, so read_committed "
        "consumers see each exactly once, but only at the checkpoint (PROPSTREAM_CHECKPOINT_"
        "INTERVAL_S: e2e latency grows by up to that much). docs/guarantees.md.",
    )
    transactional_id: str = Field(
        "",
        description="exactly_once: the Kafka transactional id of this worker, stable across its "
        "restarts so a restarted worker fences its previous self. Default: <app_id>-<advertised "
        "host>-<web_port>.",
    )
    api_token: SecretStr | None = Field(None, description="Bearer token required for lookups, if set.")
    batch_in_thread: bool = Field(
        False,
        description="Process each batch in a thread while the event loop serves lookups meanwhile: "
        "lookup p99 185 -> 115 ms, but 0.79x the events per CPU second (the two threads share one "
        "GIL; docs/benchmarks.md).",
    )

    # --- Privacy -----------------------------------------------------------------------------
    pseudonymize_key: SecretStr | None = Field(
        None,
        description="If set, user ids are replaced at ingestion by HMAC-SHA256(key, id): raw ids are "
        "kept nowhere (state, changelogs, outbound topics, logs, metrics).",
    )

    # --- Ingestion rules ---------------------------------------------------------------------
    max_event_bytes: int = Field(65536, ge=256, description="Larger payloads are rejected as oversize.")
    max_future_s: Seconds = Field(
        300, ge=0, description="Reject events more than this ahead of wall-clock time." + IN_SECONDS
    )
    earliest_event_time: str = Field(
        "2000-01-01T00:00:00Z", description="Reject events before this UTC time (ISO-8601)."
    )
    allowed_lateness_s: Seconds = Field(
        3600,
        ge=0,
        description="Accept events at most this far behind the partition's event-time watermark."
        + IN_SECONDS,
    )
    dedup_capacity: int = Field(512, ge=16, description="Recent event ids remembered per user for dedup.")
    custom_events: str = Field(
        "",
        description="Extra custom event types accepted (comma-separated), beside sign_up, demo_request, ...",
    )
    default_currency: str = Field(
        "USD",
        min_length=3,
        max_length=3,
        description="The deployment's one currency (ISO 4217): events without a currency are in it, "
        "and every amount (price, revenue, value scores) is in it.",
    )
    currency_rates: str = Field(
        "",
        description="Events in another currency are converted at these rates or rejected (reason "
        "currency): comma-separated CODE=RATE, RATE units of default_currency per unit of CODE, e.g. "
        "EUR=1.08,GBP=1.27. Empty: only default_currency is accepted.",
    )

    user_ttl_days: Days = Field(
        400.0,
        ge=0,
        description="Users with no event for this long (event time) are evicted from state and "
        "changelogs. 0: never. Longer than every feature window (90 days), so no feature changes." + IN_DAYS,
    )
    retention_sweep_batch: int = Field(
        50,
        ge=1,
        description="Users looked at per partition by each retention sweep (50: a worker owning "
        "10 partitions, sweeping each once a second, passes a million users in about half an hour; "
        "each user read costs a row read, so 200 cost 3% of the worker's CPU).",
    )
    retention_sweep_every_s: FloatSeconds = Field(
        1.0,
        ge=0,
        description="A partition is swept at most this often (wall clock), at the end of a batch or "
        "an idle tick. Live batches are small and many: a sweep after each one cost more than the "
        "events. 0: after every batch." + IN_SECONDS,
    )
    source_idle_s: Seconds = Field(
        30,
        ge=0,
        description="A source topic with nothing new for this long (wall clock) in a partition, while "
        "another topic of it advances, or that never delivered to it, stops holding the partition's "
        "watermark back (orders-only sources). 0: never idle." + IN_SECONDS,
    )
    idle_advance_s: Seconds = Field(
        60,
        ge=0,
        description="A partition with no events at all for this long (wall clock) moves its event-time "
        "clock to wall-clock time minus allowed_lateness_s, so timers fire at night and in outages "
        "(live workers only; replay and eval stay in event time). 0: off." + IN_SECONDS,
    )

    # --- Features ----------------------------------------------------------------------------
    session_gap_s: Seconds = Field(
        1800, ge=60, description="Inactivity that starts a new derived session." + IN_SECONDS
    )
    abandon_after_s: Seconds = Field(
        1800, ge=60, description="Cart untouched and unbought this long: abandoned." + IN_SECONDS
    )

    # --- Targets, labels and models ----------------------------------------------------------
    targets: str = Field(
        "purchase:7d,churn:14d",
        description="Targets, comma-separated NAME:HORIZON (horizon in s, m, h or d): purchase, churn, "
        "value (the revenue of the user's purchases within the horizon, e.g. value:90d) or any accepted "
        "event type (e.g. sign_up:30d).",
    )
    value_model: Literal["hurdle", "log1p"] = Field(
        "hurdle",
        description="The value target's model: hurdle (P(purchase) x E[revenue | purchase]) or log1p "
        "(one regression on log(1 + revenue)); see docs/models.md.",
    )
    value_learning_rate: float = Field(
        0.001, gt=0, description="SGD step of the value model's log-revenue regression."
    )
    value_tiers: str = Field(
        "1x,3x",
        description="Value tiers: low < A <= medium < B <= high, as two ascending amounts in the "
        "deployment currency (e.g. 50,200) or multiples of the model's mean revenue per snapshot "
        "(e.g. 1x,3x: the scale follows the data).",
    )
    sample_every_s: Seconds = Field(
        3600,
        ge=0,
        description="At most one labelled snapshot per user and target per this much event time."
        + IN_SECONDS,
    )
    value_sample_every_s: Seconds = Field(
        86400,
        ge=0,
        description="The value target's sampling period: its horizon is long (90d), hourly snapshots "
        "of one user say nearly the same, and each waits the whole horizon in the user's ledger."
        + IN_SECONDS,
    )
    max_pending: int = Field(64, ge=1, description="Pending snapshots kept per user and target.")
    model_optimizer: Literal["sgd", "adagrad", "adam"] | None = Field(
        None, description="Optimiser of the logistic regression (default: the model's own)."
    )
    model_learning_rate: float | None = Field(None, gt=0, description="Learning rate (default: the model's).")
    model_l2: float | None = Field(None, ge=0, description="L2 penalty (default: the model's).")
    model_prior: float | None = Field(
        None, gt=0, lt=1, description="Score of an untrained model (its starting intercept is logit(prior))."
    )
    model_positive_weight: float | None = Field(
        None, gt=0, description="Weight of positive examples; above 1 favours recall over calibration."
    )
    min_positives: int = Field(200, ge=0, description="Matured positives a model needs before it is trusted.")
    min_negatives: int = Field(200, ge=0, description="Matured negatives a model needs before it is trusted.")
    publish_every: int = Field(500, ge=1, description="Labels learnt between published model versions.")
    publish_interval_s: FloatSeconds = Field(
        30.0, gt=0, description="Publish what was learnt at least this often." + IN_SECONDS
    )
    quality_window: int = Field(
        5000, ge=100, description="Matured labels in the rolling quality figures (ROC-AUC, ECE, ...)."
    )
    trust_min_auc_lower: float = Field(
        0.6,
        ge=0,
        lt=1,
        description="Trust gate: a model with its label counts is trusted (change events, warming_up "
        "false) only while the one-sided 95% lower bound (Hanley-McNeil) of its rolling ROC-AUC on "
        "the served scores of matured labels is at least this. 0: not checked.",
    )
    trust_min_gini: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Trust gate of the value target: its rolling normalised Gini (how well the served "
        "values rank the revenue that came) must be at least this. 0: not checked.",
    )
    trust_max_value_bias: float = Field(
        0.5,
        ge=0,
        description="Trust gate of the value target: the revenue it predicted over the revenue that came "
        "must lie within [1 / (1 + this), 1 + this]. 0: not checked.",
    )
    trust_max_ece: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Trust gate: ... and while the rolling expected calibration error (10 bins) of "
        "those scores is at most this. 1: not checked (0 and 1 switch the whole gate off).",
    )

    # --- Timers and triggers -------------------------------------------------------------------
    rescore_after: str = Field(
        "1h,1d,3d,7d,14d",
        description="Silence points: after this much event time without an event, every target is "
        "rescored as of then (change events with trigger silence) and label snapshots are sampled. "
        "Comma-separated durations, ascending; empty: none.",
    )
    triggers: str = Field(
        "cart_abandoned,repeat_view_no_purchase",
        description="Behavioural triggers published to topic_triggers (comma-separated; empty: none).",
    )
    repeat_view_threshold: int = Field(
        3, ge=2, description="Views of one product within 24 h, unbought, that make a repeat_view trigger."
    )
    timer_fires_per_batch: int = Field(
        2_000,
        ge=0,
        description="Most timers fired per batch (per partition of a batch with direct consume, and "
        "per idle-clock tick) beyond those of the "
        "batch's own users, so a clock that jumps (a backlog, an outage) cannot block the event "
        "loop: the rest fire in the next batches, as of their due time all the same. 0: no bound.",
    )
    index_slice: int = Field(
        20_000,
        ge=100,
        description="Users read per partition and batch while a partition's timer index is rebuilt "
        "(after an assignment), so the rebuild never blocks the event loop for long.",
    )

    # --- Audiences and delivery ------------------------------------------------------------------
    audiences: str = Field(
        "",
        description="Audience definitions, one per line or separated by ';': NAME: CONDITION over "
        "scores, tiers and features, e.g. 'high_intent: purchase >= 0.6; at_risk: churn >= 0.5 and "
        "purchases_90d >= 2; top_buyers: purchase top 10%'. Empty: none. docs/audiences.md.",
    )
    audience_cooldown_s: Seconds = Field(
        900,
        ge=0,
        description="Event time between two moves (entered, left) of one user in one audience; a "
        "move sooner waits for the user's next evaluation after it, so a score hovering at a "
        "threshold does not send the user in and out at every event. 0: none." + IN_SECONDS,
    )
    forward_url: str = Field(
        "", description="propstream forward: the webhook that receives the events (http or https URL)."
    )
    forward_secret: SecretStr | None = Field(
        None,
        description="propstream forward: HMAC-SHA256 key signing each request body "
        "(X-Propstream-Signature). Unset: requests are not signed.",
    )
    forward_topics: str = Field(
        "",
        description="propstream forward: topics to deliver, comma-separated. Default: the change, "
        "trigger and audience topics.",
    )
    forward_group: str = Field(
        "",
        description="propstream forward: consumer group (its committed offsets). Default: <app_id>-forward.",
    )
    forward_batch: int = Field(
        100, ge=1, le=10_000, description="propstream forward: events per request, at most."
    )
    forward_timeout_s: FloatSeconds = Field(
        10.0, gt=0, description="propstream forward: a request that takes longer failed." + IN_SECONDS
    )
    forward_attempts: int = Field(
        8,
        ge=1,
        description="propstream forward: tries per batch before its events go to "
        "topic_forward_deadletter with the last reason.",
    )
    forward_backoff_s: FloatSeconds = Field(
        0.5,
        gt=0,
        description="propstream forward: first retry delay; doubled per failure, with full jitter."
        + IN_SECONDS,
    )
    forward_backoff_max_s: FloatSeconds = Field(
        60.0, gt=0, description="propstream forward: longest retry delay." + IN_SECONDS
    )
    forward_metrics_port: int = Field(
        9465, ge=0, le=65535, description="propstream forward: port of its Prometheus /metrics (0: off)."
    )

    # --- Change events -------------------------------------------------------------------------
    tier_thresholds: str = Field(
        "0.2,0.5", description="Score boundaries of the tiers low / medium / high (ascending)."
    )
    tier_hysteresis: float = Field(
        0.03, ge=0, lt=0.5, description="Leaving a tier needs the score past the boundary by this much."
    )
    min_delta: float = Field(
        0.15, gt=0, le=1, description="A move this large is a change even within a tier."
    )
    cooldown_s: Seconds = Field(
        900, ge=0, description="Event time between two change events per user and target." + IN_SECONDS
    )
    churn_drop: float = Field(
        0.25, gt=0, le=1, description="A purchase-score drop this large for an engaged user is a churn risk."
    )
    top_factors: int = Field(5, ge=1, le=20, description="Contributing features listed per score.")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Worker log level.")

    @field_validator("targets")
    @classmethod
    def _parse_targets(cls, value: str) -> str:
        from models.targets import parse_targets

        parse_targets(value)  # raises ValueError with the reason
        return value

    @field_validator("rescore_after", "triggers")
    @classmethod
    def _parse_timers(cls, value: str, info: ValidationInfo) -> str:
        from models.timers import TimerConfig

        try:
            if info.field_name == "rescore_after":
                TimerConfig(silence_ms=_silence_ms(value))
            else:
                TimerConfig(triggers=_names(value))
        except ValueError as exc:
            msg = f"{env_name(info.field_name or '')}: {exc}"
            raise ValueError(msg) from None
        return value

    @field_validator("tier_thresholds")
    @classmethod
    def _parse_thresholds(cls, value: str) -> str:
        try:
            cuts = [float(v) for v in value.split(",")]
        except ValueError:
            cuts = []
        if len(cuts) != 2 or not 0 < cuts[0] < cuts[1] < 1:
            msg = f"tier_thresholds must be two ascending numbers in (0, 1), got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("default_currency")
    @classmethod
    def _upper_currency(cls, value: str) -> str:
        return value.upper()

    @field_validator("currency_rates")
    @classmethod
    def _parse_rates(cls, value: str) -> str:
        _rates(value)
        return value

    @field_validator("value_tiers")
    @classmethod
    def _parse_value_tiers(cls, value: str) -> str:
        _value_tiers(value)
        return value

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

    @model_validator(mode="after")
    def _exactly_once_needs_direct_consume(self) -> Settings:
        if self.processing_guarantee == "exactly_once" and not self.direct_consume:
            msg = (
                "PROPSTREAM_PROCESSING_GUARANTEE=exactly_once needs PROPSTREAM_DIRECT_CONSUME=true: "
                "the transactions are the checkpoints of direct consume"
            )
            raise ValueError(msg)
        return self

    def worker_transactional_id(self) -> str:
        """The transactional id of this worker (``transactional_id`` or one made of its address)."""
        host = self.web_advertise or self.web_host
        return self.transactional_id or f"{self.app_id}-{host}-{self.web_port}"

    @model_validator(mode="after")
    def _targets_are_event_types(self) -> Settings:
        from features.contract import CANONICAL_TYPES, DEFAULT_CUSTOM_TYPES

        known = {*CANONICAL_TYPES, *DEFAULT_CUSTOM_TYPES, *(t for t in self.custom_events.split(",") if t)}
        for t in self.target_list():
            if not t.churn and not t.value and t.name not in known:
                msg = (
                    f"target {t.name!r} is not an accepted event type, so it could never happen: use "
                    f"churn or one of {', '.join(sorted(known))} (PROPSTREAM_CUSTOM_EVENTS adds types)"
                )
                raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _audiences_parse(self) -> Settings:
        from models.audiences import AudienceError

        try:
            self.audience_list()
        except AudienceError as exc:
            msg = f"{env_name('audiences')}: {exc}"
            raise ValueError(msg) from None
        return self

    def audience_list(self) -> tuple[Audience, ...]:
        """The audience definitions, parsed against the targets and the served features."""
        from features.catalogue import NAMES
        from models.audiences import parse_audiences

        return parse_audiences(self.audiences, [t.name for t in self.target_list()], NAMES)

    def target_list(self) -> tuple[Target, ...]:
        from models.targets import parse_targets

        return parse_targets(self.targets, self.sample_every_s, self.max_pending, self.value_sample_every_s)

    def learner_config(self) -> ModelConfig:
        from models.online import ModelConfig

        given: dict[str, Any] = {
            "optimizer": self.model_optimizer,
            "learning_rate": self.model_learning_rate,
            "l2": self.model_l2,
            "positive_weight": self.model_positive_weight,
            "prior": self.model_prior,
        }
        return ModelConfig(**{k: v for k, v in given.items() if v is not None})

    def value_config(self) -> ValueConfig:
        from models.value import ValueConfig

        return ValueConfig(form=self.value_model, severity_lr=self.value_learning_rate)

    def trust_gate(self) -> TrustGate:
        """The quality gate, as the trainer, every worker and ``propstream eval`` apply it."""
        from models.trust import TrustGate

        return TrustGate(
            self.trust_min_auc_lower, self.trust_max_ece, self.trust_min_gini, self.trust_max_value_bias
        )

    def ingest_rules(self) -> Rules:
        """The contract's validation knobs, as the worker and ``propstream eval`` both apply them."""
        from features.contract import DEFAULT_CUSTOM_TYPES, Rules

        return Rules(
            max_event_bytes=self.max_event_bytes,
            max_future_ms=self.max_future_s * 1000,
            earliest_ms=self.earliest_event_ms,
            custom_types=DEFAULT_CUSTOM_TYPES | frozenset(t for t in self.custom_events.split(",") if t),
            default_currency=self.default_currency,
            currency_rates=_rates(self.currency_rates),
        )

    def feature_params(self) -> FeatureParams:
        """Feature definitions that are configuration: the worker's and ``propstream eval``'s alike."""
        from features.state import FeatureParams

        return FeatureParams(
            session_gap_ms=self.session_gap_s * 1000,
            abandon_after_ms=self.abandon_after_s * 1000,
            dedup_capacity=self.dedup_capacity,
        )

    def timer_config(self) -> TimerConfig:
        """Silence points and triggers, as the worker and ``propstream eval`` both run them."""
        from models.timers import TimerConfig

        return TimerConfig(
            silence_ms=_silence_ms(self.rescore_after),
            cart_after_ms=self.abandon_after_s * 1000,
            triggers=_names(self.triggers),
            repeat_views=self.repeat_view_threshold,
        )

    def change_rules(self) -> ChangeRules:
        from models.changes import ChangeRules

        low, high = (float(v) for v in self.tier_thresholds.split(","))
        return ChangeRules(
            thresholds=(low, high),
            hysteresis=self.tier_hysteresis,
            min_delta=self.min_delta,
            cooldown_ms=self.cooldown_s * 1000,
            churn_drop=self.churn_drop,
            value_tiers=_value_tiers(self.value_tiers),
        )

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


def unknown_env(names: Iterable[str], also_valid: Iterable[str] = ()) -> list[str]:
    """One problem per ``PROPSTREAM_*`` name nothing reads, with the closest valid name when one is close.

    Pydantic-settings ignores variables that match no field (``extra="forbid"`` covers keywords
    only), so a misspelt one would change nothing without a word. ``also_valid``: the variables the
    CLI's own options read. Case is ignored, as pydantic-settings ignores it.

    >>> unknown_env(["PROPSTREAM_PARTITONS", "PATH", "PROPSTREAM_PARTITIONS"])
    ['unknown setting PROPSTREAM_PARTITONS: did you mean PROPSTREAM_PARTITIONS?']
    """
    valid = {env_name(f) for f in Settings.model_fields} | {n.upper() for n in also_valid}
    tails = sorted(v.removeprefix(ENV_PREFIX) for v in valid if v.startswith(ENV_PREFIX))
    problems = []
    for name in names:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in valid:
            continue
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), tails, n=1)
        hint = f": did you mean {ENV_PREFIX}{close[0]}?" if close else ": no setting or option reads it"
        problems.append(f"unknown setting {name}{hint}")
    return problems


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
