"""Reordering the softmax: streaming, deferred normalisation, log-sum-exp, exp2, tiling."""

import math

from rewrites.common import causal, heads_qkv, logits, project_out
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


def _flash(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, block: int):
    """FlashAttention's forward: query tiles x key tiles, online softmax, future tiles skipped."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n, hd = q.shape[-2], q.shape[-1]
    tiles = []
    for qi in range(0, n, block):
        qb = q[..., qi : qi + block, :]  # [..., H, bq, hd]
        m = acc = total = None
        for kj in range(0, min(qi + block, n), block):  # key tiles wholly in the future are skipped
            s = qb @ xp.matrix_transpose(k[..., kj : kj + block, :]) / math.sqrt(hd)  # [..., H, bq, bk]
            s = xp.where(causal(xp, s.shape[-2], s.shape[-1], offset=qi - kj), s, -math.inf)
            m_tile = xp.max(s, axis=-1, keepdims=True)
            m_new = m_tile if m is None else xp.maximum(m, m_tile)  # tile 0 holds key 0: finite
            p = xp.exp(s - m_new)
            alpha = None if m is None else xp.exp(m - m_new)
            pv, ps = p @ v[..., kj : kj + block, :], xp.sum(p, axis=-1, keepdims=True)
            acc, total = (pv, ps) if m is None else (acc * alpha + pv, total * alpha + ps)
            m = m_new
        tiles.append(acc / total)
    return project_out(xp, xp.concat(tiles, axis=-2), c_proj_w, c_proj_b)


def _flash_rewrite(block: int):
    def fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        return _flash(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, block)

    fn.__doc__ = f"Tiled FlashAttention-style forward, {block}x{block} tiles, online softmax across key tiles."
    return rewrite(family="softmax", claim="equivalent", name=f"flash_tiled_block{block}")(fn)


flash_tiled_block2 = _flash_rewrite(2)
flash_tiled_block3 = _flash_rewrite(3)
flash_tiled_block16 = _flash_rewrite(16)
