"""The assumptions behind the derived bound (oracles/truth.py) hold on each backend."""

from __future__ import annotations

import numpy as np
import pytest

from oracles import backends
from oracles.truth import ACCUMULATOR, UNIT_ROUNDOFF, Precision


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
