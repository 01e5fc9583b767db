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
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from models.audiences import BINS, STAY, Audience, Cut, bin_of, score_bin


class ScoreHistogram:
    """Users per score bin of 0.001: a plain array, as a user's move is one add (a numpy scalar
    add costs several times more); the cuts are taken from numpy running sums over a view of it."""

    __slots__ = ("bin", "counts", "n")

    def __init__(self, to_bin: Callable[[float], int] = score_bin) -> None:
        self.bin = to_bin  # scores in [0, 1] by 0.001, or amounts on a log scale
        self.counts = array("q", bytes(8 * BINS))
        self.n = 0

    def add(self, score: float, sign: int = 1) -> None:
        self.counts[self.bin(score)] += sign
        self.n += sign

    def cuts(self, top: bool, pcts: Sequence[float]) -> list[int] | None:
        """Per share in ``pcts``, the bin a member must reach so that about that % of the users
        are members (None: no users), from one running sum.

        Top: the highest bin whose users and those above are at least the share of all; so the
        audience holds at least the share (more when many users share the cut's bin).

        >>> h = ScoreHistogram()
        >>> for s in range(100):
        ...     h.add(s / 100)
        >>> h.cuts(True, [10, 12.5]), h.cuts(False, [10])
        ([900, 870], [90])
        """
        if self.n <= 0:
            return None
        counts = np.frombuffer(self.counts, dtype=np.int64)  # no copy
        running = np.cumsum(counts[::-1] if top else counts)
        # whole users; the 1e-9 keeps float error (50 * 0.14 = 7.000000000000001) from asking one more
        wanted = np.ceil(np.array(pcts, dtype=np.float64) * self.n / 100.0 - 1e-9)
        # the first position whose running sum reaches the share: at least that many users
        at = np.minimum(np.searchsorted(running, wanted, side="left"), BINS - 1)
        return [int(BINS - 1 - i) if top else int(i) for i in at]


RECUT = 0.01  # the cuts are taken again after this share of the partition's scores moved


class PartitionStats:
    """One partition's audience sizes, expected converters per audience and score histograms."""

    __slots__ = ("_cuts", "audiences", "expected", "histograms", "moved", "primary", "size")

    def __init__(self, audiences: Sequence[Audience], targets: Iterable[str]) -> None:
        self.audiences = audiences
        self.primary = {a.name: a.primary for a in audiences}
        self.size = {a.name: 0 for a in audiences}
        self.expected = {a.name: 0.0 for a in audiences}
        # only the targets a percentile reads: the others' distributions serve nothing yet
        used = {c.target for a in audiences for c in a.cuts}
        self.histograms = {t: ScoreHistogram(bin_of(t)) for t in targets if t in used}
        self._cuts: dict[Cut, tuple[int, int]] | None = None
        self.moved = 0  # scores added or removed since the cuts were taken

    def add(self, scores: Mapping[str, float], names: Iterable[str], sign: int = 1) -> None:
        """Count one user's state in (``sign`` 1) or out (-1); a score below 0 is "never scored"."""
        for t, s in scores.items():
            h = self.histograms.get(t)
            if h is not None and s >= 0:
                h.add(s, sign)
                self.moved += 1
        for name in names:
            if name in self.size:  # a name of a removed definition counts nowhere
                self.size[name] += sign
                p = self.primary[name]
                if p is not None and scores.get(p, -1.0) >= 0:
                    self.expected[name] += sign * scores[p]

    def cuts(self) -> dict[Cut, tuple[int, int]]:
        """The bins each percentile condition of the definitions needs: to enter, and the looser
        one to stay (the share times :data:`~models.audiences.STAY`).

        Taken again once :data:`RECUT` of the partition's scores moved since the last time (live
        batches are many and small: a cut per batch cost more than the batch's audiences), so a
        cut is at most that far behind the distribution, well inside the stay margin."""
        n = max((h.n for h in self.histograms.values()), default=0)
        if self._cuts is not None and self.moved < max(1, RECUT * n):
            return self._cuts
        self.moved = 0
        out: dict[Cut, tuple[int, int]] = {}
        for a in self.audiences:
            for c in a.cuts:
                got = self.histograms[c.target].cuts(c.top, [c.pct, min(99.9, c.pct * STAY)])
                if got is not None:
                    out[c] = (got[0], got[1])
        self._cuts = out
        return out
