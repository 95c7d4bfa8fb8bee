"""Public Hypothesis strategies for attention problems.

Every strategy here generates `oracles.problem.AttentionProblem`s (float64 NumPy arrays
plus `n_head`). Values are drawn elementwise, so Hypothesis shrinks a failure towards
few tokens, one head, head_dim 1, no batch and values like 0 and 1: a counterexample a
person can read.

    @given(attention_problems())                # synthetic, moderate magnitudes
    @given(attention_problems(x_scales=EXTREME)) # large and tiny values too
    @given(attention_problems(logit_scales=LARGE_LOGITS)) # large logits
    @given(gpt2_problems(weights))              # one of the 12 real GPT-2 layers
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from oracles.gpt2 import GPT2Weights, attention_path, synthetic_stream
from oracles.problem import AttentionProblem
from oracles.truth import layer_norm

#: Scales of moderate inputs: logits stay within a few units.
MODERATE = (1.0, 0.5, 2.0)
#: Moderate scales plus large ones (logits in the thousands: exp overflows float32) and
#: tiny ones (values near float32's smallest normal numbers). Ordered so that shrinking,
#: which moves towards the front, finds the mildest scale that still fails.
EXTREME = (1.0, 0.5, 2.0, 8.0, 32.0, 128.0, 2.0**-10, 2.0**-60)

#: Extra factors on the query projection alone: logits of order 1e2..1e11 with ordinary
#: values everywhere else (exp(88) already overflows float32; a -1e4 mask leaks at 1e4;
#: picoGPT's -1e10 mask past 1e10, which only float64 holds within the bound).
LARGE_LOGITS = (1.0, 100.0, 3e4, 1e6, 1e11)

BATCHES = ((), (1,), (2,), (2, 1))


def unit_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of `shape` with elements in [-1, 1] (shrinking towards 0)."""
    return arrays(np.float64, shape, elements=st.floats(-1.0, 1.0, allow_subnormal=False))


def _sizes(limit: int | Sequence[int]) -> st.SearchStrategy[int]:
    return st.integers(1, limit) if isinstance(limit, int) else st.sampled_from(sorted(limit))


@st.composite
def shapes(
    draw: st.DrawFn,
    *,
    max_seq: int | Sequence[int] = 6,
    max_head: int | Sequence[int] = 3,
    max_head_dim: int | Sequence[int] = 4,
    batches=BATCHES,
) -> tuple[tuple[int, ...], int, int, int]:
    """(batch, n_seq, n_head, head_dim): batch is one of `batches`; each size is drawn from
    1..limit, or from the given sizes when a limit is a sequence (few distinct shapes keep
    JAX's per-shape compilation caches warm)."""
    return (
        draw(st.sampled_from(batches)),
        draw(_sizes(max_seq)),
        draw(_sizes(max_head)),
        draw(_sizes(max_head_dim)),
    )


@st.composite
def attention_problems(
    draw: st.DrawFn,
    *,
    max_seq: int | Sequence[int] = 6,
    max_head: int | Sequence[int] = 3,
    max_head_dim: int | Sequence[int] = 4,
    batches=BATCHES,
    x_scales=MODERATE,
    w_scales=MODERATE,
    logit_scales=(1.0,),
    min_seq: int = 1,
) -> AttentionProblem:
    """A synthetic attention problem.

    x has elements in [-1, 1] times a scale from `x_scales`; the weights have elements in
    [-1, 1] times a scale from `w_scales` over sqrt(n_embd), the usual initialisation, so
    with MODERATE scales q, k, v are O(1) and logits a few units at most. The query
    columns of c_attn are further multiplied by a factor from `logit_scales`, which scales
    the logits alone (e.g. LARGE_LOGITS).
    """
    batch, n_seq, n_head, head_dim = draw(
        shapes(max_seq=max_seq, max_head=max_head, max_head_dim=max_head_dim, batches=batches)
    )
    n_seq = max(n_seq, min_seq)
    n_embd = n_head * head_dim
    x_scale, w_scale = draw(st.sampled_from(x_scales)), draw(st.sampled_from(w_scales))
    logit_scale = draw(st.sampled_from(logit_scales))
    w = w_scale / math.sqrt(n_embd)
    q_factor = np.concatenate([np.full(n_embd, logit_scale), np.ones(2 * n_embd)])
    return AttentionProblem(
        x=draw(unit_arrays((*batch, n_seq, n_embd))) * x_scale,
        c_attn_w=draw(unit_arrays((n_embd, 3 * n_embd))) * w * q_factor,
        c_attn_b=draw(unit_arrays((3 * n_embd,))) * w * q_factor,
        c_proj_w=draw(unit_arrays((n_embd, n_embd))) * w,
        c_proj_b=draw(unit_arrays((n_embd,))) * w,
        n_head=n_head,
        label=f"synthetic x*{x_scale:g} w*{w_scale:g}" + (f" q*{logit_scale:g}" if logit_scale != 1 else ""),
    )


@st.composite
def gpt2_problems(draw: st.DrawFn, weights: GPT2Weights, *, max_seq: int = 16, layers=None) -> AttentionProblem:
    """One real GPT-2 attention sublayer (layer drawn from `layers`, default all 12) on a
    realistic input: synthetic token embeddings plus real positions (`synthetic_stream`),
    carried through the real attention path of the earlier layers, then the layer's ln_1."""
    layer = draw(st.sampled_from(layers if layers is not None else range(weights.config.n_layer)))
    n_seq = draw(st.integers(1, max_seq))
    seed = draw(st.integers(0, 2**16))
    stream = attention_path(weights, synthetic_stream(weights, n_seq, seed), layer)[-1]
    real = weights.layer(layer)
    return real.problem(layer_norm(stream, real.ln_g, real.ln_b, real.eps))
