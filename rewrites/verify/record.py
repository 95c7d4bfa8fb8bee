"""The typed record of one search (`Search`, at one of two `Stage`s) and the failure test
of one example that fills it in."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from oracles.problem import AttentionProblem
from rewrites.verify.execute import RewriteFailed, reach
from rewrites.verify.judge import References, outcome
from rewrites.verify.precision import Precision

if TYPE_CHECKING:
    from rewrites.registry import Rewrite

KEPT_LATEST = 3  # failures kept for the diagnosis besides the first


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
    cut_to: int | None = None  # the backend ran each problem's first cut_to tokens (Backend.tokens)
    cut_hint: int | None = None  # a first failing length found before (other dtype, synthetic search): tried first
    bits_too: bool = False  # Stage.FORMULA: also compare with the oracle's bits (then it can stand in for Stage.DTYPE)
    precision: Precision | None = None  # Stage.FORMULA: lower precisions the failures stayed within
    scale: float | None = None  # Stage.FORMULA: the failure is attention at this factor times the scale
    findings: list[dict] = field(default_factory=list)  # Stage.FORMULA: what diagnose.findings saw

    def __post_init__(self) -> None:
        if self.stage is Stage.FORMULA:
            self.precision = Precision(self.dtype)

    @property
    def effective_precision(self) -> str | None:
        """`imprecise`: a failure of the right formula at this lower precision (precision.py)."""
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
        if self.stage is Stage.FORMULA and o.nonfinite and not _in_padding_rows_only(problem, o.out):
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


def _in_padding_rows_only(problem: AttentionProblem, out: np.ndarray) -> bool:
    """Whether every NaN or inf of `out` is on a padding row: there the output is defined
    (c_proj's bias) and a NaN is a wrong answer, judged as any other (not an `error`)."""
    if problem.segments is None or out.shape != problem.x.shape:
        return False
    return not (~np.isfinite(out).all(axis=-1) & (problem.segments >= 0)).any()
