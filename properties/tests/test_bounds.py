"""The assumptions behind the derived bound (oracles/truth.py) hold on each backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles import backends
from oracles.truth import ACCUMULATOR, UNIT_ROUNDOFF, Precision, ground_truth
from properties.strategies import EXTREME, LARGE_LOGITS, attention_problems

TRUTH_DTYPES = tuple(UNIT_ROUNDOFF)  # every dtype a bound is derived for


@pytest.mark.dtypes("float16", "bfloat16")
def test_low_precision_matmul_and_sum_accumulate_in_float32(backend, dtype):
    """The bound takes ua = float32's roundoff for float16/bfloat16 reductions. Summing n
    ones in the dtype itself would stall at 2/u (2048 for float16, 256 for bfloat16)."""
    be = backends.get(backend)
    xp = be.namespace
    n = 4 * int(2 / UNIT_ROUNDOFF[dtype])
    ones = be.asarray(np.ones((1, n)), dtype)
    assert be.to_numpy(xp.matmul(ones, xp.reshape(ones, (n, 1))))[0, 0] == n
    assert float(be.to_numpy(xp.sum(ones))) == n
    assert ACCUMULATOR[dtype] == "float32"


def test_gamma_is_infinite_where_the_classical_bound_breaks_down():
    assert Precision("float32").gamma(10) == pytest.approx(10 * 2.0**-24 / (1 - 10 * 2.0**-24))
    assert Precision("float64").gamma(2**53) == np.inf


EXTREMES = attention_problems(x_scales=EXTREME, w_scales=EXTREME, logit_scales=LARGE_LOGITS)


@settings(max_examples=40, deadline=None)
@given(st.one_of(attention_problems(), EXTREMES))
def test_bounds_derived_together_are_each_dtypes_own(problem):
    """Truth.bounds shares the dtype-free parts among dtypes: each bound must have the bits it
    has when derived alone (a part computed for one dtype and reused for another would not)."""
    together = ground_truth(problem).bounds(TRUTH_DTYPES)
    for dtype in TRUTH_DTYPES:
        alone = ground_truth(problem).bound(dtype)
        assert together[dtype].tobytes() == alone.tobytes(), dtype
