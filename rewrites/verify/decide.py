"""The decision procedure: from the searches of one rewrite x backend x input source to
one verdict per dtype.

1. A search in float64 on moderate inputs (Stage.FORMULA) comes first: any output beyond
   the derived bound makes the rewrite `inequivalent` in every dtype; an exception, a
   wrong shape or dtype, or NaN on these benign inputs is an `error`.
2. Otherwise each dtype's own search (Stage.DTYPE, moderate and extreme inputs, skipping
   inputs that no correct computation in that dtype can hold) decides: an output that
   overflows, is NaN or leaves the bound makes it `unstable`.
3. Otherwise `bitwise` if every output equalled the same backend's oracle bit for bit,
   else `equivalent`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rewrites.verify.search import Search, Stage
from rewrites.verify.verdicts import CLAIM_DTYPES, Verdict


@dataclass(frozen=True)
class Decision:
    """The verdict in one dtype and the search that decided it."""

    dtype: str
    verdict: Verdict
    search: Search
    examples: int  # examples evaluated for this dtype's verdict, the float64 stage included
    cut_to: int | None = None  # problems were cut to their first cut_to tokens (either search)


def verdict_of(s: Search) -> Verdict:
    """The verdict a search supports (steps 1-3 of the module doc)."""
    if s.failure is None:
        return Verdict.BITWISE if s.bitwise else Verdict.EQUIVALENT
    if s.error:
        return Verdict.ERROR
    return Verdict.INEQUIVALENT if s.stage is Stage.FORMULA else Verdict.UNSTABLE


def decide(formula: Search, in_dtype: Callable[[str], Search], dtypes: Sequence[str]) -> list[Decision]:
    """A float64 formula failure decides every dtype; else each dtype's own search does."""
    decisions = []
    for dtype in dtypes:
        if formula.failure is not None:
            decisions.append(Decision(dtype, verdict_of(formula), formula, formula.examples, formula.cut_to))
        else:
            s = in_dtype(dtype)
            cut = max((c for c in (formula.cut_to, s.cut_to) if c), default=None)
            decisions.append(Decision(dtype, verdict_of(s), s, s.examples + formula.examples, cut))
    return decisions


def witness(decisions: Sequence[Decision]) -> str | None:
    """A claim dtype in which an instability was found (see verdicts.claim_holds)."""
    return next((d.dtype for d in decisions if d.verdict is Verdict.UNSTABLE and d.dtype in CLAIM_DTYPES), None)
