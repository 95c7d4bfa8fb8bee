"""Reordering the softmax: streaming, deferred normalisation, log-sum-exp, exp2, tiling."""

import math

from rewrites.common import causal, heads_qkv, logits, project_out, scale
from rewrites.registry import rewrite


@rewrite(family="softmax", claim="unstable")
def no_max_subtraction(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """exp(z) / sum(exp(z)) without subtracting the row max: exp overflows on large logits."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    e = xp.exp(logits(xp, q, k))
    return project_out(xp, e / xp.sum(e, axis=-1, keepdims=True) @ v, c_proj_w, c_proj_b)


@rewrite(family="softmax", claim="equivalent")
def deferred_normalisation(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Multiply unnormalised exp(z - max) by v, divide by the row sum afterwards."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = logits(xp, q, k)
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return project_out(xp, (e @ v) / xp.sum(e, axis=-1, keepdims=True), c_proj_w, c_proj_b)


@rewrite(family="softmax", claim="equivalent")
def log_sum_exp(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """p = exp(z - logsumexp(z)), the log-domain form."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = logits(xp, q, k)
    m = xp.max(z, axis=-1, keepdims=True)
    lse = m + xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True))
    return project_out(xp, xp.exp(z - lse) @ v, c_proj_w, c_proj_b)


@rewrite(family="softmax", claim="equivalent")
def exp2_folded_scale(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """exp2 with log2(e) folded into the 1/sqrt(d) scale, as fast kernels do."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = q @ xp.matrix_transpose(k) * (math.log2(math.e) / math.sqrt(q.shape[-1]))
    z = xp.where(causal(xp, q.shape[-2]), z, -math.inf)
    e = xp.exp2(z - xp.max(z, axis=-1, keepdims=True))
    return project_out(xp, e / xp.sum(e, axis=-1, keepdims=True) @ v, c_proj_w, c_proj_b)


@rewrite(family="softmax", claim="equivalent")
def online_softmax(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Stream over keys one at a time with a running max and sum, rescaling the accumulator."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = logits(xp, q, k)  # [..., H, n, n]
    m = z[..., 0:1]  # key 0 is visible to every query, so the running max starts finite
    total = xp.ones_like(m)
    acc = v[..., 0:1, :] * total  # [..., H, n, hd]
    for j in range(1, z.shape[-1]):
        m_new = xp.maximum(m, z[..., j : j + 1])
        alpha, p = xp.exp(m - m_new), xp.exp(z[..., j : j + 1] - m_new)
        total = total * alpha + p
        acc = acc * alpha + p * v[..., j : j + 1, :]
        m = m_new
    return project_out(xp, acc / total, c_proj_w, c_proj_b)


def _update_rows(xp, old, new, start: int):
    """old with its rows from `start` on replaced by `new` (rows before it are final), without writing in place."""
    return xp.concat([old[..., :start, :], new], axis=-2)


def _flash(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, block: int):
    """FlashAttention-2's forward: key tiles in order with an online softmax, every query tile
    at once (on a GPU they run in parallel). A key tile meets only the query rows at or
    after its first key, so tiles wholly in the future are never computed; each row sees
    the same tiles of keys, in the same order, as a query tile of FA2 does."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., H, n, hd]
    n = q.shape[-2]
    m = total = acc = None  # per query row: running max, running sum, unnormalised output
    for kj in range(0, n, block):
        kt, vt = k[..., kj : kj + block, :], v[..., kj : kj + block, :]  # [..., H, bk, hd]
        s = q[..., kj:, :] @ xp.matrix_transpose(kt) * scale(q.shape[-1])  # rows kj.. : [..., H, n-kj, bk]
        s = xp.where(causal(xp, n - kj, kt.shape[-2]), s, -math.inf)  # row kj+r sees key kj+c iff c <= r
        m_tile = xp.max(s, axis=-1, keepdims=True)  # key kj is visible to every row here: finite
        if m is None:
            p = xp.exp(s - m_tile)
            m, total, acc = m_tile, xp.sum(p, axis=-1, keepdims=True), p @ vt
            continue
        m_new = xp.maximum(m[..., kj:, :], m_tile)  # [..., H, n-kj, 1]
        alpha, p = xp.exp(m[..., kj:, :] - m_new), xp.exp(s - m_new)
        total = _update_rows(xp, total, total[..., kj:, :] * alpha + xp.sum(p, axis=-1, keepdims=True), kj)
        acc = _update_rows(xp, acc, acc[..., kj:, :] * alpha + p @ vt, kj)
        m = _update_rows(xp, m, m_new, kj)
    return project_out(xp, acc / total, c_proj_w, c_proj_b)


def _flash_rewrite(block: int):
    def fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        return _flash(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, block)

    fn.__doc__ = f"Tiled FlashAttention-2-style forward, key tiles of {block}, online softmax across them."
    return rewrite(family="softmax", claim="equivalent", name=f"flash_tiled_block{block}")(fn)


flash_tiled_block2 = _flash_rewrite(2)
flash_tiled_block3 = _flash_rewrite(3)
flash_tiled_block16 = _flash_rewrite(16)
