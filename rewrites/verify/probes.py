"""The checks behind each finding of diagnose.py, on a failing problem: whether the output
is a known wrong formula (a bias dropped or doubled, a token not seeing itself, another
row as the last row), and what re-running the rewrite with one input changed shows (a key
ahead reaching a row, one batch item another, one head's values another head's columns,
rows of weights not summing to 1). Each returns its findings, empty when it does not fire."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

import oracles
from oracles.problem import AttentionProblem
from oracles.reference import excess, truth_for
from oracles.truth import MAX, TINY, UNIT_ROUNDOFF, merge_heads, variant
from oracles.truth import heads as heads_of
from rewrites.verify.execute import output_rows, run_rewrite

LEAK_MIN_SEQ = 8  # the leak probe appends tokens to shorter failures: how far ahead needs room
MUCH_CLOSER = 1e3  # a wrong row this much closer to a wrong formula than to the truth is that formula
_MAX_SUBSTITUTED = 64  # wrong_keys tries n_seq^2 key substitutions up to this length
#: float16's unit roundoff, the lowest precision `imprecise` names: n terms summed at it are
#: off 1 by up to n u (with head_dim 1 any rounded row fits s v: only s's distance from 1 tells)
_U_LOWEST = 2.0**-11


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


def known_variant(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
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


def wrong_last_row(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
    """A last-row rewrite whose row is row r of attention, or attention with r's query over every key."""
    n, tolerance = problem.n_seq, truth.tolerance(dtype)[..., -1:, :]
    every_key = variant(truth.problem, mask_offset=n)  # row r: query r, keys 0 .. n - 1
    for r in range(n - 1):
        for out, what in ((truth.out, f"position {r}'s output"), (every_key, f"the query of position {r}")):
            if _matches(base, out[..., r : r + 1, :], tolerance):
                return [{"finding": "wrong last row", "row": r, "text": f"the last row is computed with {what}"}]
    return []


def _run(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> tuple[np.ndarray, np.ndarray]:
    """The rewrite's output on `problem` and the bound it is held to there (a probe's
    problem as the rewrite takes it: a grouped-KV kernel's k, v heads tied again)."""
    problem = rw.takes(problem)
    return run_rewrite(rw, backend, dtype, problem), truth_for(problem, backend, dtype).tolerance(dtype)


def rows_beyond(a: np.ndarray, b: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Rows [..., n_seq] of a and b further apart than the bound allows (or NaN in one only)."""
    with np.errstate(all="ignore"):
        far = ~(np.abs(a - b) <= tolerance) & ~(np.isnan(a) & np.isnan(b))
    return far.any(axis=-1)


def _new_values(like: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Values of `like`'s scale, none near its own."""
    return np.random.default_rng(0).normal(size=shape) * max(float(np.abs(like).max()), 1e-3) + 1.0


def future_leak(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """Change token j's key and value but not its query (an input feature that the query
    projection ignores): a row before j that moves sees a key ahead."""
    w = problem.c_attn_w.copy()
    w[0, : problem.n_embd] = 0.0  # feature 0 reaches k and v only
    x = problem.x
    if x.shape[-2] < LEAK_MIN_SEQ:  # a shrunk failure of 2 tokens cannot show a leak 2 ahead
        x = np.concatenate([x, _new_values(x, (*x.shape[:-2], LEAK_MIN_SEQ - x.shape[-2], x.shape[-1]))], axis=-2)
    keyed = _with(problem, x=x, c_attn_w=w)
    base, tolerance = _run(rw, backend, dtype, keyed)
    seen = []  # [row, key] with key > row: the key reaches the row
    for j in range(1, keyed.n_seq):
        x = keyed.x.copy()
        x[..., j, 0] = _new_values(keyed.x, x[..., j, 0].shape)
        out = run_rewrite(rw, backend, dtype, rw.takes(_with(keyed, x=x)))  # held to base's bound: no truth of its own
        rows = np.flatnonzero(rows_beyond(out, base, tolerance).reshape(-1, keyed.n_seq)[:, :j].any(axis=0))
        seen += [[int(i), j] for i in rows]
    if not seen:
        return []
    ahead = max(j - i for i, j in seen)
    first_row = min(i for i, _ in seen)
    text = f"leaks the future: row {first_row} sees a key {ahead} position(s) ahead"
    return [{"finding": "leaks the future", "ahead": ahead, "first_row": first_row, "n_seq": keyed.n_seq,
             "seen": seen, "text": text}]  # fmt: skip


def underflow(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """A failure that goes away when the magnitudes are balanced: c_attn_w 2^a times larger
    and x 2^a times smaller (a power of two scales exactly within the normal range), so q, k
    and v, and every later value the reference forms, keep their bits; only a product the
    rewrite forms of two weights or two inputs (W_v W_o, W_q W_k^T) moves. Named an
    underflow where such products of the smaller magnitude lie below tiny / u, where
    flushing a value to zero loses more than rounding it does (measured: merged QK and OV
    circuits on JAX in float32, which flushes W_v W_o's smallest products)."""
    rounded = truth_for(problem, backend, dtype).problem  # the inputs as `dtype` holds them
    x_max, w_max = float(np.abs(rounded.x).max()), float(np.abs(rounded.c_attn_w).max())
    m = min(x_max, w_max)
    if not m > 0 or m * m >= TINY[dtype] / UNIT_ROUNDOFF[dtype]:
        return []
    a = round((np.log2(x_max) - np.log2(w_max)) / 2)  # both to about their geometric mean
    balanced = _with(rounded, x=rounded.x * 2.0**-a, c_attn_w=rounded.c_attn_w * 2.0**a)
    for v in (balanced.x, balanced.c_attn_w):
        nonzero = np.abs(v[v != 0])
        if nonzero.size and (nonzero.min() < TINY[dtype] or nonzero.max() > MAX[dtype]):
            return []  # it would not scale exactly
    out, truth, rows = run_rewrite(rw, backend, dtype, balanced), truth_for(balanced, backend, dtype), output_rows(rw)
    if not _matches(out, truth.out[rows], truth.tolerance(dtype)[rows]):
        return []
    text = (
        f"an underflow of its own: it passes with x times 2^{-a} and c_attn_w times 2^{a} (the same q, k and v); "
        f"products of two values of {m:.2g} or less ({m * m:.2g} or less) lie where flushing below {dtype}'s "
        f"smallest normal ({TINY[dtype]:.2g}) loses more than rounding"
    )
    return [{"finding": "underflow", "shift": a, "text": text}]


def batch_mixing(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """Two copies of the problem as a batch, then the second changed: the first must not move.
    Both runs have the same shape, so a kernel chosen by shape (and its rounding: TF32 on a
    GPU, measured) is the same in both; comparing with the problem alone flagged an imprecise
    kernel as mixing items, its batched and unbatched errors apart by more than the bound."""
    problem = rw.takes(problem)
    x = problem.x
    item_0 = lambda second: run_rewrite(rw, backend, dtype, _with(problem, x=np.stack([x, second])))[0]
    same, changed = item_0(x), item_0(_new_values(x, x.shape))  # batches [2, ..., n_seq, n_embd]
    if not rows_beyond(changed, same, truth_for(problem, backend, dtype).tolerance(dtype)).any():
        return []
    text = "mixes batch items: changing one batch item changes another's output"
    return [{"finding": "mixes batch items", "text": text}]


def batch_items(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    """A batched failure whose wrong items are each right alone: which items, and the
    smallest batch that fails, its first b items as one batch dimension (items are
    independent, so a batch's first items are a problem of their own, as a sequence's
    first tokens are). Wrong only with several batch dimensions, when no flat batch fails."""
    lead = problem.x.shape[:-2]
    items = int(np.prod(lead, dtype=np.int64))
    if items < 2:
        return []
    truth = truth_for(problem, backend, dtype)
    wrong = np.flatnonzero(rows_beyond(base, truth.out, truth.tolerance(dtype)).reshape(items, -1).any(axis=1))
    flat = problem.x.reshape(items, *problem.x.shape[-2:])  # [items, n_seq, n_embd]
    if not wrong.size or any(_beyond(rw, backend, dtype, _with(problem, x=flat[i])) for i in wrong):
        return []  # a wrong item is wrong alone too: not the batch's doing
    first = next((b for b in range(2, items + 1) if _beyond(rw, backend, dtype, _with(problem, x=flat[:b]))), None)
    said, dims = ", ".join(map(str, wrong)), list(lead)
    text = f"wrong inside a batch: item(s) {said} of a batch of {dims} are beyond the bound, each right alone; "
    text += (f"the first {first} items as a batch fail, the first {first - 1} pass" if first
             else f"every flat batch of its first items passes: wrong only with batch dimensions {dims}")  # fmt: skip
    return [{"finding": "batch items", "items": wrong.tolist(), "first_fails_at_batch": first, "text": text}]


def _beyond(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> bool:
    """Is the rewrite's output on `problem` beyond the bound anywhere?"""
    out, tolerance = _run(rw, backend, dtype, problem)
    return bool(rows_beyond(out, truth_for(rw.takes(problem), backend, dtype).out, tolerance).any())


def heads_mixed(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """With c_proj the identity the output is the merged heads; with only head h's values
    nonzero, only head h's columns may be nonzero (for a grouped-KV kernel: only the
    columns of the query heads sharing h's k, v head, h the group's first).
    Which heads' columns does each reach? A head whose values reach no column where the
    truth has some (beyond the bound) is dropped."""
    if problem.n_head < 2:
        return []
    e, g, hd = problem.n_embd, rw.group(problem.n_head), problem.head_dim
    lands, dropped = [], []
    for h in range(0, problem.n_head, g):
        w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
        others = 2 * e + np.flatnonzero(~_head_columns(problem, h))
        w[:, others], b[others] = 0.0, 0.0  # only head h has values (and its group, tied again in _run)
        one_head = _with(problem, c_attn_w=w, c_attn_b=b, c_proj_w=np.eye(e), c_proj_b=np.zeros(e))
        out, tolerance = _run(rw, backend, dtype, one_head)
        truth = truth_for(rw.takes(one_head), backend, dtype).out
        with np.errstate(all="ignore"):
            moved = ~(np.abs(out) <= tolerance)  # the truth is exactly 0 outside its group's columns
            needed = ~(np.abs(truth) <= tolerance)[..., h * hd : (h + g) * hd]  # where it is not 0
        heads = sorted({int(c) // hd for c in np.flatnonzero(moved.reshape(-1, e).any(axis=0))})
        if heads and heads != list(range(h, h + g)):
            lands.append({"head": h, "columns_of": heads})
        elif not heads and needed.any():
            dropped.append(h)
    who = lambda h: f"head {h}'s values" if g == 1 else f"k, v head {h // g}'s values (for heads {h}-{h + g - 1})"
    found = []
    if lands:
        name = "reorders heads" if all(len(x["columns_of"]) == g for x in lands) else "mixes heads"
        heads = lambda x: ", ".join(map(str, x["columns_of"]))
        said = "; ".join(f"{who(x['head'])} reach the columns of head(s) {heads(x)}" for x in lands)
        found.append({"finding": name, "heads": lands, "text": f"{name}: {said}"})
    if dropped:
        said = "; ".join(who(h) for h in dropped)
        text = f"drops heads: {said} reach no column of the output, where the truth has them"
        found.append({"finding": "drops heads", "heads": dropped, "text": text})
    return found


def rows_do_not_sum_to_one(rw: Any, backend: str, dtype: str, problem: AttentionProblem) -> list[dict]:
    """Every token the same and c_proj the identity: correct attention returns each head's
    value v_h on every row, whatever its weights, as long as they sum to 1. A row that is
    s v_h with s != 1 (within the bound) sums to s. The value weights and bias are scaled
    by a power of two to a largest magnitude in [1/2, 1) (exact, and the output is linear in
    them): a shrunk failure's value bias of 1e-171 underflowed in a float32 computation,
    whose rows then "summed to 0"."""
    e, hd = problem.n_embd, problem.head_dim
    same = np.broadcast_to(problem.x[..., :1, :], problem.x.shape).copy()
    w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
    largest = max(float(np.abs(w[:, 2 * e :]).max(initial=0.0)), float(np.abs(b[2 * e :]).max(initial=0.0)))
    if 0.0 < largest < math.inf:
        power = -math.frexp(largest)[1]
        w[:, 2 * e :], b[2 * e :] = np.ldexp(w[:, 2 * e :], power), np.ldexp(b[2 * e :], power)
    probe = _with(problem, x=same, c_attn_w=w, c_attn_b=b, c_proj_w=np.eye(e), c_proj_b=np.zeros(e))
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
    if np.abs(sums - 1).max() <= problem.n_seq * _U_LOWEST:  # a sum's own rounding: said as `imprecise`, if at all
        return []
    lo, hi = float(sums.min()), float(sums.max())
    return [{"finding": "rows do not sum to 1", "min": lo, "max": hi,
             "text": f"rows of attention weights do not sum to 1: they sum to {lo:.3g} .. {hi:.3g}"}]  # fmt: skip


def _excess_each(row: np.ndarray, candidates: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """[...] max |row - candidate| / tolerance of each candidate [..., n_embd] (0/0 counts as 0)."""
    err = np.abs(candidates - row)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / tolerance).max(axis=-1)
    return np.where(np.isnan(ratio), np.inf, ratio)  # a candidate with no keys left is no match


def _first_wrong(truth: Any, dtype: str, base: np.ndarray) -> tuple[int, ...] | None:
    """(batch index..., position) of the first row of `base` beyond the bound, or None."""
    bad = np.argwhere(rows_beyond(base, truth.out, truth.tolerance(dtype)))
    return tuple(int(i) for i in bad[0]) if len(bad) else None


def _position(at: tuple[int, ...]) -> str:
    """(batch index..., position) in words: "position 3", "position 3 of sequence 1"."""
    *batch, i = at
    return f"position {i}" + (f" of sequence {batch[0] if len(batch) == 1 else batch}" if batch else "")


def _is_that_formula(near: float, off: float) -> bool:
    """A wrong row `near` (error/bound) from a wrong formula and `off` from the truth is that
    formula: within the bound, or (a kernel computing in a lower precision) MUCH_CLOSER to it."""
    return near <= max(1.0, off / MUCH_CLOSER)


def _how_close(near: float, off: float) -> str:
    """ "" within the bound, else how much closer to the formula than to the truth."""
    return "" if near <= 1 else f" ({off / near:.2g}x closer than the truth, not within the bound)"


def wrong_keys(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
    """The first wrong row, as attention that drops one of its keys, or reads another
    position's key and value in one key's place (a stale or misordered cache slot or page).
    At a failure's first failing length one key is typically what went wrong (the new row
    is the first to reach the boundary), so single keys are what is tried: a drop at any
    length, a substitution up to _MAX_SUBSTITUTED tokens (n_seq^2 candidates)."""
    at = _first_wrong(truth, dtype, base)
    if at is None or problem.segments is not None or not np.isfinite(base[at]).all():
        return []
    *batch, i = at
    pb, tolerance = truth.problem, truth.tolerance(dtype)[at]
    q, k, v = (heads_of(t, pb.n_head) for t in np.split(truth.qkv[tuple(batch)], 3, axis=-1))  # [H, n, hd]
    z = k @ q[:, i, :, None] / np.sqrt(pb.head_dim)  # [H, n, 1] row i's score for every key
    e = np.exp(z - z.max(axis=-2, keepdims=True))  # [H, n, 1] relative to the largest of all n
    ev = e * v  # [H, n, hd]
    s, u = e[:, : i + 1].sum(axis=-2), ev[:, : i + 1].sum(axis=-2)  # [H, 1], [H, hd] the true row's
    out = lambda o: merge_heads(o) @ pb.c_proj_w + pb.c_proj_b  # [H, ..., hd] -> [..., n_embd]
    off = excess(base[at], truth.out[at], tolerance)
    if i > 0:  # key j dropped: (u - e_j v_j) / (s - e_j)
        with np.errstate(divide="ignore", invalid="ignore"):
            dropped = (u[:, None] - ev[:, : i + 1]) / (s[:, None] - e[:, : i + 1])  # [H, i+1, hd]
        near = _excess_each(base[at], out(dropped), tolerance)  # [i+1]
        j = int(np.argmin(near))
        if _is_that_formula(near[j], off):
            which = "itself" if j == i else f"key {j}"
            text = f"drops a key: {_position(at)} does not attend {which}{_how_close(near[j], off)}"
            return [{"finding": "drops a key", "position": list(at), "key": j, "text": text}]
    if pb.n_seq > _MAX_SUBSTITUTED:
        return []
    # key j read from position r: (u - e_j v_j + e_r v_r) / (s - e_j + e_r), r over all n
    kept = s[:, None, None] - e[:, : i + 1, None]  # [H, i+1, 1, 1]
    read = (u[:, None, None] - ev[:, : i + 1, None] + ev[:, None]) / (kept + e[:, None])  # [H, i+1, n, hd]
    near = _excess_each(base[at], out(np.moveaxis(read, 0, -3)), tolerance)  # [i+1, n]
    near[np.arange(i + 1), np.arange(i + 1)] = np.inf  # reading itself is no substitution
    j, r = (int(a) for a in np.unravel_index(np.argmin(near), near.shape))
    if not _is_that_formula(near[j, r], off):
        return []
    own = "its own" if j == i else f"key {j}'s"
    how = _how_close(near[j, r], off)
    text = f"reads the wrong key: {_position(at)} reads position {r}'s key and value in place of {own}{how}"
    return [{"finding": "reads the wrong key", "position": list(at), "key": j, "read": r, "text": text}]


def split_without_maxima(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
    """Split-KV attention (flash-decoding) whose partial results are added without rescaling
    each by exp(its max - the row's max): the output is sum_c o_c / sum_c l_c, each chunk c's
    o_c and l_c relative to its own max. Tried with the keys in chunks of every size that
    splitting n_seq into 2..n_seq parts gives and every power of two below n_seq."""
    if problem.segments is not None or _first_wrong(truth, dtype, base) is None:
        return []
    pb, n = truth.problem, problem.n_seq
    v = heads_of(np.split(truth.qkv, 3, axis=-1)[2], pb.n_head)  # [..., H, n, hd]
    sizes = sorted({-(-n // parts) for parts in range(2, n + 1)} | {2**e for e in range(n.bit_length()) if 2**e < n})
    tolerance = truth.tolerance(dtype)
    for c in sizes:
        pad = -n % c
        z = np.pad(truth.z, [(0, 0)] * (truth.z.ndim - 1) + [(0, pad)], constant_values=-np.inf)  # [..., H, n, n+pad]
        z = z.reshape(*z.shape[:-1], -1, c)  # [..., H, n, chunks, c]
        m = z.max(axis=-1, keepdims=True)  # [..., H, n, chunks, 1]: -inf for a chunk wholly masked
        p = np.exp(z - np.where(np.isinf(m), 0.0, m))  # [..., H, n, chunks, c]
        vc = np.pad(v, [(0, 0)] * (v.ndim - 2) + [(0, pad), (0, 0)]).reshape(*v.shape[:-2], -1, c, v.shape[-1])
        o = np.einsum("...nsc,...scd->...nd", p, vc) / p.sum(axis=(-1, -2))[..., None]  # [..., H, n, hd]
        if _matches(base, merge_heads(o) @ pb.c_proj_w + pb.c_proj_b, tolerance):
            each = " (chunks of one key: every key weighs the same)" if c == 1 else ""
            text = f"split-KV partials combined without their maxima: keys in chunks of {c}{each}"
            return [{"finding": "combined without maxima", "chunk": c, "text": text}]
    return []


def _row_over(truth: Any, at: tuple, keys: np.ndarray, equal: bool = False) -> np.ndarray:
    """[n_embd] float64: the output row at `at` (batch index..., position) had its query
    attended exactly the `keys` [n_seq] bool of its row (none: c_proj's bias); `equal`:
    with equal weights (a row of equal finite mask values, e.g. a fully masked one)."""
    pb = truth.problem
    *batch, i = at
    q, k, v = (np.split(t, pb.n_head, axis=-1) for t in np.split(truth.qkv[tuple(batch)], 3, axis=-1))
    o = np.zeros(pb.n_embd)
    for h in range(pb.n_head) if keys.any() else ():
        z = k[h][keys] @ q[h][i] / np.sqrt(pb.head_dim)  # [keys]
        w = np.ones_like(z) if equal else np.exp(z - z.max())
        o[h * pb.head_dim : (h + 1) * pb.head_dim] = (w / w.sum()) @ v[h][keys]
    return o @ pb.c_proj_w + pb.c_proj_b


def _whose(segments: np.ndarray) -> str:
    """The positions' segments in words: "padding", "document 0", ..."""
    return ", ".join("padding" if s < 0 else f"document {s}" for s in sorted(set(segments.tolist())))


def layout_fault(problem: AttentionProblem, truth: Any, dtype: str, base: np.ndarray) -> list[dict]:
    """For a padded or packed problem: the first wrong row, real or padding, and which keys
    it attends (of those tried: every earlier key, every key, its own and the one before
    its document), or that it is NaN."""
    seg, tolerance = problem.segments, truth.tolerance(dtype)
    bad = rows_beyond(base, truth.out, tolerance)  # [..., n_seq]
    if seg is None or not bad.any():
        return []
    padding = bad & (seg < 0)
    at = tuple(int(i) for i in np.argwhere(padding if padding.any() else bad)[0])  # (batch..., position)
    *batch, i = at
    row_seg, n, own = seg[tuple(batch)], problem.n_seq, seg[at]
    where = _position(at)
    if np.isnan(base[at]).any():
        what = "is padding" if own < 0 else f"is in document {own}"
        return [{"finding": "NaN rows", "position": list(at),
                 "text": f"NaN: {where} {what} and comes out NaN (a query with no key to attend: 0/0)"}]  # fmt: skip
    start = i
    while start > 0 and row_seg[start - 1] == own:
        start -= 1
    earlier = np.arange(n) <= i
    every = np.ones(n, bool)
    tries = [(earlier, "every key before it", False), (every, "every key, the future too", False),
             (every, "every key with equal weights (its mask values all alike)", True)]  # fmt: skip
    if own >= 0 and start > 0:  # the most specific first
        one_more = (np.arange(n) >= start - 1) & earlier
        tries.insert(0, (one_more, f"one key before its sequence, position {start - 1}", False))
    off = excess(base[at], truth.out[at], tolerance[at])
    for keys, how, equal in tries:
        near = excess(base[at], _row_over(truth, at, keys, equal), tolerance[at])
        if _is_that_formula(near, off):
            others = row_seg[keys & (row_seg != own) if own >= 0 else keys]
            who = "is padding and" if own < 0 else f"(document {own})"
            text = f"{where} {who} attends {_whose(others) or 'nothing else'}: {how}"
            text += _how_close(near, off)
            return [{"finding": "attends across the layout", "position": list(at), "keys": how, "text": text}]
    what = "a padding position" if own < 0 else f"in document {own}"
    return [{"finding": "layout", "position": list(at),
             "text": f"{where} ({what}) is wrong, but not as attending other documents or padding"}]  # fmt: skip
