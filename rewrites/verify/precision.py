"""What a formula failure is: attention at another scale, or the right formula computed at
a lower precision than its dtype.

Both are read off the outputs a search already has, against the float64 truth of the
inputs as the backend rounded them (`oracles.reference.truth_for`):

- `scale_factor`: the factor c for which the output is, within its own dtype's bound,
  attention with logits q.k / sqrt(head_dim) * c (c != 1). A scale error is a wrong
  formula, whatever its size: x1.01 and x(1 + 2^-10) included.
- `Precision`: the evidence for `imprecise`. A failing output that stays within the bound
  derived for a lower precision p (float32 or float16) is what p arithmetic gives; p is
  the effective precision if that holds on every failing output kept (the search's first
  failure and its latest three: shrinks and prefixes of the bisection) whose p-bound is
  informative: finite (once logits leave p's range it is infinite) and below 1/16 of the
  output's magnitude (a wider bound would excuse any formula: such outputs are no
  evidence either way), and also on `evidence_problem()`, where p's bound must be
  informative: shrinking drives failures towards tiny values, where a formula error looks
  like rounding (linear attention on two near-zero tokens stayed within bfloat16's bound);
  and within it on a dense problem of the failure's own batch and heads, over at least 32
  tokens, where a fault of those heads alone shows.
  bfloat16 is no candidate: its worst-case bound is over a third of the output even on
  that 8-token problem (0.35; float16's 0.046), so no output can show that a computation
  is bfloat16 arithmetic rather than a wrong formula. Outputs of more than 200,000
  elements (x plus the scores) are not checked: their bounds take seconds, and shrinking
  gives short failures of any rewrite that fails at every length. A failure with a
  finding (a future leak, mixed batch items) is never imprecise. Passing outputs need no
  check: the bound of p is wider than their dtype's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import oracles
from oracles.problem import AttentionProblem
from oracles.reference import excess, size, truth_for

#: Lower precisions to try for each dtype, lowest first (a failure there rules out the
#: rest); bfloat16's bound is never informative on the evidence problem (module doc).
LOWER = {"float64": ("float16", "float32"), "float32": ("float16",)}
#: A p-bound is evidence only where it is below this fraction of the output's magnitude: a
#: bound as wide as the output itself (large logits in bfloat16) would excuse any formula.
INFORMATIVE = 1 / 16
#: log2 of the scale factors tried on a coarse grid before refining: 1/64 .. 64.
_GRID = np.arange(-6.0, 6.0 + 1e-9, 1 / 8)
_REFINE_STEPS = 75  # golden-section steps: the grid's 1/8 down to below float64's resolution
_MAX_SIZE = 200_000  # failures larger than this (elements of x and the scores) are not fitted


def scaled(problem: AttentionProblem, c: float) -> AttentionProblem:
    """The problem whose logits are c times the original's (q's weight and bias times c)."""
    e = problem.n_embd
    w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
    w[..., :e] *= c
    b[..., :e] *= c
    return dataclasses.replace(problem, c_attn_w=w, c_attn_b=b)


def scale_factor(
    failures: Sequence[tuple[AttentionProblem, np.ndarray]], backend: str, dtype: str, rows: tuple = np.s_[...]
) -> tuple[float, AttentionProblem] | None:
    """(c, its problem) if every (problem, output) failure is, within `dtype`'s bound,
    attention at some factor c != 1 times the scale (c may depend on the shape:
    1/sqrt(n_head) for a scale by n_embd); c from the failure that pins it best (the
    largest error/bound at c = 1). None if one has no such c in 1/64..64. Every failure
    (up to _MAX_SIZE) must fit: a shrunk one of two tokens has one degree of freedom a
    row, and any small error fits some scale there."""
    small = [(p, out) for p, out in failures if size(p) <= _MAX_SIZE]
    if not small:
        return None
    fits = []
    for problem, out in small:
        fit = _fit(problem, out, backend, dtype, rows)
        if fit is None:
            return None
        fits.append((fit[1], fit[0], problem))
    _, c, problem = max(fits, key=lambda f: f[0])
    return c, problem


def _fit(
    problem: AttentionProblem, out: np.ndarray, backend: str, dtype: str, rows: tuple
) -> tuple[float, float] | None:
    """(the c that best explains `out`, the error/bound at c = 1), if c explains it (a
    grid over log2 c, then a golden-section search)."""
    truth = truth_for(problem, backend, dtype)
    rounded, tolerance = truth.problem, truth.tolerance(dtype)[rows]
    err = lambda log2c: excess(out, oracles.ground_truth(scaled(rounded, 2.0**log2c)).out[rows], tolerance)
    with np.errstate(all="ignore"):
        errors = [err(g) for g in _GRID]
        best = int(np.nanargmin(errors))
        lo, hi = _GRID[max(best - 1, 0)], _GRID[min(best + 1, len(_GRID) - 1)]
        g = (math.sqrt(5) - 1) / 2
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        fa, fb = err(a), err(b)
        for _ in range(_REFINE_STEPS):
            if fa <= fb:
                hi, b, fb = b, a, fa
                a = hi - g * (hi - lo)
                fa = err(a)
            else:
                lo, a, fa = a, b, fb
                b = lo + g * (hi - lo)
                fb = err(b)
    log2c, f = (a, fa) if fa <= fb else (b, fb)
    return (2.0**log2c, err(0.0)) if f <= 1 and log2c != 0.0 else None


def describe_factor(c: float) -> str:
    """c, and 1/sqrt(k) or sqrt(k) when it is one (a scale by n_embd, head_dim...)."""
    for k, name in ((round(c**-2), "1/sqrt({})"), (round(c**2), "sqrt({})")):
        if k >= 2 and math.isclose(c ** (-2 if name[0] == "1" else 2), k, rel_tol=1e-4):
            return f"{c:.6g} = {name.format(k)}"
    return f"{c:.9g}"


def evidence_problem(
    batch: tuple[int, ...] = (), n_seq: int = 8, n_head: int = 2, head_dim: int = 4
) -> AttentionProblem:
    """A dense problem of moderate values that an `imprecise` verdict must also pass at its
    effective precision: by default 8 tokens and 2 heads of 4, where that precision's bound
    must be informative too (module doc); diagnose.py also runs the failure's own batch and
    heads over at least diagnose.OWN_EVIDENCE_SEQ tokens (`Precision.confirm`'s `informative`)."""
    rng = np.random.default_rng(0)
    e = n_head * head_dim
    w = lambda *shape: rng.normal(size=shape) / math.sqrt(e)
    label = f"imprecise evidence: dense, batch {list(batch)}, {n_seq} tokens, {n_head} heads of {head_dim}"
    return AttentionProblem(rng.normal(size=(*batch, n_seq, e)), w(e, 3 * e), w(3 * e), w(e, e), w(e), n_head,
                            label=label)  # fmt: skip


@dataclass
class Precision:
    """Over one search in `dtype`: which lower precisions every failing output stayed within."""

    dtype: str
    alive: list[str] = field(default_factory=list)  # candidates not ruled out, lowest first
    seen: set[str] = field(default_factory=set)  # candidates with a failing output of finite bound
    #: candidate -> (its bound, the output's magnitude) on a failing output that stayed within
    #: a bound too wide to be evidence; `left`: candidates some failing output left at all
    wide: dict[str, tuple[float, float]] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.alive = list(LOWER.get(self.dtype, ()))

    def add(self, out: np.ndarray, problem: AttentionProblem, backend: str, rows: tuple = np.s_[...]) -> None:
        """One failing output: rule out each candidate whose informative bound it leaves."""
        if not self.alive or size(problem) > _MAX_SIZE:
            return  # nothing left to rule out, or no evidence either way (a long problem's bounds take seconds)
        judged = zip(list(self.alive), self._judged(out, problem, backend, rows), strict=True)
        for i, (p, (within, bound, magnitude)) in enumerate(judged):
            if not within:
                self.left.add(p)
            if not bound <= INFORMATIVE * magnitude:  # infinite, or as wide as the output: no evidence
                if within and math.isfinite(bound):
                    self.wide.setdefault(p, (bound, magnitude))
            elif not within:
                del self.alive[i:]  # a wider bound failed: the narrower ones fail too
                return
            else:
                self.seen.add(p)

    def confirm(
        self,
        out: np.ndarray,
        problem: AttentionProblem,
        backend: str,
        rows: tuple = np.s_[...],
        informative: bool = True,
    ) -> None:
        """The output on an `evidence_problem`: a candidate stays only if its bound holds there
        and (`informative`) is informative. The failure's own heads are not asked to be
        informative: at GPT-2's 12 x 64 float32's bound is 13% of a dense output, which would
        rule out every rounding there; they rule out a formula error that only those heads
        show (a wrong head map from 16 heads shrank to 2 tokens of 33 heads of 1, where its
        error, 0.13% of the output, lay within float16's bound, 4.9%; over 32 tokens it is
        5.2 times that bound)."""
        judged = zip(self.alive, self._judged(out, problem, backend, rows), strict=True)
        self.alive = [p for p, (within, bound, m) in judged if within and (bound <= INFORMATIVE * m or not informative)]

    def _judged(self, out: np.ndarray, problem: AttentionProblem, backend: str, rows: tuple) -> list[tuple]:
        """For each candidate: (whether `out` is within its bound, the bound's largest
        element, the output's largest magnitude)."""
        truth = truth_for(problem, backend, self.dtype)
        magnitude = float(np.abs(truth.out[rows]).max(initial=0.0))
        judged = []
        for p in self.alive:
            tolerance = truth.tolerance(p)[rows]
            judged.append((excess(out, truth.out[rows], tolerance) <= 1, float(tolerance.max(initial=0.0)), magnitude))
        return judged

    @property
    def undecided(self) -> dict | None:
        """The finding of a failure that every kept output shows within a lower precision's
        bound, where that bound was never narrow enough to be evidence: p arithmetic and a
        wrong formula cannot be told apart on these failures (the verdict stays the rule's)."""
        if self.effective is not None:
            return None
        open_ = [p for p in self.alive if p in self.wide and p not in self.left and p not in self.seen]
        if not open_:
            return None
        p = open_[-1]  # the highest such precision
        bound, magnitude = self.wide[p]
        text = (
            f"within {p}'s bound, too wide to tell {p} arithmetic from a wrong formula: up to {bound:.2g} against "
            f"outputs of up to {magnitude:.2g} (evidence needs a bound below 1/{round(1 / INFORMATIVE)} of them)"
        )
        return {"finding": "precision undecided", "precision": p, "bound": bound, "magnitude": magnitude, "text": text}

    @property
    def effective(self) -> str | None:
        """The highest precision whose bound held on every failing output (with evidence)."""
        held = [p for p in self.alive if p in self.seen]
        return held[-1] if held else None
