"""Per-partition audience figures: sizes, expected converters and the live score distribution.

Kept incrementally from each user's score state as a batch leaves it (old -> new), so asking
for a size or a percentile cut never scans the users. Each partition keeps its own: the cut of
``purchase top 10%`` is taken from the scores of the user's partition, which depends neither on
how many workers share the partitions nor on which of them owns it. Users are spread over the
partitions by a hash of their id, so each partition's distribution stands for the whole one;
with fewer than a few hundred users in a partition the cut is coarse.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping, Sequence

from models.audiences import BINS, Audience, Cut, score_bin


class ScoreHistogram:
    """Users per score bin of 0.001, and the sum of their scores (expected converters above a cut)."""

    __slots__ = ("counts", "n", "sums")

    def __init__(self) -> None:
        self.counts = array("q", bytes(8 * BINS))
        self.sums = array("d", bytes(8 * BINS))
        self.n = 0

    def add(self, score: float, sign: int = 1) -> None:
        b = score_bin(score)
        self.counts[b] += sign
        self.sums[b] += sign * score
        self.n += sign

    def cut(self, top: bool, pct: float) -> int | None:
        """The bin a member must reach so that about ``pct`` % of the users are members (None: no users).

        Top: the highest bin whose users and those above are at least ``pct`` % of all; so the
        audience holds at least ``pct`` % (more when many users share the cut's bin).

        >>> h = ScoreHistogram()
        >>> for s in range(100):
        ...     h.add(s / 100)
        >>> h.cut(True, 10), h.cut(False, 10)
        (900, 90)
        """
        if self.n <= 0:
            return None
        want = self.n * pct / 100.0
        seen = 0
        bins = range(BINS - 1, -1, -1) if top else range(BINS)
        for b in bins:
            seen += self.counts[b]
            if seen >= want:
                return b
        return 0 if top else BINS - 1

    def above(self, threshold: float) -> tuple[int, float]:
        """Users with a score in a bin at or above ``threshold``'s, and the sum of their scores."""
        first = score_bin(threshold)
        return sum(self.counts[first:]), sum(self.sums[first:])


class PartitionStats:
    """One partition's audience sizes, expected converters per audience and score histograms."""

    __slots__ = ("audiences", "expected", "histograms", "primary", "size")

    def __init__(self, audiences: Sequence[Audience], targets: Iterable[str]) -> None:
        self.audiences = audiences
        self.primary = {a.name: a.primary for a in audiences}
        self.size = {a.name: 0 for a in audiences}
        self.expected = {a.name: 0.0 for a in audiences}
        self.histograms = {t: ScoreHistogram() for t in targets}

    def add(self, scores: Mapping[str, float], names: Iterable[str], sign: int = 1) -> None:
        """Count one user's state in (``sign`` 1) or out (-1); a score below 0 is "never scored"."""
        for t, s in scores.items():
            h = self.histograms.get(t)
            if h is not None and s >= 0:
                h.add(s, sign)
        for name in names:
            if name in self.size:  # a name of a removed definition counts nowhere
                self.size[name] += sign
                p = self.primary[name]
                if p is not None and scores.get(p, -1.0) >= 0:
                    self.expected[name] += sign * scores[p]

    def cuts(self) -> dict[Cut, int]:
        """The bin each percentile condition of the definitions needs, as of now."""
        out: dict[Cut, int] = {}
        for a in self.audiences:
            for c in a.cuts:
                b = self.histograms[c.target].cut(c.top, c.pct)
                if b is not None:
                    out[c] = b
        return out
