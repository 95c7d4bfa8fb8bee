"""The search for a failing problem: its two stages, the failure test of one example, and
the typed record of what a search saw (Hypothesis's `find` for synthetic problems, a sweep
for the real layers)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample

from oracles.problem import AttentionProblem
from rewrites.verify.execute import References, RewriteFailed, outcome

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from rewrites.registry import Rewrite


class Stage(Enum):
    """What a failure means depends on the inputs it was found on."""

    FORMULA = "formula"  # moderate float64 inputs: any excess is a wrong formula (or an error)
    DTYPE = "dtype"  # the dtype under test, extreme inputs too: an excess is an instability


@dataclass
class Search:
    """What one search saw: the first failure (shrunk, for Hypothesis) and the tallies."""

    rewrite: Rewrite
    backend: str
    dtype: str
    stage: Stage
    failure: AttentionProblem | None = None
    message: str = ""
    error: str | None = None  # the rewrite raised or returned something invalid
    examples: int = 0  # examples evaluated in all
    to_find: int | None = None  # examples it took to find the first failure
    layer: int | None = None  # the real layer that failed (real-layer sweeps)
    max_ratio: float = 0.0
    max_abs: float = 0.0
    bitwise: bool = True

    @np.errstate(all="ignore")  # overflow and NaN are what is being looked for here
    def failing(self, problem: AttentionProblem, refs: References) -> str | None:
        """Why `problem` fails (None if it passes or says nothing), with the tallies updated.
        The caller counts examples (a shrunk failure is re-run for its message, uncounted)."""
        if self.stage is Stage.DTYPE and not refs.representable(problem, self.backend, self.dtype):
            return None  # no correct computation in this dtype exists: not evidence
        try:
            bitwise = self.bitwise and self.stage is Stage.DTYPE
            o = outcome(self.rewrite, self.backend, self.dtype, problem, refs, bitwise)
        except RewriteFailed as e:
            self.error = self.error or str(e)
            return self._found(f"error: {e}")
        self.bitwise &= o.bitwise
        self.max_ratio, self.max_abs = max(self.max_ratio, o.ratio), max(self.max_abs, o.abs_error)
        if self.stage is Stage.FORMULA and o.nonfinite:
            self.error = self.error or "returned NaN or inf on moderate float64 inputs"
            return self._found(f"error: {self.error}")
        if o.ratio > 1:
            what = "non-finite output" if o.nonfinite else f"error {o.abs_error:.3g} is {o.ratio:.3g}x the bound"
            return self._found(f"{what} in {self.dtype}")
        return None

    def _found(self, message: str) -> str:
        if self.to_find is None:
            self.to_find = self.examples
        return message


@functools.cache  # once per process: the patched hook stays patched
def without_local_constants() -> None:
    """Make derandomised searches depend on the seed alone. Hypothesis (6.131 on) also draws
    constants found in the *local* modules present in sys.modules, so the examples of a
    search changed with what else the process had imported: under pytest-xdist a worker
    found picoGPT's -1e10 mask leaking in float64 that a lone run never drew, and missed the
    -1e4 leak. This turns that off (a private hook, left alone if Hypothesis renames it)."""
    from hypothesis.internal.conjecture import providers

    if hasattr(providers, "_get_local_constants") and hasattr(providers, "Constants"):
        empty = providers.Constants()
        providers._get_local_constants = lambda: empty
        providers.CONSTANTS_CACHE.cache.clear()


def hypothesis_search(strategy: SearchStrategy, s: Search, refs: References, examples: int) -> Search:
    """Draw up to `examples` problems (derandomised: every rewrite sees the same ones) until
    one fails; shrink it. The record `s` is filled in and returned."""
    without_local_constants()
    opts = settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )

    def fails(problem: AttentionProblem) -> bool:
        s.examples += 1
        return s.failing(problem, refs) is not None

    try:
        s.failure = find(strategy, fails, settings=opts)
        s.message = s.failing(s.failure, refs) or ""
    except NoSuchExample:
        pass
    return s


def sweep(problems: Iterable[AttentionProblem], s: Search, refs: References) -> Search:
    """Every problem in turn (the real layers); the first failure is kept, unshrunk."""
    for i, p in enumerate(problems):
        s.examples += 1
        msg = s.failing(p, refs)
        if msg is not None and s.failure is None:
            s.failure, s.message, s.layer = p, msg, i
    return s
