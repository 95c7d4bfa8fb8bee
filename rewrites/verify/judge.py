"""Judging an output: against the float64 truth within its derived bound, and bit for bit
against the backend's own oracle; `References` holds both for every rewrite of a process
(they all see the same problems)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import oracles
from oracles import backends
from oracles.problem import AttentionProblem
from oracles.reference import (
    DISK_MIN_ELEMENTS,
    LRU,
    Reference,
    excess,
    file_fingerprint,
    reference,
    rounded_key,
    size,
    stored,
)
from rewrites.verify.execute import NONDETERMINISM, output_rows, run_rewrite

if TYPE_CHECKING:
    from rewrites.registry import Rewrite


#: Bytes of oracle outputs a process keeps in memory (long ones are also on disk). A count
#: (it was 20,000 outputs) bounds nothing: one output at 2049 tokens is up to 25 MB.
ORACLE_BYTES = 512 * 2**20


class References:
    """What outputs are judged against, shared by every rewrite (they see the same
    problems): the float64 truth with its bound, and each backend's oracle output."""

    def __init__(self, limit: int = ORACLE_BYTES) -> None:
        self.oracles = LRU(limit)

    def truth(self, problem: AttentionProblem, backend: str, dtype: str) -> Reference:
        """The truth's output and tolerance (oracles.reference: in memory, long ones on disk)."""
        return reference(problem, backend, dtype)

    def representable(self, problem: AttentionProblem, backend: str, dtype: str) -> bool:
        return self.truth(problem, backend, dtype).representable

    def oracle(self, problem: AttentionProblem, backend: str, dtype: str) -> np.ndarray:
        """The backend's oracle output (in memory; long ones on disk, keyed by the oracle's code)."""
        # the oracle sees the rounded inputs; its output depends on the device it ran on
        key = (rounded_key(problem, backend, dtype)[0], backend, backends.get(backend).device)
        out = self.oracles.get(key)
        if out is None:
            run = lambda: oracles.run(backend, problem, dtype)
            if size(problem) >= DISK_MIN_ELEMENTS:
                code = file_fingerprint(oracles.oracle(backend).__file__)
                run = functools.partial(stored, ("oracle", code, *key, dtype), problem.x.shape, run)
            out = run()
            self.oracles.put(key, out, out.nbytes)
        return out


@dataclass(frozen=True)
class Outcome:
    """How one output compares with the truth."""

    ratio: float  # max |error| / bound
    abs_error: float
    bitwise: bool  # equal to the backend's oracle bit for bit (when asked)
    nonfinite: bool
    out: np.ndarray  # the output rows the rewrite returned (float64)


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
    if ratio > 1:
        NONDETERMINISM.check(rw, backend, dtype, problem, out)
    same = bitwise and np.array_equal(out, refs.oracle(problem, backend, dtype)[sl])
    return Outcome(ratio, abs_err, same, nonfinite, out)
