"""Incremental decoding through the real attention path (12 layers, then ln_f) with a
per-layer KV cache equals the full forward pass over the same prefix."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oracles import gpt2
from rewrites import stack


@pytest.mark.dtypes("float64", "float32")
@given(data=st.data())
def test_each_decode_step_equals_the_full_pass_over_its_prefix(backend, dtype, gpt2_weights, data):
    n = data.draw(st.integers(1, 5), label="n_seq")
    n_layers = data.draw(st.sampled_from([1, 2, 12]), label="n_layers")
    x = gpt2.synthetic_stream(gpt2_weights, n, seed=data.draw(st.integers(0, 2**16), label="seed"))
    decoded = stack.decode(gpt2_weights, x, backend, dtype, n_layers)
    exact = stack.truth(gpt2_weights, x, n_layers)
    for t in range(n):  # literally: the full pass over tokens 0..t, its last row
        full = stack.forward(gpt2_weights, x[: t + 1], backend, dtype, n_layers)[-1]
        ok, msg = stack.within_reference_error(decoded[t], full, exact[t], dtype, n_layers)
        assert ok, f"step {t} of {n}, {n_layers} layers: {msg}"


@pytest.fixture(scope="module")
def full_context(gpt2_weights) -> tuple[np.ndarray, np.ndarray]:
    """A 1024-token input and its float64 attention-path output (computed once)."""
    x = gpt2.synthetic_stream(gpt2_weights, gpt2_weights.config.n_ctx, seed=0)
    return x, stack.truth(gpt2_weights, x)


def test_decoding_1024_positions_through_the_real_stack(backend, gpt2_weights, full_context):
    """All 1024 positions of the context, 12 real layers, every step against the full pass
    (by causality its row t is the full pass over the prefix 0..t, a property the oracles pass)."""
    x, exact = full_context
    full = stack.forward(gpt2_weights, x, backend, "float32")
    decoded = stack.decode(gpt2_weights, x, backend, "float32")
    ok, msg = stack.within_reference_error(decoded, full, exact, "float32", gpt2_weights.config.n_layer)
    assert ok, msg
    assert np.isfinite(decoded).all()
