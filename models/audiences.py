"""Audiences: named conditions over a user's scores, tiers and features, parsed once at start-up.

A marketer writes ``high_intent: purchase >= 0.6`` or ``at_risk: churn >= 0.5 and
purchases_90d >= 2`` or ``top_buyers: purchase top 10%``; the worker evaluates every definition
whenever it rescores a user (each event, each silence point), so membership changes when a user
goes quiet as well as when they act. The grammar is small and parsed by hand, never ``eval``::

    definitions := definition ((';' | newline) definition)*
    definition  := NAME ':' or
    or          := and ('or' and)*
    and         := not ('and' not)*
    not         := 'not' not | atom
    atom        := '(' or ')'
                 | TARGET ('top' | 'bottom') NUMBER '%'      percentile of the live score distribution
                 | TARGET CMP NUMBER                          the target's score in [0, 1]
                 | TARGET '.tier' CMP TIER                    low < medium < high
                 | FEATURE CMP (NUMBER | 'true' | 'false')    any served feature
                 | FEATURE                                    true when neither null nor zero
    CMP         := '>=' | '>' | '<=' | '<' | '==' | '!='

Semantics a user can rely on:
- a comparison with a null feature (``s_since_last_purchase`` of a user who never bought) is false;
- a definition that reads a target whose model is still warming up has no members: an untrusted
  score must not put anyone in front of a campaign;
- a percentile compares the user's score with a cut taken from the score distribution of the
  user's partition (``models/audience_stats.py``), in bins of 0.001.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from features.user import FeatureValue
from models.ledger import VALUE

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
TIER_NAMES = ("low", "medium", "high")  # models.changes.TIERS, in order
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_]+)?)"
    r"|(?P<op>>=|<=|==|!=|>|<)|(?P<punct>[()%]))"
)
KEYWORDS = frozenset({"and", "or", "not", "top", "bottom", "true", "false"})


class AudienceError(ValueError):
    """A definition that cannot be used; the message names the audience, the column and the cause."""


class Cut(NamedTuple):
    """A percentile condition: the top (or bottom) ``pct`` % of ``target``'s scores."""

    target: str
    top: bool
    pct: float


STAY = 1.25  # a member of "top 10%" stays while within the top 12.5%: no flapping at the cut


class View(NamedTuple):
    """What a definition is evaluated on: one user's scores, tiers and features, the cuts, and the
    audiences the user was in.

    ``cuts`` maps each percentile condition to two score bins: the one a user must reach to enter
    (top: at or above, bottom: at or below) and the looser one a member must keep to stay (the
    share times :data:`STAY`); a cut that is missing (no distribution yet) admits nobody.
    """

    scores: Mapping[str, float]
    tiers: Mapping[str, int]
    features: Mapping[str, FeatureValue]
    cuts: Mapping[Cut, tuple[int, int]]
    was: Collection[str] = ()


Test = Callable[[View], bool]


@dataclass(frozen=True)
class Audience:
    name: str
    condition: str  # as written
    targets: frozenset[str]  # targets whose scores or tiers it reads: untrusted -> no members
    tiers: frozenset[str]  # targets whose tier it reads
    cuts: tuple[Cut, ...]
    primary: str | None  # the first target it reads: its calibrated scores estimate converters
    test: Test


BINS = 1000


def score_bin(score: float) -> int:
    """The histogram bin of a score in [0, 1] (bins of 0.001; 1.0 falls in the last).

    >>> score_bin(0.0), score_bin(0.6), score_bin(1.0)
    (0, 600, 999)
    """
    return min(BINS - 1, max(0, int(score * BINS)))


VALUE_BINS_PER_LOG = 50  # value bins are 1/50 of log1p(amount) wide: about 2% of the amount


def value_bin(amount: float) -> int:
    """The histogram bin of an amount (the value target's score): log-scale, so one set of bins
    serves any currency and shop, from cents to 10^8 (a larger amount falls in the last bin).

    >>> value_bin(0.0), value_bin(100.0) < value_bin(103.0), value_bin(1e12)
    (0, True, 999)
    """
    return min(BINS - 1, max(0, int(math.log1p(max(amount, 0.0)) * VALUE_BINS_PER_LOG)))


def bin_of(target: str) -> Callable[[float], int]:
    """How ``target``'s scores are binned for percentile cuts: amounts on a log scale."""
    return value_bin if target == VALUE else score_bin


# the operator module's C functions: a definition is evaluated at every rescore, on the hot path
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def _both(a: Test, b: Test) -> Test:
    return lambda v: a(v) and b(v)


def _either(a: Test, b: Test) -> Test:
    return lambda v: a(v) or b(v)


class _Token(NamedTuple):
    kind: str  # num, word, op, punct, end
    text: str
    col: int  # 1-based column in the condition


def _found(tok: _Token) -> str:
    return repr(tok.text) if tok.text else "the end"


class _Parser:
    """Recursive descent over one condition; builds closures, collects targets and cuts."""

    def __init__(self, name: str, text: str, targets: Sequence[str], features: Collection[str]) -> None:
        self.name = name
        self.text = text
        self.target_names = tuple(targets)
        self.feature_names = features
        self.tokens = self._tokenize(text)
        self.i = 0
        self.used: list[str] = []
        self.tiers: set[str] = set()
        self.cuts: list[Cut] = []

    def fail(self, col: int, message: str) -> AudienceError:
        return AudienceError(f"audience {self.name!r}, column {col}: {message} (in {self.text!r})")

    def _tokenize(self, text: str) -> list[_Token]:
        out: list[_Token] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.lastgroup is None:
                col = pos + len(text[pos:]) - len(text[pos:].lstrip()) + 1
                raise self.fail(col, f"unexpected character {text[col - 1]!r}")
            kind = m.lastgroup
            out.append(_Token(kind, m.group(kind), m.start(kind) + 1))
            pos = m.end()
        out.append(_Token("end", "", len(text) + 1))
        return out

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def parse(self) -> Test:
        if self.peek().kind == "end":
            raise self.fail(1, "the condition is empty")
        test = self.parse_or()
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(tok.col, f"expected 'and', 'or' or the end, found {tok.text!r}")
        return test

    def parse_or(self) -> Test:
        parts = [self.parse_and()]
        while self.peek().text == "or":
            self.take()
            parts.append(self.parse_and())
        return functools.reduce(_either, parts)

    def parse_and(self) -> Test:
        parts = [self.parse_not()]
        while self.peek().text == "and":
            self.take()
            parts.append(self.parse_not())
        return functools.reduce(_both, parts)

    def parse_not(self) -> Test:
        if self.peek().text == "not":
            self.take()
            inner = self.parse_not()
            return lambda v: not inner(v)
        return self.parse_atom()

    def parse_atom(self) -> Test:
        tok = self.take()
        if tok.text == "(":
            inner = self.parse_or()
            close = self.take()
            if close.text != ")":
                raise self.fail(close.col, f"expected ')', found {_found(close)}")
            return inner
        if tok.kind != "word" or tok.text in KEYWORDS:
            raise self.fail(tok.col, f"expected a target, a feature or '(', found {_found(tok)}")
        field, _, attr = tok.text.partition(".")
        if field in self.target_names:
            self.used.append(field)
            if attr == "tier":
                self.tiers.add(field)
                return self._tier(field)
            if attr:
                raise self.fail(tok.col, f"{field!r} has no field {attr!r} (only {field}.tier)")
            if self.peek().text in ("top", "bottom"):
                return self._percentile(field)
            return self._score(field, tok)
        if attr:
            raise self.fail(tok.col, f"unknown field {tok.text!r}: only a target has .tier")
        if field in self.feature_names:
            return self._feature(field)
        raise self.fail(tok.col, f"unknown field {field!r}{self._hint(field)}")

    def _hint(self, field: str) -> str:
        near = difflib.get_close_matches(field, [*self.target_names, *self.feature_names], n=1)
        suggestion = f" (did you mean {near[0]!r}?)" if near else ""
        return (
            f"{suggestion}; fields are the targets ({', '.join(self.target_names)}), their .tier, "
            "and the served features (propstream features --catalogue)"
        )

    def _operator(self) -> tuple[str, _Token]:
        op = self.take()
        if op.kind != "op":
            raise self.fail(op.col, f"expected a comparison (>=, >, <=, <, ==, !=), found {_found(op)}")
        return op.text, self.take()

    def _score(self, target: str, at: _Token) -> Test:
        op, value = self._operator()
        if value.kind != "num":
            raise self.fail(value.col, f"a score compares with a number in [0, 1], found {value.text!r}")
        bound = float(value.text)
        if bound > 1 and target != VALUE:  # the value target's score is an amount
            raise self.fail(value.col, f"a score is in [0, 1], so {value.text} can never be reached")
        cmp = _OPS[op]
        return lambda v: cmp(v.scores[target], bound)

    def _tier(self, target: str) -> Test:
        op, value = self._operator()
        if value.text not in TIER_NAMES:
            raise self.fail(value.col, f"a tier compares with low, medium or high, found {value.text!r}")
        rank = TIER_NAMES.index(value.text)
        cmp = _OPS[op]
        return lambda v: cmp(v.tiers[target], rank)

    def _percentile(self, target: str) -> Test:
        side = self.take()
        num = self.take()
        pct_sign = self.take()
        if num.kind != "num" or pct_sign.text != "%":
            raise self.fail(num.col, f"a percentile is written '{target} {side.text} 10%'")
        pct = float(num.text)
        if not 0 < pct < 100:
            raise self.fail(num.col, f"a percentile is above 0 and below 100, found {num.text}")
        cut = Cut(target, side.text == "top", pct)
        self.cuts.append(cut)
        name = self.name
        to_bin = bin_of(target)

        def test(v: View) -> bool:
            c = v.cuts.get(cut)
            if c is None:
                return False
            at = c[1] if name in v.was else c[0]
            b = to_bin(v.scores[target])
            return b >= at if cut.top else b <= at

        return test

    def _feature(self, name: str) -> Test:
        if self.peek().kind != "op":
            return lambda v: bool(v.features.get(name))
        op, value = self._operator()
        if value.kind == "num":
            bound = float(value.text)
        elif value.text in ("true", "false"):
            bound = float(value.text == "true")
        else:
            raise self.fail(
                value.col, f"a feature compares with a number, true or false, found {value.text!r}"
            )
        cmp = _OPS[op]

        def test(v: View) -> bool:
            x = v.features.get(name)
            return x is not None and cmp(float(x), bound)

        return test


def parse_audiences(text: str, targets: Sequence[str], features: Collection[str]) -> tuple[Audience, ...]:
    """Every definition in ``text`` (``;`` or newline separated); :class:`AudienceError` names
    the first problem.

    >>> text = "hot: purchase >= 0.6; busy: n_events_24h > 5"
    >>> [a.name for a in parse_audiences(text, ["purchase"], ["n_events_24h"])]
    ['hot', 'busy']
    """
    out: list[Audience] = []
    seen: set[str] = set()
    for n, part in enumerate(re.split(r"[;\n]", text), 1):
        if not part.strip():
            continue
        name, colon, condition = part.partition(":")
        name = name.strip()
        if not colon:
            msg = f"definition {n} ({part.strip()!r}) is not NAME: CONDITION"
            raise AudienceError(msg)
        if not NAME_RE.match(name):
            msg = f"audience name {name!r} must be lower case letters, digits and _, starting with a letter"
            raise AudienceError(msg)
        if name in seen:
            msg = f"audience {name!r} is defined twice"
            raise AudienceError(msg)
        seen.add(name)
        p = _Parser(name, condition.strip(), targets, features)
        test = p.parse()
        out.append(
            Audience(
                name,
                condition.strip(),
                frozenset(p.used),
                frozenset(p.tiers),
                tuple(dict.fromkeys(p.cuts)),
                p.used[0] if p.used else None,
                test,
            )
        )
    return tuple(out)


def members(audiences: Sequence[Audience], view: View, untrusted: Collection[str] = ()) -> list[str]:
    """The names of the audiences ``view`` belongs to, in definition order.

    A definition reading a target in ``untrusted`` (its model is not trusted yet) has no members.
    """
    if untrusted:
        return [a.name for a in audiences if a.targets.isdisjoint(untrusted) and a.test(view)]
    return [a.name for a in audiences if a.test(view)]
