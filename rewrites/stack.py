"""The real GPT-2 stack, chained as in the model, and incremental decoding through it.

`../shared/gpt2/` has every attention sublayer but no MLP, so with it this is honestly the
*attention path*: x_{i+1} = x_i + attn_i(ln_1_i(x_i)) for the 12 layers, then ln_f. Given a
complete checkpoint (a real `model.safetensors`, or the SYNTHETIC one of
`gpt2.synthetic_checkpoint`), every block also runs its MLP, x + mlp(ln_2(x)), and the tied
LM head turns the output into next-token logits: the full model, with greedy generation.
`weights.label` says which one ran.

`forward` runs it with a backend's oracle blocks (the reference); `decode` feeds the
tokens one at a time through the same layers with a per-layer KV cache, written once
against the array API. The cache has a fixed shape [..., n_head, n_max, head_dim]
and position t is written in place, so every step has the same shapes (JAX compiles one step function).

The cache may be laid out as inference servers do (`Cache`): "contiguous" (slot t holds
position t), "split_kv" (flash-decoding: the slots in SPLITS chunks, each with its own
max, sum and output, combined by log-sum-exp), or "paged" (pages of PAGE tokens in a pool,
in the shuffled order of a block table, read back through it). All must equal the full pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from array_api_compat import device

import oracles
from oracles import backends, model
from oracles.gpt2 import GPT2Weights, attention_path
from oracles.truth import layer_norm as ln64
from rewrites.catalogue.serving import PAGE, SPLITS, block_table, chunk, combine
from rewrites.common import array_namespace, linear, merge_heads, softmax, split_heads, split_qkv, write_at

Cache = Literal["contiguous", "split_kv", "paged"]
CACHES = ("contiguous", "split_kv", "paged")


def _arrays(weights: GPT2Weights, backend: str, dtype: str, n_layers: int | None) -> tuple[list[tuple], list, tuple]:
    """Per layer the attention tensors, per layer the MLP tensors (None without them), ln_f."""
    be = backends.get(backend)
    n = weights.config.n_layer if n_layers is None else n_layers
    attn = [tuple(be.asarray(weights[f"h.{i}.{k}"], dtype) for k in model.ATTN) for i in range(n)]
    mlps = [
        tuple(be.asarray(weights[f"h.{i}.{k}"], dtype) for k in model.MLP) if weights.is_complete else None
        for i in range(n)
    ]
    ln_f = tuple(be.asarray(weights[f"ln_f.{k}"], dtype) for k in ("weight", "bias"))
    return attn, mlps, ln_f


def gelu(xp, x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def mlp_residual(xp, x, ln_g, ln_b, c_fc_w, c_fc_b, c_proj_w, c_proj_b, eps: float):
    """x + mlp(ln_2(x)): [..., n_seq, n_embd] -> [..., n_seq, 4*n_embd] -> [..., n_seq, n_embd]."""
    return x + linear(gelu(xp, linear(layer_norm(xp, x, ln_g, ln_b, eps), c_fc_w, c_fc_b)), c_proj_w, c_proj_b)


def forward(weights: GPT2Weights, x: np.ndarray, backend: str, dtype: str, n_layers: int | None = None) -> np.ndarray:
    """The stack over the whole sequence with `backend`'s oracle blocks, then ln_f (the
    first `n_layers` layers only, if given): [..., n_seq, n_embd] -> same, float64 NumPy."""
    be, c = backends.get(backend), weights.config
    oracle = oracles.oracle(backend)
    attn, mlps, (g, b) = _arrays(weights, backend, dtype, n_layers)
    h = be.asarray(x, dtype)
    for layer, mlp in zip(attn, mlps, strict=True):
        h = oracle.block(h, *layer, c.n_head, c.eps)  # [..., n_seq, n_embd]
        if mlp is not None:
            h = mlp_residual(be.namespace, h, *mlp, c.eps)
    return be.to_numpy(oracle.layer_norm(h, g, b, c.eps))


def layer_norm(xp, x, g, b, eps: float):
    mean = xp.mean(x, axis=-1, keepdims=True)
    d = x - mean
    return d / xp.sqrt(xp.mean(d * d, axis=-1, keepdims=True) + eps) * g + b


def attend_cached(
    xp, h, t, k_cache, v_cache, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head: int, cache: Cache = "contiguous"
):
    """The attention sublayer for one token h [..., 1, n_embd] at position t: its k, v are
    written into the caches (slot t of [..., n_head, n_max, head_dim]; "paged": its page's
    offset in the pool [..., n_head, n_pages, PAGE, head_dim]), and it attends over
    positions 0..t. Returns (output [..., 1, n_embd], k_cache, v_cache)."""
    q, k, v = (split_heads(xp, s, n_head) for s in split_qkv(xp, linear(h, c_attn_w, c_attn_b)))  # [..., H, 1, hd]
    if cache == "paged":
        table = xp.asarray(block_table(k_cache.shape[-3]), device=device(k_cache))  # logical page -> slot in the pool
        k_cache, v_cache = write_page(k_cache, table, t, k), write_page(v_cache, table, t, v)
        keys, values = (read_paged(xp, c, table) for c in (k_cache, v_cache))  # [..., H, n_max, hd]
    else:
        k_cache, v_cache = write_slot(k_cache, t, k), write_slot(v_cache, t, v)
        keys, values = k_cache, v_cache
    n_max = keys.shape[-2]
    z = q @ xp.matrix_transpose(keys) / math.sqrt(q.shape[-1])  # [..., H, 1, n_max]
    z = xp.where(xp.arange(n_max) <= t, z, -math.inf)  # slots after t are empty
    if cache == "split_kv":
        size = max(1, math.ceil(n_max / SPLITS))
        o = combine(xp, [chunk(xp, z[..., j : j + size], values[..., j : j + size, :]) for j in range(0, n_max, size)])
    else:
        o = softmax(xp, z) @ values  # [..., H, 1, hd]
    return linear(merge_heads(xp, o), c_proj_w, c_proj_b), k_cache, v_cache


def decode_step(x_t, t, caches, layers, mlps, ln_f, n_head: int, eps: float, cache: Cache = "contiguous"):
    """One token [..., 1, n_embd] at position t through every layer; returns (ln_f output, caches).

    caches: per layer (k, v), each laid out as `cache` says; position t is written."""
    xp = array_namespace(x_t)
    new_caches = []
    for (ln_g, ln_b, *attn), mlp, (k_cache, v_cache) in zip(layers, mlps, caches, strict=True):
        a, k_cache, v_cache = attend_cached(
            xp, layer_norm(xp, x_t, ln_g, ln_b, eps), t, k_cache, v_cache, *attn, n_head, cache
        )
        x_t = x_t + a
        if mlp is not None:
            x_t = mlp_residual(xp, x_t, *mlp, eps)
        new_caches.append((k_cache, v_cache))
    return layer_norm(xp, x_t, *ln_f, eps), new_caches


def write_slot(cache, t, value):
    """cache[..., t, :] = value[..., 0, :]."""
    return write_at(cache, (t,), value)


def write_page(pool, table, t, value):
    """pool[..., table[t // PAGE], t % PAGE, :] = value[..., 0, :]: position t's page and offset."""
    return write_at(pool, (table[t // PAGE], t % PAGE), value)


def read_paged(xp, pool, table):
    """The pool [..., H, n_pages, PAGE, hd] read page by page through the block table: [..., H, n_pages*PAGE, hd]."""
    pages = xp.take(pool, table, axis=-3)  # logical page order
    return xp.reshape(pages, (*pool.shape[:-3], -1, pool.shape[-1]))


def decode(
    weights: GPT2Weights,
    x: np.ndarray,
    backend: str,
    dtype: str,
    n_layers: int | None = None,
    on_step: Callable[[int], None] | None = None,
    cache: Cache = "contiguous",
) -> np.ndarray:
    """Feed x [..., n_seq, n_embd] one token at a time; row t is step t's output (after ln_f).
    `cache`: how each layer's KV cache is laid out (module doc)."""
    be, c = backends.get(backend), weights.config
    xp = be.namespace
    attn, mlps, ln_f = _arrays(weights, backend, dtype, n_layers)
    *batch, n, _ = x.shape
    caches = _empty_caches(weights, backend, dtype, (*batch,), n, len(attn), cache)
    step, xs, outs = _step_function(backend), be.asarray(x, dtype), []
    for t in range(n):
        out, caches = step(xs[..., t : t + 1, :], t, caches, attn, mlps, ln_f, c.n_head, c.eps, cache)
        outs.append(out)
        if on_step:
            on_step(t)
    return be.to_numpy(xp.concat(outs, axis=-2))


def _empty_caches(
    weights: GPT2Weights, backend: str, dtype: str, batch: tuple, n_max: int, n_layers: int, cache: Cache = "contiguous"
) -> list:
    c, be = weights.config, backends.get(backend)
    slots = (n_max,) if cache != "paged" else (math.ceil(n_max / PAGE), PAGE)  # paged: a pool of pages
    shape = (*batch, c.n_head, *slots, c.n_embd // c.n_head)
    return [(be.asarray(np.zeros(shape), dtype), be.asarray(np.zeros(shape), dtype)) for _ in range(n_layers)]


def _step_function(backend: str) -> Callable:
    """decode_step compiled where the backend compiles: one compilation for all steps, the shapes never change."""
    return backends.get(backend).compile(decode_step, (6, 7, 8))


def generate(
    weights: GPT2Weights,
    prompt: list[int],
    n_new: int,
    backend: str,
    dtype: str,
    on_token: Callable[[int, np.ndarray], None] | None = None,
) -> list[int]:
    """Greedy generation with the KV cache (complete checkpoints only). The prompt's tokens
    go in one step each, then every step appends its likeliest next token. Returns the n_new
    new ids; `on_token(id, logits)` sees each as it comes, with its logits [n_vocab]."""
    model.require_complete(weights)
    if not prompt:
        raise ValueError("generate: the prompt has no tokens")
    be, c = backends.get(backend), weights.config
    xp = be.namespace
    attn, mlps, ln_f = _arrays(weights, backend, dtype, None)
    n_max = len(prompt) + n_new - 1  # the last new token is never fed back
    if n_max > c.n_ctx:
        raise ValueError(f"{len(prompt)} prompt + {n_new} new tokens exceed GPT-2's context of {c.n_ctx}")
    wte_t = be.asarray(weights["wte.weight"].T, dtype)  # [n_embd, n_vocab]
    caches, step = _empty_caches(weights, backend, dtype, (), max(n_max, 1), len(attn)), _step_function(backend)
    ids = list(prompt)
    for t in range(n_max):
        x_t = be.asarray(model.embed(weights, ids[t : t + 1], t, dtype), dtype)  # [1, n_embd]: token t
        out, caches = step(x_t, t, caches, attn, mlps, ln_f, c.n_head, c.eps)  # [1, n_embd]
        if t >= len(prompt) - 1:  # out predicts token t + 1
            logits = out[-1, :] @ wte_t  # [n_embd] -> [n_vocab]
            ids.append(int(xp.argmax(logits)))
            if on_token:
                on_token(ids[-1], be.to_numpy(logits))
    return ids[len(prompt) :]


def truth(weights: GPT2Weights, x: np.ndarray, n_layers: int | None = None) -> np.ndarray:
    """The stack in float64, then ln_f: the picoGPT-style model of oracles/model.py for a
    complete checkpoint, truth.py's attention along the attention path otherwise."""
    if weights.is_complete:
        return model.blocks(weights, x, "float64", n_layers)
    g, b = (np.asarray(weights[f"ln_f.{k}"], np.float64) for k in ("weight", "bias"))
    return ln64(attention_path(weights, x, n_layers)[-1], g, b, weights.config.eps)


def reference_limit(
    plain: np.ndarray, exact: np.ndarray, dtype: str, n_layers: int, reduction: int | None = None
) -> float:
    """How far a reordering of `plain` (the reference computed in `dtype`) may land from the
    float64 truth `exact`: FlashAttention's criterion, twice the reference's own worst error,
    plus the rounding of the path, which a lucky reference can miss: lambda sqrt(n) u max|y|
    per layer for reductions of length n (default n_embd). Higham & Mary 2019 (Thm 2.4): a
    length-n reduction stays within lambda sqrt(n) u of its magnitude with probability at
    least 1 - 2n exp(-lambda^2 / 2); `_confidence_lambda` solves that for a failure
    probability of MISS (lambda = 1, which bounds nothing, is what a CI run once exceeded)."""
    from oracles.truth import UNIT_ROUNDOFF

    n = exact.shape[-1] if reduction is None else reduction
    path = n_layers * _confidence_lambda(n) * math.sqrt(n) * UNIT_ROUNDOFF[dtype] * float(np.abs(exact).max())
    return 2 * float(np.abs(plain - exact).max()) + path


MISS = 1e-6  # the probability that one reduction's rounding exceeds the path term


def _confidence_lambda(n: int) -> float:
    """lambda with 2 n exp(-lambda^2 / 2) = MISS: 6.5 for n = 768, 6.7 for n = 3072."""
    return math.sqrt(2 * math.log(2 * n / MISS))


def within_reference_error(
    got: np.ndarray, plain: np.ndarray, exact: np.ndarray, dtype: str, n_layers: int, reduction: int | None = None
) -> tuple[bool, str]:
    """Is |got - exact| within `reference_limit`? Also a message with the numbers."""
    err = float(np.abs(got - exact).max()) if np.isfinite(got).all() else math.inf
    limit = reference_limit(plain, exact, dtype, n_layers, reduction)
    ref = float(np.abs(plain - exact).max())
    return err <= limit, f"error {err:.3g}, reference's error {ref:.3g}, limit {limit:.3g}"


def error_growth(
    weights: GPT2Weights, x: np.ndarray, backend: str, dtype: str, buckets: int = 4, cache: Cache = "contiguous"
) -> list[dict]:
    """Max |decode - truth| after each depth, per block of positions: how error grows."""
    n = x.shape[-2]
    edges = np.linspace(0, n, buckets + 1).astype(int)
    rows = []
    for depth in range(1, weights.config.n_layer + 1):
        err = np.abs(decode(weights, x, backend, dtype, depth, cache=cache) - truth(weights, x, depth))  # [..., n, e]
        per_pos = err.reshape(-1, n, err.shape[-1]).max(axis=(0, 2))
        rows.append(
            {
                "depth": depth,
                **{f"pos {a}-{b - 1}": float(per_pos[a:b].max()) for a, b in itertools.pairwise(edges)},
            }
        )
    return rows
