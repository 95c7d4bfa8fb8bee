"""Running one rewrite on one problem: fresh inputs in the backend's dtype, the output
checked (shape, dtype) and brought back to float64, then judged against the truth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import oracles
from oracles import backends
from oracles.problem import AttentionProblem
from oracles.reference import Reference, excess, reference, rounded_key

if TYPE_CHECKING:
    from rewrites.registry import Rewrite

N_HEAD_ARG = (5,)  # n_head, the sixth argument of every rewrite, is a Python int (static under jit)


class RewriteFailed(Exception):
    """The rewrite raised, or returned something that is not a valid output."""


def run_rewrite(rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem) -> np.ndarray:
    """The rewrite's output as float64 NumPy, or RewriteFailed naming what went wrong."""
    be = backends.get(backend)
    impl = rw.implementation(backend)
    if impl is None:
        raise RewriteFailed(rw.load_error or f"{rw.name} has no implementation for {backend}")
    args = (*oracles.as_backend(problem, backend, dtype), problem.n_head)  # fresh arrays for every call
    try:
        out = be.runner(impl, args, N_HEAD_ARG)(*args)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise RewriteFailed(f"raised {type(e).__name__}: {first_line}") from e
    want = (*problem.x.shape[:-2], 1 if rw.output == "last" else problem.n_seq, problem.n_embd)
    shape, got_dtype = tuple(getattr(out, "shape", ())), str(getattr(out, "dtype", type(out).__name__))
    if shape != want:
        raise RewriteFailed(f"returned shape {list(shape)}, expected {list(want)} ({rw.output} output)")
    if got_dtype.rsplit(".", 1)[-1] != dtype:
        raise RewriteFailed(f"returned {got_dtype} for {dtype} inputs")
    try:
        return be.to_numpy(out)
    except Exception as e:
        raise RewriteFailed(f"returned a {type(out).__name__} that {backend} cannot read ({e})") from e


def output_rows(rw: Rewrite) -> tuple:
    """The rows of the full output that the rewrite returns."""
    return np.s_[..., -1:, :] if rw.output == "last" else np.s_[...]


class References:
    """What outputs are judged against, shared by every rewrite (they see the same
    problems): the float64 truth with its bound, and each backend's oracle output."""

    def __init__(self, limit: int = 20000) -> None:
        self.limit, self.oracles = limit, {}

    def truth(self, problem: AttentionProblem, backend: str, dtype: str) -> Reference:
        """The truth's output and tolerance (oracles.reference: in memory, long ones on disk)."""
        return reference(problem, backend, dtype)

    def representable(self, problem: AttentionProblem, backend: str, dtype: str) -> bool:
        return self.truth(problem, backend, dtype).representable

    def oracle(self, problem: AttentionProblem, backend: str, dtype: str) -> np.ndarray:
        key = (rounded_key(problem, backend, dtype)[0], backend)  # the oracle sees the rounded inputs
        if key not in self.oracles:
            if len(self.oracles) >= self.limit:
                self.oracles.pop(next(iter(self.oracles)))
            self.oracles[key] = oracles.run(backend, problem, dtype)
        return self.oracles[key]


@dataclass(frozen=True)
class Outcome:
    """How one output compares with the truth."""

    ratio: float  # max |error| / bound
    abs_error: float
    bitwise: bool  # equal to the backend's oracle bit for bit (when asked)
    nonfinite: bool


def judge(out: np.ndarray, expected: np.ndarray, tolerance: np.ndarray) -> tuple[float, float, bool]:
    """(max |error| / bound, max |error|, whether out has NaN or inf)."""
    finite = bool(np.isfinite(out).all())
    return excess(out, expected, tolerance), float(np.abs(out - expected).max()) if finite else math.inf, not finite


def outcome(
    rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem, refs: References, bitwise: bool
) -> Outcome:
    """Run the rewrite and compare it with the truth (and, if `bitwise`, the oracle's bits)."""
    out = run_rewrite(rw, backend, dtype, problem)
    truth, sl = refs.truth(problem, backend, dtype), output_rows(rw)
    ratio, abs_err, nonfinite = judge(out, truth.out[sl], truth.tolerance[sl])
    same = bitwise and np.array_equal(out, refs.oracle(problem, backend, dtype)[sl])
    return Outcome(ratio, abs_err, same, nonfinite)
