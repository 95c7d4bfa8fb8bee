"""Invariants of any correct causal attention, checked on every oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from properties import checks
from properties.checks import oracle_runner
from properties.strategies import attention_problems, unit_arrays

problems = attention_problems(min_seq=2)


@given(problem=problems, data=st.data())
def test_causality(backend, dtype, problem, data):
    m = data.draw(st.integers(1, problem.n_seq - 1), label="m")
    future = data.draw(unit_arrays(problem.x.shape), label="future")
    checks.causal(oracle_runner(backend, dtype), problem, backend, dtype, m, future)


@given(problem=problems, data=st.data())
def test_prefix_consistency(backend, dtype, problem, data):
    m = data.draw(st.integers(1, problem.n_seq - 1), label="m")
    checks.prefix_consistent(oracle_runner(backend, dtype), problem, backend, dtype, m)


@given(problem=attention_problems(batches=((2,), (3,), (2, 2))))
def test_batch_independence(backend, dtype, problem):
    checks.batch_independent(oracle_runner(backend, dtype), problem, backend, dtype)


@given(problem=attention_problems(max_head=4), data=st.data())
def test_head_permutation_invariance(backend, dtype, problem, data):
    perm = data.draw(st.permutations(range(problem.n_head)), label="perm")
    checks.head_permutation_invariant(oracle_runner(backend, dtype), problem, backend, dtype, np.array(perm))


@given(problem=problems, data=st.data())
def test_softmax_shift_invariance(backend, dtype, problem, data):
    shift = data.draw(unit_arrays((problem.n_embd,)), label="shift")
    checks.shift_invariant(oracle_runner(backend, dtype), problem, backend, dtype, shift)


@given(problem=problems)
def test_attention_rows_sum_to_one(backend, dtype, problem):
    checks.rows_sum_to_one(oracle_runner(backend, dtype), problem, backend, dtype)
