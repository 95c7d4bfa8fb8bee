"""The decision procedure: from the searches of one rewrite x backend x input source to
one verdict per dtype, each decided by evidence in that dtype.

1. A search in float64 on moderate inputs (Stage.FORMULA) comes first. An output beyond
   the derived bound there is `inequivalent` in float64, or `imprecise` (with its effective
   precision) when every failing output stayed within the bound of a lower precision and
   no scale factor explains it (diagnose.py); an exception, a wrong shape or dtype, or NaN
   on these benign inputs is an `error` in float64.
2. In every other dtype that float64 failure is tried first, as the first example of a
   moderate search in that dtype (a formula error reproduces at once). Reproduced, it is
   `inequivalent` (or `error`, `imprecise`) there too; if not, that search goes on and
   decides the dtype's formula as step 1 did float64's. So an exception in float64 alone,
   or float32 arithmetic, stays in the dtypes where it happens.
3. Where the formula held, each dtype's own search (Stage.DTYPE, moderate and extreme
   inputs, skipping inputs that no correct computation in that dtype can hold) decides:
   an output that overflows, is NaN or leaves the bound makes it `unstable`.
4. Otherwise `bitwise` if every output equalled the same backend's oracle bit for bit
   (float64's failure replayed in step 2 included), else `equivalent`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rewrites.verify.record import Search, Stage
from rewrites.verify.verdicts import CLAIM_DTYPES, Verdict

#: run(dtype, stage, first): a search in `dtype` at `stage`, trying `first`'s failure first
Run = Callable[[str, Stage, Search | None], Search]


@dataclass(frozen=True)
class Decision:
    """The verdict in one dtype and the search that decided it."""

    dtype: str
    verdict: Verdict
    search: Search
    examples: int  # examples evaluated for this dtype's verdict, the float64 stage included
    cut_to: int | None = None  # problems were cut to their first cut_to tokens (any search)
    seconds: float = 0.0  # this dtype's own searches (float64's formula search is float64's)


def verdict_of(s: Search) -> Verdict:
    """The verdict a search supports (steps 1-4 of the module doc)."""
    if s.failure is None:
        return Verdict.BITWISE if s.bitwise else Verdict.EQUIVALENT
    if s.error:
        return Verdict.ERROR
    if s.stage is Stage.DTYPE:
        return Verdict.UNSTABLE
    return Verdict.IMPRECISE if s.effective_precision else Verdict.INEQUIVALENT


def decide(run: Run, dtypes: Sequence[str]) -> list[Decision]:
    """One Decision per dtype (the module doc's rule)."""
    formula = run("float64", Stage.FORMULA, None)
    decisions = []
    for dtype in dtypes:
        searches = [formula]
        if dtype != "float64" and formula.failure is not None:
            searches.append(run(dtype, Stage.FORMULA, formula))
        if searches[-1].failure is None:
            searches.append(run(dtype, Stage.DTYPE, None))
        decided, mine = searches[-1], searches if dtype == "float64" else searches[1:]
        cut = max((s.cut_to for s in searches if s.cut_to), default=None)
        verdict = verdict_of(decided)
        if verdict is Verdict.BITWISE and not all(s.bitwise for s in mine):  # a replayed failure's bits differed
            verdict = Verdict.EQUIVALENT
        examples = sum(s.examples for s in searches)
        decisions.append(Decision(dtype, verdict, decided, examples, cut, sum(s.seconds for s in mine)))
    return decisions


def witness(decisions: Sequence[Decision], claim: Verdict | None) -> str | None:
    """A claim dtype whose verdict is the `unstable` or `imprecise` claim (see verdicts.claim_holds)."""
    if claim not in (Verdict.UNSTABLE, Verdict.IMPRECISE):
        return None
    return next((d.dtype for d in decisions if d.verdict is claim and d.dtype in CLAIM_DTYPES), None)
