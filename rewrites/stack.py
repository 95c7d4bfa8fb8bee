"""The real attention path, chained as in GPT-2, and incremental decoding through it.

`../shared/gpt2/` has every attention sublayer but no MLP, so this is honestly the
*attention path*: x_{i+1} = x_i + attn_i(ln_1_i(x_i)) for the 12 layers, then ln_f.

`forward` runs it with a backend's oracle blocks (the reference); `decode` feeds the
tokens one at a time through the same layers with a per-layer KV cache, written once
against the array API. The cache has a fixed shape [..., n_head, n_max, head_dim]
and position t is written in place, so every step has the same shapes (JAX compiles one step function).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

import oracles
from oracles import backends
from oracles.gpt2 import GPT2Weights
from rewrites.common import array_namespace, linear, merge_heads, softmax, split_heads, split_qkv


def _arrays(weights: GPT2Weights, backend: str, dtype: str, n_layers: int | None) -> tuple[list[tuple], tuple]:
    be = backends.get(backend)
    layers = [
        tuple(be.asarray(a, dtype) for a in (L.ln_g, L.ln_b, L.c_attn_w, L.c_attn_b, L.c_proj_w, L.c_proj_b))
        for L in weights.layers()[:n_layers]
    ]
    ln_f = tuple(be.asarray(np.asarray(weights[f"ln_f.{k}"], np.float64), dtype) for k in ("weight", "bias"))
    return layers, ln_f


def forward(weights: GPT2Weights, x: np.ndarray, backend: str, dtype: str, n_layers: int | None = None) -> np.ndarray:
    """The attention path over the whole sequence with `backend`'s oracle blocks, then ln_f
    (the first `n_layers` layers only, if given)."""
    be, c = backends.get(backend), weights.config
    oracle = oracles.oracle(backend)
    layers, (g, b) = _arrays(weights, backend, dtype, n_layers)
    h = be.asarray(x, dtype)
    for layer in layers:
        h = oracle.block(h, *layer, c.n_head, c.eps)  # [..., n_seq, n_embd]
    return be.to_numpy(oracle.layer_norm(h, g, b, c.eps))


def layer_norm(xp, x, g, b, eps: float):
    mean = xp.mean(x, axis=-1, keepdims=True)
    d = x - mean
    return d / xp.sqrt(xp.mean(d * d, axis=-1, keepdims=True) + eps) * g + b


def decode_step(x_t, t, caches, layers, ln_f, n_head: int, eps: float):
    """One token [..., 1, n_embd] at position t through every layer; returns (ln_f output, caches).

    caches: per layer (k, v), each [..., n_head, n_max, head_dim]; position t is written."""
    xp = array_namespace(x_t)
    new_caches = []
    for (ln_g, ln_b, w, bias, wo, bo), (k_cache, v_cache) in zip(layers, caches, strict=True):
        h = layer_norm(xp, x_t, ln_g, ln_b, eps)
        q, k, v = (split_heads(xp, s, n_head) for s in split_qkv(xp, linear(h, w, bias)))  # [..., H, 1, hd]
        n_max = k_cache.shape[-2]
        k_cache, v_cache = write_slot(k_cache, t, k), write_slot(v_cache, t, v)
        z = q @ xp.matrix_transpose(k_cache) / math.sqrt(q.shape[-1])  # [..., H, 1, n_max]
        z = xp.where(xp.arange(n_max) <= t, z, -math.inf)  # slots after t are empty
        x_t = x_t + linear(merge_heads(xp, softmax(xp, z) @ v_cache), wo, bo)
        new_caches.append((k_cache, v_cache))
    return layer_norm(xp, x_t, *ln_f, eps), new_caches


def write_slot(cache, t, value):
    """cache[..., t, :] = value[..., 0, :]. JAX arrays are immutable: `.at[].set` (in place
    under jit, and t may be traced); NumPy and PyTorch write in place, O(1) per step."""
    if hasattr(cache, "at"):
        return cache.at[..., t, :].set(value[..., 0, :])
    cache[..., t, :] = value[..., 0, :]
    return cache


def decode(
    weights: GPT2Weights,
    x: np.ndarray,
    backend: str,
    dtype: str,
    n_layers: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Feed x [..., n_seq, n_embd] one token at a time; row t is step t's output (after ln_f)."""
    be, c = backends.get(backend), weights.config
    xp = be.namespace
    layers, ln_f = _arrays(weights, backend, dtype, n_layers)
    *batch, n, e = x.shape
    shape = (*batch, c.n_head, n, e // c.n_head)
    caches = [(be.asarray(np.zeros(shape), dtype), be.asarray(np.zeros(shape), dtype)) for _ in layers]
    step = decode_step
    if backend == "jax":  # one compilation for all n steps: the shapes never change
        import jax

        step = jax.jit(decode_step, static_argnums=(5, 6))
    xs, outs = be.asarray(x, dtype), []
    for t in range(n):
        out, caches = step(xs[..., t : t + 1, :], t, caches, layers, ln_f, c.n_head, c.eps)
        outs.append(out)
        if on_step:
            on_step(t)
    return be.to_numpy(xp.concat(outs, axis=-2))


def truth(weights: GPT2Weights, x: np.ndarray, n_layers: int | None = None) -> np.ndarray:
    """The attention path in float64 (oracles/truth.py), then ln_f."""
    from oracles.gpt2 import attention_path
    from oracles.truth import layer_norm as ln64

    g, b = (np.asarray(weights[f"ln_f.{k}"], np.float64) for k in ("weight", "bias"))
    return ln64(attention_path(weights, x, n_layers)[-1], g, b, weights.config.eps)


def within_reference_error(
    decoded: np.ndarray, full: np.ndarray, exact: np.ndarray, dtype: str, n_layers: int
) -> tuple[bool, str]:
    """FlashAttention's criterion: decoding is the same computation reordered, so it may err
    from the float64 truth by at most twice the full pass's own worst error, plus the
    typical rounding of the path, which a lucky reference can miss: sqrt(n_embd) u max|y|
    per layer (the probabilistic scale of a length-n_embd reduction, Higham & Mary 2019)."""
    from oracles.truth import UNIT_ROUNDOFF

    ref = float(np.abs(full - exact).max())
    got = float(np.abs(decoded - exact).max()) if np.isfinite(decoded).all() else math.inf
    path = n_layers * math.sqrt(exact.shape[-1]) * UNIT_ROUNDOFF[dtype] * float(np.abs(exact).max())
    limit = 2 * ref + path
    return got <= limit, f"decode error {got:.3g}, full-pass error {ref:.3g}, limit {limit:.3g}"


def error_growth(weights: GPT2Weights, x: np.ndarray, backend: str, dtype: str, buckets: int = 4) -> list[dict]:
    """Max |decode - truth| after each depth, per block of positions: how error grows."""
    n = x.shape[-2]
    edges = np.linspace(0, n, buckets + 1).astype(int)
    rows = []
    for depth in range(1, weights.config.n_layer + 1):
        err = np.abs(decode(weights, x, backend, dtype, depth) - truth(weights, x, depth))  # [..., n, e]
        per_pos = err.reshape(-1, n, err.shape[-1]).max(axis=(0, 2))
        rows.append(
            {
                "depth": depth,
                **{f"pos {a}-{b - 1}": float(per_pos[a:b].max()) for a, b in itertools.pairwise(edges)},
            }
        )
    return rows
