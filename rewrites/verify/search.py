"""The search for a failing problem: its two stages, the failure test of one example, and
the typed record of what a search saw (Hypothesis's `find` for synthetic problems, a sweep
for the real layers)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
from hypothesis import HealthCheck, Phase, find, settings, target
from hypothesis.errors import NoSuchExample

from oracles.problem import AttentionProblem
from oracles.reference import size
from properties.strategies import LENGTH_LADDER
from rewrites.verify import diagnose
from rewrites.verify.execute import References, RewriteFailed, outcome, output_rows, reach, run_rewrite

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
    first_fails_at: int | None = None  # exact: the failure's first n tokens fail, its first n - 1 pass
    max_ratio: float = 0.0
    max_abs: float = 0.0
    last_ratio: float = 0.0  # of the latest example (what Hypothesis's `target` climbs)
    bitwise: bool = True
    seconds: float = 0.0
    kept: list[tuple] = field(default_factory=list)  # (problem as run, output): the first and latest failures
    cut_to: int | None = None  # the backend ran each problem's first cut_to tokens (Backend.loop_tokens)
    cut_hint: int | None = None  # the first failing length of the failure this search tries first (decide.py)
    bits_too: bool = False  # Stage.FORMULA: also compare with the oracle's bits (then it can stand in for Stage.DTYPE)
    precision: diagnose.Precision | None = None  # Stage.FORMULA: lower precisions the failures stayed within
    scale: float | None = None  # Stage.FORMULA: the failure is attention at this factor times the scale
    findings: list[dict] = field(default_factory=list)  # Stage.FORMULA: what diagnose.findings saw

    def __post_init__(self) -> None:
        if self.stage is Stage.FORMULA:
            self.precision = diagnose.Precision(self.dtype)

    @property
    def effective_precision(self) -> str | None:
        """`imprecise`: a failure of the right formula at this lower precision (diagnose.py)."""
        if self.failure is None or self.error or self.scale is not None or self.findings or self.precision is None:
            return None
        return self.precision.effective

    @np.errstate(all="ignore")  # overflow and NaN are what is being looked for here
    def failing(self, problem: AttentionProblem, refs: References) -> str | None:
        """Why `problem` fails (None if it passes or says nothing), with the tallies updated.
        The caller counts examples (a shrunk failure is re-run for its message, uncounted)."""
        self.last_ratio = 0.0
        run = reach(self.rewrite, self.backend, self.dtype, problem)
        if run is not problem:
            self.cut_to, problem = run.n_seq, run
        if self.stage is Stage.DTYPE and not refs.representable(problem, self.backend, self.dtype):
            return None  # no correct computation in this dtype exists: not evidence
        try:
            bitwise = self.bitwise and (self.stage is Stage.DTYPE or self.bits_too)
            o = outcome(self.rewrite, self.backend, self.dtype, problem, refs, bitwise)
        except RewriteFailed as e:
            self.error = self.error or str(e)
            return self._found(f"error: {e}")
        self.bitwise &= o.bitwise
        self.last_ratio = o.ratio
        self.max_ratio, self.max_abs = max(self.max_ratio, o.ratio), max(self.max_abs, o.abs_error)
        if self.stage is Stage.FORMULA and o.nonfinite:
            self.error = self.error or f"returned NaN or inf on moderate {self.dtype} inputs"
            return self._found(f"error: {self.error}")
        if o.ratio > 1:
            self.kept[1:] = [*self.kept[1:], (problem, o.out)][-KEPT_LATEST:]  # the first and the latest three
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


SHRINK_EXAMPLES_PER_EXAMPLE = 4
KEPT_LATEST = 3  # failures kept for the diagnosis besides the first


class _ShrinkBudgetSpent(Exception):
    """Raised inside Hypothesis's shrinker to stop it: the smallest failure so far is kept."""


def hypothesis_search(
    bands: Sequence[SearchStrategy],
    s: Search,
    refs: References,
    examples: int,
    explicit: Sequence[AttentionProblem] = (),
) -> Search:
    """Try the `explicit` problems, then search each band of strategies in turn with an
    equal share of `examples` (derandomised: every rewrite sees the same problems), steered
    towards the largest error/bound ratio, until one fails; shrink it (at most
    SHRINK_EXAMPLES_PER_EXAMPLE x `examples` more evaluations: shrinking a 2049-token
    problem can take hundreds, and the cut below makes the length exact anyway), then cut
    it to its exact first failing length. `s` is filled in."""
    without_local_constants()
    budget = s.examples + len(explicit) + examples * (1 + SHRINK_EXAMPLES_PER_EXAMPLE)
    smallest: list[AttentionProblem] = []  # the smallest failing problem so far
    start = time.perf_counter()
    opts = settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.target, Phase.shrink],
    )

    def fails(problem: AttentionProblem) -> bool:
        if smallest and s.examples >= budget:
            raise _ShrinkBudgetSpent
        s.examples += 1
        failed = s.failing(problem, refs) is not None
        target(math.log10(s.last_ratio) if 0 < s.last_ratio < math.inf else (300.0 if s.last_ratio else -300.0))
        if failed and (not smallest or size(problem) < size(smallest[0])):
            smallest[:] = [problem]
        return failed

    for problem in explicit:
        s.examples += 1
        if s.failing(problem, refs) is not None:
            s.failure = problem
            break
    for i, strategy in enumerate(bands):
        if s.failure is not None:
            break
        share = examples * (i + 1) // len(bands) - examples * i // len(bands)
        try:
            s.failure = find(strategy, fails, settings=settings(opts, max_examples=max(share, 1)))
        except NoSuchExample:
            pass
        except _ShrinkBudgetSpent:
            s.failure = smallest[0]
    if s.failure is not None:
        _cut_to_first_failing_length(s, refs)
    s.seconds = time.perf_counter() - start
    return s


def sweep(problems: Iterable[tuple[int, AttentionProblem]], s: Search, refs: References) -> Search:
    """Each (layer, problem) in turn (the real layers) until one fails; that one is cut to
    its exact first failing length."""
    start = time.perf_counter()
    for layer, p in problems:
        s.examples += 1
        if s.failing(p, refs) is not None:
            s.failure, s.layer = p, layer
            _cut_to_first_failing_length(s, refs)
            break
    s.seconds = time.perf_counter() - start
    return s


def _cut_to_first_failing_length(s: Search, refs: References) -> None:
    """Cut the failure to a prefix (causal attention makes a prefix a problem of its own)
    of length L that fails while its prefix of L - 1 passes. A fault need not grow with
    length (floor division drops a partial tile at 65 tokens, not at 1024), so the rungs of
    LENGTH_LADDER below the failure's first failing row are tried first, shortest first,
    and the first that fails is bisected down from the rung below it: the cut lands at the
    first threshold the ladder crosses, not at whichever one a bisection of the whole
    length meets. Where no rung fails, the prefix ending at that first failing row is tried
    next (a causal rewrite fails there and passes one token shorter: two runs, not a
    bisection of a 1024-token real layer). Invariant: prefix `lo` passes (0 tokens
    trivially), `hi` fails."""
    fails = lambda n: s.failing(s.failure.prefix(n), refs) is not None
    lo, hi = 0, s.failure.n_seq
    if s.cut_hint == hi > 1 and not fails(hi - 1):
        lo = hi - 1  # another dtype's cut failure, reproduced: its exact length holds here too
    else:
        row = _first_failing_row(s, refs)
        top = hi if row is None else row + 1
        for rung in LENGTH_LADDER:
            if rung >= top:
                break
            if fails(rung):
                hi = rung
                break
            lo = rung
        if top < hi and fails(top):
            hi = top
            if top - 1 > lo:
                lo, hi = (lo, top - 1) if fails(top - 1) else (top - 1, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid
    s.failure, s.first_fails_at = s.failure.prefix(hi), hi
    s.message = s.failing(s.failure, refs) or ""
    if not s.error:
        _diagnose(s)


def _first_failing_row(s: Search, refs: References) -> int | None:
    """The first row of the failure's output beyond the bound, from the output kept when it
    failed (None for a last-row rewrite, or a failure cut by Backend.loop_tokens)."""
    out = next((o for p, o in reversed(s.kept) if p is s.failure), None)
    if out is None or s.rewrite.output != "full":
        return None
    ref = refs.truth(s.failure, s.backend, s.dtype)
    rows = np.flatnonzero(diagnose.rows_beyond(out, ref.out, ref.tolerance).reshape(-1, out.shape[-2]).any(axis=0))
    return int(rows[0]) if rows.size else None


def _diagnose(s: Search) -> None:
    """What the cut failure is (diagnose.py): s.findings, s.scale, s.precision, the message."""
    run, out = s.kept[-1]  # the cut failure as it ran, and its output: no second run
    if s.stage is Stage.DTYPE:
        s.findings = diagnose.instability(s.rewrite, s.backend, s.dtype, run, out)
        s.message += "".join(f"; {f['text']}" for f in s.findings)
        return
    s.findings = diagnose.findings(s.rewrite, s.backend, s.dtype, run, out)
    s.findings += diagnose.length_threshold(s.first_fails_at, run, out, s.backend, s.dtype, output_rows(s.rewrite))
    if not s.findings and s.precision is not None:
        for p, o in s.kept:  # evidence for `imprecise`: the failures kept (diagnose.Precision)
            s.precision.add(o, p, s.backend, output_rows(s.rewrite))
        if s.precision.effective:  # and a problem where a formula error cannot pass for rounding
            dense = reach(s.rewrite, s.backend, s.dtype, diagnose.evidence_problem())
            try:
                dense_out = run_rewrite(s.rewrite, s.backend, s.dtype, dense)
            except RewriteFailed:
                dense_out = np.full(dense.x.shape, np.nan)  # no output: no evidence of a precision
            s.precision.confirm(dense_out, dense, s.backend, output_rows(s.rewrite))
    # A real layer's failure is fitted only when it might otherwise be called imprecise:
    # the synthetic search's small shrunk failures name the factor (and cost milliseconds).
    if s.layer is None or (s.precision is not None and s.precision.effective):
        fit = diagnose.scale_factor(s.kept, s.backend, s.dtype, output_rows(s.rewrite))
        if fit is not None:
            s.scale, on = fit
            c = diagnose.describe_factor(s.scale)
            text = f"it is attention with the logits scaled by {c} (n_head={on.n_head}, head_dim={on.head_dim})"
            s.findings.append({"finding": "scale", "factor": s.scale, "text": text})
    if not s.findings and s.effective_precision:
        s.message += f"; within the {s.effective_precision} bound on every failing example"
    elif not s.findings:
        s.findings = [diagnose.unexplained(run)]
    s.message += "".join(f"; {f['text']}" for f in s.findings)
