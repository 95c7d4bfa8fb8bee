"""What a formula failure is: attention at another scale, or the right formula computed at
a lower precision than its dtype.

Both are read off the outputs a search already has, against the float64 truth of the
inputs as the backend rounded them (`oracles.reference.truth_for`):

- `scale_factor`: the factor c for which the output is, within its own dtype's bound,
  attention with logits q.k / sqrt(head_dim) * c (c != 1). A scale error is a wrong
  formula, whatever its size: x1.01 and x(1 + 2^-10) included.
- `Precision`: the evidence for `imprecise`. A failing output that stays within the bound
  derived for a lower precision p (float32, float16, bfloat16) is what p arithmetic gives;
  p is the effective precision if that holds on every failing output of the search whose
  p-bound is informative: finite (once logits leave p's range it is infinite) and below
  1/16 of the output's magnitude (a wider bound would excuse any formula: such outputs are
  no evidence either way).
  Passing outputs need no check: the bound of p is wider than their dtype's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import oracles
from oracles.problem import AttentionProblem
from oracles.reference import excess, size, truth_for

#: Lower precisions to try for each dtype, lowest first (a failure there rules out the rest).
LOWER = {"float64": ("bfloat16", "float16", "float32"), "float32": ("bfloat16", "float16")}
#: A p-bound is evidence only where it is below this fraction of the output's magnitude: a
#: bound as wide as the output itself (large logits in bfloat16) would excuse any formula.
INFORMATIVE = 1 / 16
#: log2 of the scale factors tried on a coarse grid before refining: 1/64 .. 64.
_GRID = np.arange(-6.0, 6.0 + 1e-9, 1 / 32)
_REFINE_STEPS = 80  # golden-section steps: the grid's 1/32 down to below float64's resolution
_MAX_SIZE = 2_000_000  # problems larger than this (elements of x and the scores) are not fitted


def _scaled(problem: AttentionProblem, c: float) -> AttentionProblem:
    """The problem whose logits are c times the original's (q's weight and bias times c)."""
    e = problem.n_embd
    w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
    w[..., :e] *= c
    b[..., :e] *= c
    return AttentionProblem(problem.x, w, b, problem.c_proj_w, problem.c_proj_b, problem.n_head)


def scale_factor(
    failures: Sequence[tuple[AttentionProblem, np.ndarray]], backend: str, dtype: str, rows: tuple = np.s_[...]
) -> float | None:
    """c != 1 such that every (problem, output) failure is attention at c times the scale
    within `dtype`'s bound; None if there is none in 1/64..64. c is fitted on the largest
    failure (a shrunk one of two tokens has one degree of freedom a row: any small error
    fits some scale) and must explain the others too."""
    fit = [(p, out) for p, out in failures if size(p) <= _MAX_SIZE]
    if not fit:
        return None
    problem, out = max(fit, key=lambda f: size(f[0]))
    truth = truth_for(problem, backend, dtype)
    rounded, tolerance = truth.problem, truth.tolerance(dtype)[rows]
    err = lambda log2c: excess(out, oracles.ground_truth(_scaled(rounded, 2.0**log2c)).out[rows], tolerance)
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
        c = 2.0 ** (a if fa <= fb else b)
        return c if c != 1.0 and all(_explains(c, p, out, backend, dtype, rows) for p, out in failures) else None


def _explains(c: float, problem: AttentionProblem, out: np.ndarray, backend: str, dtype: str, rows: tuple) -> bool:
    truth = truth_for(problem, backend, dtype)
    return excess(out, oracles.ground_truth(_scaled(truth.problem, c)).out[rows], truth.tolerance(dtype)[rows]) <= 1


@dataclass
class Precision:
    """Over one search in `dtype`: which lower precisions every failing output stayed within."""

    dtype: str
    alive: list[str] = field(default_factory=list)  # candidates not ruled out, lowest first
    seen: set[str] = field(default_factory=set)  # candidates with a failing output of finite bound

    def __post_init__(self) -> None:
        self.alive = list(LOWER.get(self.dtype, ()))

    def add(self, out: np.ndarray, problem: AttentionProblem, backend: str, rows: tuple = np.s_[...]) -> None:
        """One failing output: rule out each candidate whose finite bound it leaves."""
        if not self.alive:
            return
        truth = truth_for(problem, backend, self.dtype)
        for i, p in enumerate(self.alive):
            tolerance = (truth.bound(p) + truth.bound("float64"))[rows]
            if not tolerance.max(initial=0.0) <= INFORMATIVE * np.abs(truth.out[rows]).max(initial=0.0):
                continue  # outside p's range, or a bound as wide as the output: no evidence either way
            self.seen.add(p)
            if excess(out, truth.out[rows], tolerance) > 1:
                del self.alive[i:]  # a wider bound failed: the narrower ones fail too
                return

    @property
    def effective(self) -> str | None:
        """The highest precision whose bound held on every failing output (with evidence)."""
        held = [p for p in self.alive if p in self.seen]
        return held[-1] if held else None
