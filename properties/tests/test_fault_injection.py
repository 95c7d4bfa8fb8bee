"""The properties can fail: deliberately broken oracles must be caught.

Each fault is injected into the real NumPy oracle (by patching one of its helpers, or
by feeding it inputs that realise the fault), then the same property functions the
oracles pass are run and must raise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles import numpy_oracle
from properties import checks
from properties.checks import oracle_runner
from properties.strategies import attention_problems, unit_arrays

BACKEND, DTYPE = "numpy", "float64"


def _fails(prop) -> None:
    with pytest.raises(AssertionError):
        settings(max_examples=50, database=None)(prop)()


@pytest.fixture
def mask_shifted_by_one(monkeypatch):
    """Each query also sees the next token."""
    monkeypatch.setattr(numpy_oracle, "causal_mask", lambda n: np.tri(n, k=1, dtype=bool))


@pytest.fixture
def softmax_over_queries(monkeypatch):
    def wrong_axis(x):
        e = np.exp(x - np.max(x, axis=-2, keepdims=True))
        return e / np.sum(e, axis=-2, keepdims=True)

    monkeypatch.setattr(numpy_oracle, "softmax", wrong_axis)


def wrong_scale(problem):
    """Scores divided by sqrt(n_embd) instead of sqrt(head_dim): q scaled accordingly."""
    w, b = problem.c_attn_w.copy(), problem.c_attn_b.copy()
    f = math.sqrt(problem.head_dim / problem.n_embd)
    w[:, : problem.n_embd] *= f
    b[: problem.n_embd] *= f
    return numpy_oracle.attention(problem.x, w, b, problem.c_proj_w, problem.c_proj_b, problem.n_head)


def test_shifted_mask_breaks_truth_agreement(mask_shifted_by_one):
    @given(attention_problems(min_seq=2))
    def prop(problem):
        checks.matches_truth(oracle_runner(BACKEND, DTYPE), problem, BACKEND, DTYPE)

    _fails(prop)


def test_shifted_mask_breaks_causality(mask_shifted_by_one):
    @given(attention_problems(min_seq=2), st.data())
    def prop(problem, data):
        m = data.draw(st.integers(1, problem.n_seq - 1))
        checks.causal(
            oracle_runner(BACKEND, DTYPE), problem, BACKEND, DTYPE, m, data.draw(unit_arrays(problem.x.shape))
        )

    _fails(prop)


def test_wrong_scale_breaks_truth_agreement():
    @given(attention_problems(min_seq=2, max_head=3))
    def prop(problem):
        checks.matches_truth(wrong_scale, problem, BACKEND, DTYPE)

    _fails(prop)


def test_wrong_softmax_axis_breaks_rows_summing_to_one(softmax_over_queries):
    @given(attention_problems(min_seq=2))
    def prop(problem):
        checks.rows_sum_to_one(oracle_runner(BACKEND, DTYPE), problem, BACKEND, DTYPE)

    _fails(prop)


def test_the_unbroken_oracle_passes_the_same_properties():
    """Control: without a fault the very same property runs pass."""

    @given(attention_problems(min_seq=2))
    def prop(problem):
        checks.matches_truth(oracle_runner(BACKEND, DTYPE), problem, BACKEND, DTYPE)
        checks.rows_sum_to_one(oracle_runner(BACKEND, DTYPE), problem, BACKEND, DTYPE)

    settings(max_examples=50, database=None)(prop)()
