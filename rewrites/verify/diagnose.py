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
  like rounding (linear attention on two near-zero tokens stayed within bfloat16's bound).
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
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import oracles
from oracles.problem import AttentionProblem
from oracles.reference import excess, size, truth_for
from oracles.truth import variant

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


def _scaled(problem: AttentionProblem, c: float) -> AttentionProblem:
    """The problem whose logits are c times the original's (q's weight and bias times c)."""
    e = problem.n_embd
    w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
    w[..., :e] *= c
    b[..., :e] *= c
    return _with(problem, c_attn_w=w, c_attn_b=b)


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


def evidence_problem() -> AttentionProblem:
    """A dense problem of moderate values, 8 tokens and 2 heads of 4, that an `imprecise`
    verdict must also pass at its effective precision, with that precision's bound
    informative there (module doc)."""
    rng = np.random.default_rng(0)
    n_seq, e = 8, 8
    w = lambda *shape: rng.normal(size=shape) / math.sqrt(e)
    return AttentionProblem(rng.normal(size=(n_seq, e)), w(e, 3 * e), w(3 * e), w(e, e), w(e), n_head=2,
                            label="imprecise evidence: dense, 8 tokens, 2 heads of 4")  # fmt: skip


@dataclass
class Precision:
    """Over one search in `dtype`: which lower precisions every failing output stayed within."""

    dtype: str
    alive: list[str] = field(default_factory=list)  # candidates not ruled out, lowest first
    seen: set[str] = field(default_factory=set)  # candidates with a failing output of finite bound

    def __post_init__(self) -> None:
        self.alive = list(LOWER.get(self.dtype, ()))

    def add(self, out: np.ndarray, problem: AttentionProblem, backend: str, rows: tuple = np.s_[...]) -> None:
        """One failing output: rule out each candidate whose informative bound it leaves."""
        if not self.alive or size(problem) > _MAX_SIZE:
            return  # nothing left to rule out, or no evidence either way (a long problem's bounds take seconds)
        for i, held in enumerate(self._held(out, problem, backend, rows)):
            if held is False:
                del self.alive[i:]  # a wider bound failed: the narrower ones fail too
                return
            if held:
                self.seen.add(self.alive[i])

    def confirm(self, out: np.ndarray, problem: AttentionProblem, backend: str, rows: tuple = np.s_[...]) -> None:
        """The output on `evidence_problem()`: a candidate stays only if its bound is informative there and holds."""
        held = self._held(out, problem, backend, rows)
        self.alive = [p for p, h in zip(self.alive, held, strict=True) if h]

    def _held(self, out: np.ndarray, problem: AttentionProblem, backend: str, rows: tuple) -> list[bool | None]:
        """For each candidate: whether `out` is within its bound (None: not informative there)."""
        truth = truth_for(problem, backend, self.dtype)
        magnitude = np.abs(truth.out[rows]).max(initial=0.0)
        held: list[bool | None] = []
        for p in self.alive:
            tolerance = (truth.bound(p) + truth.bound("float64"))[rows]
            informative = tolerance.max(initial=0.0) <= INFORMATIVE * magnitude  # finite, and not as wide as the output
            held.append(excess(out, truth.out[rows], tolerance) <= 1 if informative else None)
        return held

    @property
    def effective(self) -> str | None:
        """The highest precision whose bound held on every failing output (with evidence)."""
        held = [p for p in self.alive if p in self.seen]
        return held[-1] if held else None


# --- findings from the rewrite's behaviour: which inputs reach which outputs ---------------

_MAX_POSITIONS = 64  # positions perturbed one at a time (a shrunk counterexample has few)
_LEAK_MIN_SEQ = 8  # the leak probe appends tokens to shorter failures: how far ahead needs room


def findings(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    """What is wrong with a formula failure, each finding checked on `problem` (`base` is the
    rewrite's output on it, already computed), listed only when its check fires:
    - the output is a known wrong formula within the bound: a bias dropped, a token not
      seeing itself; for a last-row rewrite, another position's row or query;
    - re-running the rewrite with one input changed: a key ahead changing a row (it leaks the
      future, and how far), one batch item changing another, one head's values reaching
      another head's columns, rows of attention weights not summing to 1.
    A rewrite that fails on these runs is not probed further."""
    from rewrites.verify.execute import RewriteFailed

    if problem.n_seq > _MAX_POSITIONS:
        return []
    truth = truth_for(problem, backend, dtype)
    if rw.output != "full":
        return _wrong_last_row(problem, truth, dtype, base)
    found = _known_variant(problem, truth, dtype, base)
    try:
        found += _future_leak(rw, backend, dtype, problem) + _batch_mixing(rw, backend, dtype, problem, base)
        found += _heads_mixed(rw, backend, dtype, problem)
        if not found:
            found += _rows_do_not_sum_to_one(rw, backend, dtype, problem)
    except RewriteFailed:
        pass
    return found


def instability(rw: Any, backend: str, dtype: str, problem: AttentionProblem, out: np.ndarray) -> list[dict]:
    """What an `unstable` failure (extreme inputs in `dtype`) is: an overflow (the first
    non-finite row), or a future that leaks back in (a finite mask swamped), each with the
    logit magnitude it takes."""
    from rewrites.verify.execute import RewriteFailed

    bad = ~np.isfinite(out).reshape(-1, out.shape[-1]).all(axis=-1)
    try:
        if bad.any():
            row = int(np.flatnonzero(bad)[0] % out.shape[-2])
            start = _overflow_starts(rw, backend, dtype, problem)
            text = f"overflow or 0/0: a non-finite output from row {row}, from |logits| of about {start:.3g} on"
            return [{"finding": "non-finite", "row": row, "logits": start, "text": text}]
        if rw.output != "full" or problem.n_seq > _MAX_POSITIONS:
            return []
        leak = _future_leak(rw, backend, dtype, problem)
    except RewriteFailed:
        return []
    mag = _logits(problem, backend, dtype)
    for f in leak:
        f["logits"], f["text"] = mag, f"{f['text']}, at logits of about {mag:.0e}"
    return leak


def _logits(problem: AttentionProblem, backend: str, dtype: str) -> float:
    """The largest |logit| of `problem` as `backend` rounds it to `dtype`."""
    z = truth_for(problem, backend, dtype).z
    return float(np.abs(z[np.isfinite(z)]).max(initial=0.0))


def _overflow_starts(rw: Any, backend: str, dtype: str, problem: AttentionProblem, steps: int = 24) -> float:
    """The largest |logit| at which the output turns non-finite (exp overflowing, or every
    exp of a row underflowing to 0/0): the logits scaled by c <= 1
    (q scaled), bisected over log2 c in [-32, 0] to 2^-19 (a relative 1e-6)."""
    from rewrites.verify.execute import run_rewrite

    finite = lambda log2c: bool(np.isfinite(run_rewrite(rw, backend, dtype, _scaled(problem, 2.0**log2c))).all())
    lo, hi = -32.0, 0.0  # lo: finite (tiny logits), hi: not
    if not finite(lo):
        return 2.0**lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if finite(mid) else (lo, mid)
    return _logits(_scaled(problem, 2.0**hi), backend, dtype)


def _with(problem: AttentionProblem, **arrays: np.ndarray) -> AttentionProblem:
    return dataclasses.replace(problem, **arrays)


def _head_columns(problem: AttentionProblem, h: int) -> np.ndarray:
    """[n_embd] bool: the columns of head h in q, k, v and the merged output."""
    cols = np.zeros(problem.n_embd, bool)
    cols[h * problem.head_dim : (h + 1) * problem.head_dim] = True
    return cols


def _matches(out: np.ndarray, expected: np.ndarray, tolerance: np.ndarray) -> bool:
    """Within the bound on every row that `expected` defines (a row seeing no key is NaN)."""
    rows = np.isfinite(expected).all(axis=-1)
    return bool(rows.any()) and excess(out[rows], expected[rows], tolerance[rows]) <= 1


def _known_variant(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
    """The first known wrong formula whose output `base` is, within the bound."""
    e, tolerance = problem.n_embd, truth.tolerance(dtype)
    rounded = truth.problem
    # (name, array, columns): a key bias dropped or doubled changes nothing (softmax is shift-invariant)
    biases = (("query", "c_attn_b", np.s_[:e]), ("value", "c_attn_b", np.s_[2 * e :]), ("output", "c_proj_b", np.s_[:]))
    for (name, array, cols), (factor, finding, how) in itertools.product(
        biases, ((0.0, "missing bias", "dropped"), (2.0, "extra bias", "added twice"))
    ):
        b = getattr(rounded, array).copy()
        if not np.any(b[cols]):
            continue
        b[cols] *= factor
        if _matches(base, oracles.ground_truth(_with(rounded, **{array: b})).out, tolerance):
            text = f"{'a missing' if factor == 0 else 'an extra'} bias: the {name} bias is {how}"
            return [{"finding": finding, "bias": name, "text": text}]
    if problem.n_seq > 1 and _matches(base, variant(rounded, mask_offset=-1), tolerance):
        text = "a token does not see itself: row i attends to keys before i"
        return [{"finding": "does not see itself", "text": text}]
    return []


def _wrong_last_row(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
    """A last-row rewrite whose row is row r of attention, or attention with r's query over every key."""
    n, tolerance = problem.n_seq, truth.tolerance(dtype)[..., -1:, :]
    every_key = variant(truth.problem, mask_offset=n)  # row r: query r, keys 0 .. n - 1
    for r in range(n - 1):
        for out, what in ((truth.out, f"position {r}'s output"), (every_key, f"the query of position {r}")):
            if _matches(base, out[..., r : r + 1, :], tolerance):
                return [{"finding": "wrong last row", "row": r, "text": f"the last row is computed with {what}"}]
    return []


def _run(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> tuple[np.ndarray, np.ndarray]:
    """The rewrite's output on `problem` and the bound it is held to there."""
    from rewrites.verify.execute import run_rewrite

    return run_rewrite(rw, backend, dtype, problem), truth_for(problem, backend, dtype).tolerance(dtype)


def rows_beyond(a: np.ndarray, b: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Rows [..., n_seq] of a and b further apart than the bound allows (or NaN in one only)."""
    with np.errstate(all="ignore"):
        far = ~(np.abs(a - b) <= tolerance) & ~(np.isnan(a) & np.isnan(b))
    return far.any(axis=-1)


def _new_values(like: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Values of `like`'s scale, none near its own."""
    return np.random.default_rng(0).normal(size=shape) * max(float(np.abs(like).max()), 1e-3) + 1.0


def _future_leak(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """Change token j's key and value but not its query (an input feature that the query
    projection ignores): a row before j that moves sees a key ahead."""
    w = problem.c_attn_w.copy()
    w[0, : problem.n_embd] = 0.0  # feature 0 reaches k and v only
    x = problem.x
    if x.shape[-2] < _LEAK_MIN_SEQ:  # a shrunk failure of 2 tokens cannot show a leak 2 ahead
        x = np.concatenate([x, _new_values(x, (*x.shape[:-2], _LEAK_MIN_SEQ - x.shape[-2], x.shape[-1]))], axis=-2)
    keyed = _with(problem, x=x, c_attn_w=w)
    base, tolerance = _run(rw, backend, dtype, keyed)
    seen = []  # [row, key] with key > row: the key reaches the row
    for j in range(1, keyed.n_seq):
        x = keyed.x.copy()
        x[..., j, 0] = _new_values(keyed.x, x[..., j, 0].shape)
        out, _ = _run(rw, backend, dtype, _with(keyed, x=x))
        rows = np.flatnonzero(rows_beyond(out, base, tolerance).reshape(-1, keyed.n_seq)[:, :j].any(axis=0))
        seen += [[int(i), j] for i in rows]
    if not seen:
        return []
    ahead = max(j - i for i, j in seen)
    first_row = min(i for i, _ in seen)
    text = f"leaks the future: row {first_row} sees a key {ahead} position(s) ahead"
    return [{"finding": "leaks the future", "ahead": ahead, "first_row": first_row, "n_seq": keyed.n_seq,
             "seen": seen, "text": text}]  # fmt: skip


def _batch_mixing(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    """Two copies of the problem as a batch, the second changed: the first must not move."""
    pair = np.stack([problem.x, problem.x])  # [2, ..., n_seq, n_embd]
    pair[1] = _new_values(problem.x, pair[1].shape)
    out, _ = _run(rw, backend, dtype, _with(problem, x=pair))
    if not rows_beyond(out[0], base, truth_for(problem, backend, dtype).tolerance(dtype)).any():
        return []
    text = "mixes batch items: changing one batch item changes another's output"
    return [{"finding": "mixes batch items", "text": text}]


def _heads_mixed(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """With c_proj the identity the output is the merged heads; with only head h's values
    nonzero, only head h's columns may be nonzero. Which heads' columns does each reach?"""
    if problem.n_head < 2:
        return []
    e = problem.n_embd
    lands = []
    for h in range(problem.n_head):
        w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
        others = 2 * e + np.flatnonzero(~_head_columns(problem, h))
        w[:, others], b[others] = 0.0, 0.0  # only head h has values
        one_head = _with(problem, c_attn_w=w, c_attn_b=b, c_proj_w=np.eye(e), c_proj_b=np.zeros(e))
        out, tolerance = _run(rw, backend, dtype, one_head)
        with np.errstate(all="ignore"):
            moved = ~(np.abs(out) <= tolerance)  # the truth is exactly 0 outside head h's columns
        heads = sorted({int(c) // problem.head_dim for c in np.flatnonzero(moved.reshape(-1, e).any(axis=0))})
        if heads and heads != [h]:
            lands.append({"head": h, "columns_of": heads})
    if not lands:
        return []
    moved = all(len(x["columns_of"]) == 1 for x in lands)
    name = "reorders heads" if moved else "mixes heads"
    heads = lambda x: ", ".join(map(str, x["columns_of"]))
    said = "; ".join(f"head {x['head']}'s values reach the columns of head(s) {heads(x)}" for x in lands)
    return [{"finding": name, "heads": lands, "text": f"{name}: {said}"}]


def _rows_do_not_sum_to_one(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """Every token the same and c_proj the identity: correct attention returns each head's
    value v_h on every row, whatever its weights, as long as they sum to 1. A row that is
    s v_h with s != 1 (within the bound) sums to s."""
    e, hd = problem.n_embd, problem.head_dim
    same = np.broadcast_to(problem.x[..., :1, :], problem.x.shape).copy()
    probe = _with(problem, x=same, c_proj_w=np.eye(e), c_proj_b=np.zeros(e))
    out, tolerance = _run(rw, backend, dtype, probe)
    v = truth_for(probe, backend, dtype).out  # [..., n_seq, n_embd]: v_h in head h's columns, every row
    if not rows_beyond(out, v, tolerance).any():
        return []
    split = lambda a: a.reshape(*a.shape[:-1], problem.n_head, hd)  # [..., n_seq, H, hd]
    with np.errstate(all="ignore"):
        sums = (split(out) * split(v)).sum(-1) / (split(v) ** 2).sum(-1)  # [..., n_seq, H]
        fitted = (sums[..., None] * split(v)).reshape(out.shape)
    if not np.isfinite(sums).all() or excess(out, fitted, tolerance) > 1:
        return []
    lo, hi = float(sums.min()), float(sums.max())
    return [{"finding": "rows do not sum to 1", "min": lo, "max": hi,
             "text": f"rows of attention weights do not sum to 1: they sum to {lo:.3g} .. {hi:.3g}"}]  # fmt: skip


def unexplained(problem: AttentionProblem) -> dict:
    """A formula failure that no check explains: said so, rather than naming a wrong fault."""
    if problem.n_seq > _MAX_POSITIONS:
        text = f"not probed: the failure has {problem.n_seq} tokens, the probes stop at {_MAX_POSITIONS}"
    else:
        text = "no single known fault (a scale, a mask, a bias, heads, batch items, row sums, precision) explains it"
    return {"finding": "no known fault", "text": text}


#: A failure whose shorter prefixes all pass, first failing past this many tokens, has a
#: length threshold. Arithmetic at a lower precision fails at any length (a float32 softmax
#: on float64 inputs from 2 tokens on), so such a failure is never `imprecise`.
LENGTH_THRESHOLD = 16


def length_threshold(
    first_fails_at: int | None, problem: AttentionProblem, out: np.ndarray, backend: str, dtype: str, rows: tuple
) -> list[dict]:
    """The finding of a failure that starts at an exact length beyond LENGTH_THRESHOLD, with
    its error/bound by position (`out` is the rewrite's output on `problem`, cut there)."""
    if first_fails_at is None or first_fails_at <= LENGTH_THRESHOLD:
        return []
    truth = truth_for(problem, backend, dtype)
    with np.errstate(all="ignore"):
        diff = np.abs(out - truth.out[rows])  # [..., n_seq | 1, n_embd]
        ratio = np.where(
            np.isnan(diff),
            np.inf,
            np.divide(diff, truth.tolerance(dtype)[rows], where=diff > 0, out=np.zeros_like(diff)),
        )
    by_row = ratio.max(axis=-1).reshape(-1, ratio.shape[-2]).max(axis=0)  # [n_seq | 1]
    n = first_fails_at
    text = f"a length threshold: fails at n_seq {n}, its first {n - 1} tokens pass"
    return [{"finding": "length threshold", "first_fails_at": n, "error_by_row": [float(f"{r:.3g}") for r in by_row],
             "text": text}]  # fmt: skip
