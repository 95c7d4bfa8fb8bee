"""What a formula failure is: attention at another scale, or the right formula computed at
a lower precision than its dtype.

Both are read off the outputs a search already has, against the float64 truth of the
inputs as the backend rounded them (`oracles.reference.truth_for`):

- `scale_factor`: the factor c for which the output is, within its own dtype's bound,
  attention with logits q.k / sqrt(head_dim) * c (c != 1). A scale error is a wrong
  formula, whatever its size: x1.01 and x(1 + 2^-10) included.
- `Precision`: the evidence for `imprecise`. A failing output that stays within the bound
  derived for a lower precision p (float32, float16, bfloat16) is what p arithmetic gives;
  p is the effective precision if that holds on every failing output kept (the search's
  first failure and its latest three: shrinks and prefixes of the bisection) whose p-bound
  is informative: finite (once logits leave p's range it is infinite) and below 1/16 of
  the output's magnitude (a wider bound would excuse any formula: such outputs are no
  evidence either way). Outputs of more than 200,000 elements (x plus the scores) are not
  checked: their bounds take seconds, and shrinking gives short failures of any rewrite
  that fails at every length. A failure with a finding (a future leak, mixed batch items)
  is never imprecise.
  Passing outputs need no check: the bound of p is wider than their dtype's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
_GRID = np.arange(-6.0, 6.0 + 1e-9, 1 / 8)
_REFINE_STEPS = 75  # golden-section steps: the grid's 1/8 down to below float64's resolution
_MAX_SIZE = 200_000  # failures larger than this (elements of x and the scores) are not fitted


def _scaled(problem: AttentionProblem, c: float) -> AttentionProblem:
    """The problem whose logits are c times the original's (q's weight and bias times c)."""
    e = problem.n_embd
    w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
    w[..., :e] *= c
    b[..., :e] *= c
    return AttentionProblem(problem.x, w, b, problem.c_proj_w, problem.c_proj_b, problem.n_head)


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
    log2c, f = (a, fa) if fa <= fb else (b, fb)
    return (2.0**log2c, err(0.0)) if f <= 1 and log2c != 0.0 else None


def describe_factor(c: float) -> str:
    """c, and 1/sqrt(k) or sqrt(k) when it is one (a scale by n_embd, head_dim...)."""
    for k, name in ((round(c**-2), "1/sqrt({})"), (round(c**2), "sqrt({})")):
        if k >= 2 and math.isclose(c ** (-2 if name[0] == "1" else 2), k, rel_tol=1e-4):
            return f"{c:.6g} = {name.format(k)}"
    return f"{c:.9g}"


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
        if size(problem) > _MAX_SIZE:
            return  # no evidence either way: a long problem's three bounds take seconds
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


# --- findings from the rewrite's behaviour: which inputs reach which outputs ---------------

_MAX_POSITIONS = 64  # positions perturbed one at a time (a shrunk counterexample has few)


def findings(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    """What the rewrite's outputs depend on that causal attention's do not, each checked by
    re-running it on `problem` with one input changed: a token changing earlier rows (it
    leaks the future, and how far ahead), one batch item changing another (it mixes batch
    items); `base` is its output on `problem`, already computed. A finding is listed only
    when its check fires; a rewrite that fails, or
    returns only the last row, is not probed."""
    from rewrites.verify.execute import RewriteFailed

    if rw.output != "full" or problem.n_seq > _MAX_POSITIONS:
        return []
    try:
        found = _future_leak(rw, backend, dtype, problem, base) + _batch_mixing(rw, backend, dtype, problem, base)
    except RewriteFailed:
        return []
    return found


def _changed(a: np.ndarray, b: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Rows [..., n_seq] of a and b further apart than the bound allows (or NaN in one only)."""
    with np.errstate(all="ignore"):
        far = ~(np.abs(a - b) <= tolerance) & ~(np.isnan(a) & np.isnan(b))
    return far.any(axis=-1)


def _perturbed(problem: AttentionProblem, where: tuple) -> AttentionProblem:
    """The problem with x changed at `where` (a token, or a batch item): new values of its scale."""
    x = problem.x.copy()
    rng = np.random.default_rng(0)
    x[where] = rng.normal(size=x[where].shape) * max(float(np.abs(problem.x).max()), 1e-3) + 1.0
    return AttentionProblem(x, *problem.arrays()[1:], n_head=problem.n_head, label=problem.label)


def _future_leak(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    from rewrites.verify.execute import run_rewrite

    tolerance = truth_for(problem, backend, dtype).tolerance(dtype)
    ahead, first_row = 0, None
    for j in range(1, min(problem.n_seq, _MAX_POSITIONS)):
        out = run_rewrite(rw, backend, dtype, _perturbed(problem, np.s_[..., j, :]))
        rows = np.flatnonzero(_changed(out, base, tolerance).reshape(-1, problem.n_seq)[:, :j].any(axis=0))
        if rows.size:
            ahead = max(ahead, j - int(rows.min()))
            first_row = int(rows.min()) if first_row is None else min(first_row, int(rows.min()))
    if not ahead:
        return []
    return [{"finding": "leaks the future", "ahead": ahead, "first_row": first_row,
             "text": f"leaks the future: row {first_row} sees a key {ahead} position(s) ahead"}]  # fmt: skip


def _batch_mixing(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    """Two copies of the problem as a batch, the second changed: the first must not move."""
    from rewrites.verify.execute import run_rewrite

    pair = np.stack([problem.x, problem.x])  # [2, ..., n_seq, n_embd]
    batched = AttentionProblem(pair, *problem.arrays()[1:], n_head=problem.n_head, label=problem.label)
    out = run_rewrite(rw, backend, dtype, _perturbed(batched, np.s_[1]))
    tolerance = truth_for(problem, backend, dtype).tolerance(dtype)
    if not _changed(out[0], base, tolerance).any():
        return []
    text = "mixes batch items: changing one batch item changes another's output"
    return [{"finding": "mixes batch items", "text": text}]


#: A failure whose shorter prefixes all pass, first failing past this many tokens, has a
#: length threshold. Arithmetic at a lower precision fails at any length (a float32 softmax
#: on float64 inputs from 2 tokens on), so such a failure is never `imprecise`.
LENGTH_THRESHOLD = 16


def length_threshold(first_fails_at: int | None) -> list[dict]:
    """The finding of a failure that starts at an exact length beyond LENGTH_THRESHOLD."""
    if first_fails_at is None or first_fails_at <= LENGTH_THRESHOLD:
        return []
    n = first_fails_at
    text = f"a length threshold: fails at n_seq {n}; its first {n - 1} tokens pass, as do the ladder's shorter lengths"
    return [{"finding": "length threshold", "first_fails_at": first_fails_at, "text": text}]
