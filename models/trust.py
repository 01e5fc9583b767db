"""The trust gate: a model is trusted only while the scores it served rank and are calibrated well enough.

Counts alone (``min_positives``, ``min_negatives``) let a model that ranks no better than chance
announce changes. The gate judges a version's rolling quality on matured labels (the window the
trainer publishes in every snapshot, :func:`models.quality.report`): the one-sided 95% lower bound
of its ROC-AUC, by the Hanley-McNeil standard error, must reach ``min_auc_lower``, and its expected
calibration error must stay within ``max_ece``. The window holds the score each snapshot was given
when it was taken, by whichever version was live then: the gate judges the scores that were served.

Pure and shared: the trainer (when to publish), every worker (``streams/model_feed.py``) and
``propstream eval`` give the same verdict on the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from models.quality import ece, roc_auc

Z_95_ONE_SIDED = 1.645


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of a ROC-AUC measured on ``positives`` and ``negatives``.

    >>> round(auc_standard_error(0.8, 50, 50), 6)
    0.044502
    """
    if positives <= 0 or negatives <= 0 or math.isnan(auc):
        return math.nan
    q1 = auc / (2 - auc)  # two random positives both outrank a random negative
    q2 = 2 * auc * auc / (1 + auc)  # a random positive outranks two random negatives
    a2 = auc * auc
    var = auc * (1 - auc) + (positives - 1) * (q1 - a2) + (negatives - 1) * (q2 - a2)
    return math.sqrt(max(var / (positives * negatives), 0.0))


def auc_lower_bound(auc: float, positives: int, negatives: int, z: float = Z_95_ONE_SIDED) -> float:
    """One-sided lower confidence bound of the ROC-AUC (95% by default): ``auc - z * SE``.

    >>> round(auc_lower_bound(0.65, 50, 50), 3), round(auc_lower_bound(0.65, 1000, 1000), 3)
    (0.56, 0.63)
    """
    return auc - z * auc_standard_error(auc, positives, negatives)


@dataclass(frozen=True)
class Verdict:
    """Trusted when no check fails; ``reason`` says why, in words an operator can act on."""

    failing: tuple[str, ...] = ()  # checks that refuse trust: "labels", "roc_auc", "ece"
    reason: str = ""

    @property
    def trusted(self) -> bool:
        return not self.failing

    def as_dict(self) -> dict[str, bool | str]:
        """What lookups and ``/models`` show: ``{"trusted": false, "reason": "..."}``."""
        return {"trusted": self.trusted, "reason": self.reason}


NO_GATE = Verdict((), "no quality gate")  # a model given no gate is judged by its counts only
CHECKS = ("labels", "roc_auc", "ece", "gini", "calibration")


@dataclass(frozen=True)
class TrustGate:
    """The quality a version's matured labels must show; a bound at its end (0, 1) is not checked."""

    min_auc_lower: float = 0.6  # one-sided 95% lower bound of the rolling ROC-AUC; 0: not checked
    max_ece: float = 0.1  # rolling expected calibration error (10 bins); 1: not checked
    min_gini: float = 0.2  # value targets: the rolling normalised Gini; 0: not checked
    max_value_bias: float = 0.5  # value targets: predicted / actual revenue within 1 +- this; 0: not checked

    def judge(self, quality: Mapping[str, float], *, value: bool = False) -> Verdict:
        """The verdict on a quality report (``models.quality.report``; missing figures fail); of a
        value target's (``value``: ``models.value_quality.report``), on its own two figures.

        >>> TrustGate().judge({"matured": 100, "positives": 50, "roc_auc": 0.65, "ece": 0.03}).reason
        'roc_auc lower bound 0.560 < 0.6 (roc_auc 0.650 on 50 positives, 50 negatives)'
        """
        if value:
            return self._judge_value(quality)
        checks: list[tuple[str, bool, str]] = []  # (check, passed, words)
        if self.min_auc_lower > 0:
            auc = float(quality.get("roc_auc", math.nan))
            pos = int(quality.get("positives", 0))
            neg = int(quality.get("matured", 0)) - pos
            lower = auc_lower_bound(auc, pos, neg)
            if math.isnan(lower):
                words = f"no roc_auc yet ({pos} positives, {neg} negatives matured)"
                checks.append(("roc_auc", False, words))
            elif lower >= self.min_auc_lower:
                checks.append(("roc_auc", True, f"roc_auc lower bound {lower:.3f} >= {self.min_auc_lower:g}"))
            else:
                words = (
                    f"roc_auc lower bound {lower:.3f} < {self.min_auc_lower:g} "
                    f"(roc_auc {auc:.3f} on {pos} positives, {neg} negatives)"
                )
                checks.append(("roc_auc", False, words))
        if self.max_ece < 1:
            ece = float(quality.get("ece", math.nan))
            if math.isnan(ece):
                checks.append(("ece", False, "no ece yet (no matured label)"))
            elif ece <= self.max_ece:
                checks.append(("ece", True, f"ece {ece:.3f} <= {self.max_ece:g}"))
            else:
                checks.append(("ece", False, f"ece {ece:.3f} > {self.max_ece:g}"))
        return _verdict(checks)

    def _judge_value(self, quality: Mapping[str, float]) -> Verdict:
        """A value model's report (``models.value_quality.report``): it must rank revenue (the
        normalised Gini) and predict about as much revenue as came (the calibration ratio).

        >>> TrustGate().judge({"matured": 500, "gini": 0.45, "calibration_ratio": 1.8}, value=True).reason
        'predicted / actual revenue 1.800 outside [0.667, 1.5]'
        """
        checks: list[tuple[str, bool, str]] = []
        if self.min_gini > 0:
            gini = float(quality.get("gini", math.nan))
            if math.isnan(gini):
                checks.append(("gini", False, "no gini yet (no revenue matured)"))
            else:
                words = f"gini {gini:.3f} {'>=' if gini >= self.min_gini else '<'} {self.min_gini:g}"
                checks.append(("gini", gini >= self.min_gini, words))
        if self.max_value_bias > 0:
            ratio = float(quality.get("calibration_ratio", math.nan))
            lo, hi = 1 / (1 + self.max_value_bias), 1 + self.max_value_bias
            if math.isnan(ratio):
                checks.append(("calibration", False, "no calibration ratio yet (no revenue matured)"))
            else:
                inside = lo <= ratio <= hi
                where = "within" if inside else "outside"
                words = f"predicted / actual revenue {ratio:.3f} {where} [{lo:.3f}, {hi:g}]"
                checks.append(("calibration", inside, words))
        return _verdict(checks)


def _verdict(checks: list[tuple[str, bool, str]]) -> Verdict:
    """Trusted when every check passed; the words of the failing ones, else of all."""
    if not checks:
        return Verdict((), "quality gate off")
    failing = tuple(c for c, passed, _ in checks if not passed)
    if failing:
        return Verdict(failing, "; ".join(w for _, passed, w in checks if not passed))
    return Verdict((), ", ".join(w for _, _, w in checks))


def labels(positives: int, negatives: int, min_positives: int, min_negatives: int) -> Verdict:
    """The counts check: enough matured labels of each class learnt.

    >>> labels(120, 30, 200, 200).reason
    'learnt 120 of 200 positives, 30 of 200 negatives'
    """
    counts = ((positives, min_positives, "positives"), (negatives, min_negatives, "negatives"))
    short = [f"{n} of {need} {what}" for n, need, what in counts if n < need]
    return Verdict(("labels",), "learnt " + ", ".join(short)) if short else Verdict()


def combine(*verdicts: Verdict) -> Verdict:
    """Trusted when every verdict is; the reasons of the failing ones, else of all that say something."""
    failing = tuple(c for v in verdicts for c in v.failing)
    said = [v.reason for v in verdicts if v.reason and (v.failing or not failing)]
    return Verdict(failing, "; ".join(said))


def figures(window: Iterable[tuple[float, int]]) -> dict[str, float]:
    """What :meth:`TrustGate.judge` reads, from (served score, label) pairs: a cheap part of the report.

    >>> figures([(0.2, 0), (0.7, 1), (0.6, 0), (0.9, 1)])["roc_auc"]
    1.0
    """
    pairs = list(window)
    scores = [s for s, _ in pairs]
    ys = [y for _, y in pairs]
    return {"matured": len(ys), "positives": sum(ys), "roc_auc": roc_auc(scores, ys), "ece": ece(scores, ys)}
