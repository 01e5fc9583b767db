"""Prometheus metrics of scoring, learning and change events, on the app's own registry.

Like :mod:`streams.metrics`, nothing here is touched per event: the score stage tallies a batch
and adds totals once. Labels are bounded: target names come from configuration, reasons and
directions from fixed vocabularies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from models.ledger import VALUE
from models.scoring import TargetModel
from models.trust import CHECKS

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))


class ModelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.scores = Counter("propstream_scores_total", "Users scored, by target.", ["target"], registry=r)
        self.score = Histogram(
            "propstream_score",
            "Distribution of scores, by target.",
            ["target"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.value = Histogram(
            "propstream_expected_value",
            "Distribution of the value target's scores (expected revenue, deployment currency).",
            ["target"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.learning_steps = Counter(
            "propstream_learning_steps_total",
            "Labels learnt by the trainer, by target.",
            ["target"],
            registry=r,
        )
        self.matured = Counter(
            "propstream_labels_matured_total",
            "Labelled snapshots whose horizon passed, sent to the trainer.",
            ["target", "label"],
            registry=r,
        )
        self.changes = Counter(
            "propstream_change_events_total",
            "Propensity-change events published.",
            ["target", "reason", "direction"],
            registry=r,
        )
        self.emit_latency = Histogram(
            "propstream_emit_latency_seconds",
            "Wall time from a batch entering the worker to its change events being handed to the producer.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.version = Gauge("propstream_model_version", "Live model version.", ["target"], registry=r)
        self.warming_up = Gauge(
            "propstream_model_warming_up",
            "1 while the live model is not trusted: too few matured labels, or below the trust gate.",
            ["target"],
            registry=r,
        )
        self.trusted = Gauge(
            "propstream_model_trusted",
            "1 while the live model is trusted (label counts and trust gate): its changes are announced.",
            ["target"],
            registry=r,
        )
        self.trust_failing = Gauge(
            "propstream_model_trust_failing",
            "1 for each check that keeps the live model untrusted: labels (counts), roc_auc (its lower "
            "bound), ece; of the value target gini and calibration.",
            ["target", "check"],
            registry=r,
        )
        self.matured_labels = Gauge(
            "propstream_model_matured_labels",
            "Matured labels the live model has learnt.",
            ["target"],
            registry=r,
        )
        self.roc_auc = Gauge(
            "propstream_model_roc_auc", "Rolling ROC-AUC of live scores.", ["target"], registry=r
        )
        self.log_loss = Gauge(
            "propstream_model_log_loss", "Rolling log loss of live scores.", ["target"], registry=r
        )
        self.ece = Gauge(
            "propstream_model_ece", "Rolling expected calibration error (10 bins).", ["target"], registry=r
        )
        self.gini = Gauge(
            "propstream_model_gini",
            "Value target: rolling normalised Gini of served values against the revenue that came.",
            ["target"],
            registry=r,
        )
        self.value_calibration = Gauge(
            "propstream_model_value_calibration",
            "Value target: revenue predicted over revenue that came, on the rolling window (1: unbiased).",
            ["target"],
            registry=r,
        )
        self.psi = Gauge(
            "propstream_drift_psi",
            "Population stability index against the reference window, of the score or a main input.",
            ["target", "input"],
            registry=r,
        )

    def record_scores(self, scores: Mapping[str, Iterable[float]]) -> None:
        for target, values in scores.items():
            hist = (self.value if target == VALUE else self.score).labels(target)
            n = 0
            for v in values:
                hist.observe(v)
                n += 1
            self.scores.labels(target).inc(n)

    def record_model(self, target: str, live: TargetModel, quality: Mapping[str, float]) -> None:
        self.version.labels(target).set(live.version)
        self.warming_up.labels(target).set(1 if live.warming_up else 0)
        verdict = live.trust
        self.trusted.labels(target).set(1 if verdict.trusted else 0)
        for check in CHECKS:
            self.trust_failing.labels(target, check).set(1 if check in verdict.failing else 0)
        self.matured_labels.labels(target).set(live.model.positives + live.model.negatives)
        figures = (
            (self.roc_auc, "roc_auc"),
            (self.log_loss, "log_loss"),
            (self.ece, "ece"),
            (self.gini, "gini"),
            (self.value_calibration, "calibration_ratio"),
        )
        for gauge, key in figures:
            if key in quality:
                gauge.labels(target).set(quality[key])
