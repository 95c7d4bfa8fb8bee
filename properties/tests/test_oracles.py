"""Every oracle agrees with the float64 truth within the derived bound (oracles/truth.py)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracles
from oracles import backends
from oracles.reference import reference
from oracles.truth import block_ground_truth
from properties.checks import assert_within, matches_truth, oracle_runner
from properties.strategies import EXTREME, attention_problems, gpt2_problems


@given(problem=attention_problems())
def test_oracle_matches_truth(backend, dtype, problem):
    matches_truth(oracle_runner(backend, dtype), problem, backend, dtype)


@given(problem=attention_problems(x_scales=EXTREME, w_scales=EXTREME))
def test_oracle_matches_truth_at_extreme_magnitudes(backend, dtype, problem):
    matches_truth(oracle_runner(backend, dtype), problem, backend, dtype)


@given(data=st.data())
def test_oracle_matches_truth_on_real_gpt2_layers(backend, dtype, gpt2_weights, data):
    problem = data.draw(gpt2_problems(gpt2_weights, max_seq=12), label="problem")
    matches_truth(oracle_runner(backend, dtype), problem, backend, dtype)


def test_oracles_keep_the_dtype(backend, dtype):
    problem = _tiny_problem()
    out = oracles.oracle(backend).attention(*oracles.as_backend(problem, backend, dtype), problem.n_head)
    assert str(out.dtype).rsplit(".", 1)[-1] == dtype


def test_inputs_beyond_the_dtype_s_range_are_inf_without_a_warning(backend, dtype):
    """An extreme example holds values no dtype can (1e300): inf in that dtype, as rounding
    says, and no warning (under warnings as errors a warning would be an exception)."""
    problem = _tiny_problem()
    problem = dataclasses.replace(problem, x=problem.x * 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = oracles.as_backend(problem, backend, dtype)[0]
        rounded = oracles.rounded(problem, backend, dtype).x
    with np.errstate(over="ignore"):
        want = np.isinf(np.asarray(problem.x, dtype="float32" if dtype == "bfloat16" else dtype))
    assert (np.isinf(backends.get(backend).to_numpy(x)) == want).all() and (np.isinf(rounded) == want).all()


def _tiny_problem() -> oracles.AttentionProblem:
    rng = np.random.default_rng(0)
    e = 4
    return oracles.AttentionProblem(
        rng.normal(size=(2, 3, e)),
        rng.normal(size=(e, 3 * e)),
        rng.normal(size=3 * e),
        rng.normal(size=(e, e)),
        rng.normal(size=e),
        n_head=2,
    )


@pytest.fixture(scope="session")
def full_context_layers(gpt2_weights) -> list[oracles.AttentionProblem]:
    """Each real layer's problem at n_seq 1024: the attention path's residual stream through
    the real ln_1, as the verdicts see it (computed once, kept on disk, shared with them)."""
    from rewrites.verify.inputs import FULL_CONTEXT, RealLayers

    return RealLayers(gpt2_weights, FULL_CONTEXT).full


@pytest.mark.parametrize("layer", range(12), ids=lambda i: f"layer{i}")
def test_real_gpt2_layers_at_full_context_float32(full_context_layers, pytestconfig, layer):
    """All 12 real sublayers at n_seq 1024, float32, every installed backend. The truth and
    its tolerance come from the cache the verdicts use (the same content, the same values)."""
    problem = full_context_layers[layer]
    ran = 0
    for backend in pytestconfig.getoption("backend") or backends.available():
        if backends.unavailable_reason(backend):
            continue
        ref = reference(problem, backend, "float32")
        assert_within(oracles.run(backend, problem, "float32"), ref.out, ref.tolerance, f"{backend}")
        ran += 1
    assert ran, "no backend ran"


@pytest.mark.dtypes("float64", "float32")
@pytest.mark.parametrize("layer", [0, 5, 11], ids=lambda i: f"layer{i}")
def test_real_gpt2_block_with_ln_1(backend, dtype, gpt2_weights, layer):
    """The pre-LN block x + attn(ln_1(x)) of a real layer, on the attention-path stream."""
    real = gpt2_weights.layer(layer)
    x = oracles.gpt2.attention_path(gpt2_weights, oracles.gpt2.synthetic_stream(gpt2_weights, 64, seed=1), layer)[-1]
    be = backends.get(backend)
    x = be.round_trip(x, dtype)
    weights = [
        be.round_trip(a, dtype)
        for a in (real.ln_g, real.ln_b, real.c_attn_w, real.c_attn_b, real.c_proj_w, real.c_proj_b)
    ]
    truth = block_ground_truth(x, weights[0], weights[1], real.problem(x), real.eps, [dtype])
    args = [be.asarray(a, dtype) for a in (x, *weights)]
    out = be.to_numpy(oracles.oracle(backend).block(*args, real.n_head, real.eps))
    assert_within(out, truth.out, truth.tolerance(dtype), f"block of layer {layer}")
