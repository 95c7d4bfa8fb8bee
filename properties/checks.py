"""The checks behind the properties, as plain functions of a `Runner`.

A Runner is any attention implementation seen from NumPy: problem in, float64 output
out, computing in some backend and dtype. Oracles, rewrites and deliberately broken
implementations are all checked through the same functions, so a check that passes for
the oracles is known to fail for a fault (`test_fault_injection.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from hypothesis import assume

import oracles
from oracles.problem import AttentionProblem
from oracles.reference import Reference, excess, reference
from oracles.reference import truth_for as truth_for  # re-exported for the tests (test_reference.py)
from oracles.truth import Truth

Runner = Callable[[AttentionProblem], np.ndarray]


def oracle_runner(backend: str, dtype: str) -> Runner:
    """`backend`'s oracle computing in `dtype`."""
    return lambda problem: oracles.run(backend, problem, dtype)


def representable(truth: Truth, dtype: str) -> bool:
    """Whether a correct computation in `dtype` exists, for a full Truth (rewrites/verify.py);
    a Reference has the same as `Reference.representable`."""
    return bool(np.isfinite(truth.bound(dtype)).all())


def _judged(problem: AttentionProblem, backend: str, dtype: str) -> Reference:
    """The problem's reference; inputs no correct computation in `dtype` can hold are
    discarded (`assume`), since they say nothing about a program."""
    ref = reference(problem, backend, dtype)
    assume(ref.representable)
    return ref


def assert_within(out: np.ndarray, expected: np.ndarray, tolerance: np.ndarray, what: str) -> None:
    """Assert |out - expected| <= tolerance everywhere, with a message that locates the worst element."""
    if out.shape != expected.shape:
        raise AssertionError(f"{what}: shape {out.shape}, expected {expected.shape}")
    ratio = excess(out, expected, tolerance)
    if ratio <= 1:
        return
    err = np.where(np.isfinite(out), np.abs(out - expected), np.inf)
    idx = np.unravel_index(np.argmax(err / np.maximum(tolerance, 1e-300)), err.shape)
    raise AssertionError(
        f"{what}: |error| / bound = {ratio:.3g} at index {tuple(map(int, idx))}: "
        f"got {out[idx]!r}, expected {expected[idx]!r}, bound {tolerance[idx]:.3g}"
    )


def matches_truth(run: Runner, problem: AttentionProblem, backend: str, dtype: str) -> None:
    """The output is within the derived bound of the float64 truth."""
    ref = _judged(problem, backend, dtype)
    assert_within(run(problem), ref.out, ref.tolerance, f"{problem.describe()}, {dtype}")


def _same(run: Runner, a: AttentionProblem, b: AttentionProblem, backend: str, dtype: str, sel=np.s_[...]):
    """run(a)[sel] and run(b)[sel] have the same true value; each may err by its own bound."""
    ra, rb = _judged(a, backend, dtype), _judged(b, backend, dtype)
    tol = ra.tolerance[sel] + rb.tolerance[sel]
    return run(a)[sel], run(b)[sel], tol


# --- invariants of any correct causal attention -------------------------------------------


def causal(run: Runner, problem: AttentionProblem, backend: str, dtype: str, m: int, future: np.ndarray) -> None:
    """Replacing the tokens at positions >= m never changes the outputs at positions < m."""
    x = problem.x.copy()
    x[..., m:, :] = future[..., m:, :]
    a, b, tol = _same(run, problem, replace(problem, x=x), backend, dtype, np.s_[..., :m, :])
    assert_within(a, b, tol, f"causality: changing positions >= {m} moved outputs < {m}")


def prefix_consistent(run: Runner, problem: AttentionProblem, backend: str, dtype: str, m: int) -> None:
    """Attention over the first m tokens equals the first m rows of attention over all."""
    prefix = replace(problem, x=problem.x[..., :m, :])
    full, short, tol = _same(run, problem, prefix, backend, dtype, np.s_[..., :m, :])
    assert_within(short, full, tol, f"prefix consistency at m={m}")


def batch_independent(run: Runner, problem: AttentionProblem, backend: str, dtype: str) -> None:
    """Each batch item's output depends only on that item: batched == one at a time."""
    x = problem.x.reshape(-1, problem.n_seq, problem.n_embd)
    batched = run(replace(problem, x=x))
    for i in range(x.shape[0]):
        single = replace(problem, x=x[i])
        ref = _judged(single, backend, dtype)
        assert_within(batched[i], run(single), 2 * ref.tolerance, f"batch item {i} of {x.shape[0]}")


def permute_heads(problem: AttentionProblem, perm: np.ndarray) -> AttentionProblem:
    """The same attention with its heads renumbered: q/k/v columns and c_proj rows permuted."""
    e, hd = problem.n_embd, problem.head_dim
    cols = (np.asarray(perm)[:, None] * hd + np.arange(hd)).ravel()  # new head h <- old head perm[h]
    qkv_cols = np.concatenate([cols, e + cols, 2 * e + cols])
    return replace(
        problem,
        c_attn_w=problem.c_attn_w[:, qkv_cols],
        c_attn_b=problem.c_attn_b[qkv_cols],
        c_proj_w=problem.c_proj_w[cols, :],
    )


def head_permutation_invariant(run: Runner, problem: AttentionProblem, backend: str, dtype: str, perm) -> None:
    """Renumbering the heads consistently (q, k, v and c_proj together) changes nothing."""
    a, b, tol = _same(run, problem, permute_heads(problem, perm), backend, dtype)
    assert_within(b, a, tol, f"head permutation {list(perm)}")


def shift_invariant(run: Runner, problem: AttentionProblem, backend: str, dtype: str, shift: np.ndarray) -> None:
    """softmax(z + c) = softmax(z): adding any vector to the key bias adds q·shift to a
    whole row of logits, which must not change the output."""
    b = problem.c_attn_b.copy()
    b[problem.n_embd : 2 * problem.n_embd] += shift
    a, c, tol = _same(run, problem, replace(problem, c_attn_b=b), backend, dtype)
    assert_within(c, a, tol, "softmax shift (key bias moved)")


def rows_sum_to_one(run: Runner, problem: AttentionProblem, backend: str, dtype: str) -> None:
    """With every value vector equal (W_v = 0, b_v = c), the output is c @ W_o + b_o exactly
    when each row of the attention matrix sums to 1."""
    e = problem.n_embd
    w = problem.c_attn_w.copy()
    w[:, 2 * e :] = 0.0
    constant = replace(problem, c_attn_w=w)
    ref = _judged(constant, backend, dtype)
    r = oracles.rounded(constant, backend, dtype)  # the values the backend really sees
    expected = np.broadcast_to(r.c_attn_b[2 * e :] @ r.c_proj_w + r.c_proj_b, ref.out.shape)
    assert_within(run(constant), expected, ref.tolerance, "attention rows sum to 1")
