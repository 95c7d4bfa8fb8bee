"""Reference implementations of GPT-2 attention: one per backend, plus the float64 truth.

run(backend, problem, dtype) -> float64 NumPy output of that backend's oracle
ground_truth(problem)        -> Truth (float64 output + derived error bound)
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from oracles import backends
from oracles.problem import AttentionProblem
from oracles.truth import Truth, ground_truth

__all__ = ["AttentionProblem", "Truth", "as_backend", "ground_truth", "oracle", "run"]

_MODULES = {"numpy": "oracles.numpy_oracle", "jax": "oracles.jax_oracle", "torch": "oracles.torch_oracle"}


def oracle(backend: str) -> ModuleType:
    """The oracle module of `backend` (with `attention`, `layer_norm`, `block`).

    Raises backends.BackendUnavailable when the backend is not installed."""
    backends.get(backend)
    return importlib.import_module(_MODULES[backend])


def as_backend(problem: AttentionProblem, backend: str, dtype: str) -> tuple:
    """The problem's arrays as native `dtype` arrays of `backend`, in oracle argument order."""
    be = backends.get(backend)
    if dtype not in be.dtypes:
        raise ValueError(f"backend {backend!r} has no {dtype}; it supports {', '.join(be.dtypes)}")
    with np.errstate(over="ignore"):  # a value beyond the dtype's range is inf there, not a warning
        return tuple(be.asarray(a, dtype) for a in problem.arrays())


def rounded(problem: AttentionProblem, backend: str, dtype: str) -> AttentionProblem:
    """The problem as `backend` sees it in `dtype` (inputs rounded), back in float64.

    The truth is computed on these values, so a dtype's error is that of its arithmetic,
    not of representing the inputs."""
    be = backends.get(backend)
    with np.errstate(over="ignore"):
        arrays = [be.round_trip(a, dtype) for a in problem.arrays()]
    return AttentionProblem(*arrays, n_head=problem.n_head, label=problem.label, segments=problem.segments)


def run(backend: str, problem: AttentionProblem, dtype: str) -> np.ndarray:
    """Run `backend`'s oracle on `problem` in `dtype`; the output as float64 NumPy."""
    layout = {} if problem.segments is None else {"segments": backends.get(backend).asarray(problem.segments, "int64")}
    out = oracle(backend).attention(*as_backend(problem, backend, dtype), problem.n_head, **layout)
    return backends.get(backend).to_numpy(out)
