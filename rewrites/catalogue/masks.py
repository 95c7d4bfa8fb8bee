"""Ways to write the causal mask."""

import math

from rewrites.common import causal, heads_qkv, project_out, scores, softmax
from rewrites.registry import rewrite


def _scores(x, c_attn_w, c_attn_b, n_head):
    """Unmasked scaled scores [..., H, n, n], plus xp, v and the [n, n] causal mask."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return xp, scores(xp, q, k), v, causal(xp, q.shape[-2])


@rewrite(family="masks", claim="equivalent")
def mask_additive_neg_inf(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """scores + M with M = 0 on and below the diagonal, -inf above."""
    xp, z, v, allowed = _scores(x, c_attn_w, c_attn_b, n_head)
    bias = xp.where(allowed, xp.zeros_like(z[..., :1, :1]), -math.inf)  # [n, n] in z's dtype
    return project_out(xp, softmax(xp, z + bias) @ v, c_proj_w, c_proj_b)


@rewrite(family="masks", claim="unstable")
def mask_pico_minus_1e10(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """picoGPT's additive (1 - tri) * -1e10: leaks at logits near 1e10; NaN in float16 (0 * -inf).

    Fine at any logit GPT-2 produces. But -1e10 is a number, not -inf: once logits reach
    about 1e10 (which float64 holds within the bound, float32 does not) the future gets
    weight again; and in float16 -1e10 rounds to -inf, and 0 * -inf is NaN."""
    xp, z, v, allowed = _scores(x, c_attn_w, c_attn_b, n_head)
    tri = xp.astype(allowed, z.dtype)
    return project_out(xp, softmax(xp, z + (1 - tri) * -1e10) @ v, c_proj_w, c_proj_b)


@rewrite(family="masks", claim="equivalent")
def mask_finfo_min(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Masked scores set to the dtype's most negative finite number."""
    xp, z, v, allowed = _scores(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, xp.where(allowed, z, xp.finfo(z.dtype).min)) @ v, c_proj_w, c_proj_b)


@rewrite(family="masks", claim="equivalent")
def mask_where_neg_inf(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """where(allowed, scores, -inf)."""
    xp, z, v, allowed = _scores(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, xp.where(allowed, z, -math.inf)) @ v, c_proj_w, c_proj_b)


@rewrite(family="masks", claim="equivalent")
def lower_triangle_only(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Compute only the scores a query may see: row i against keys 0..i, no mask at all."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    rows = []
    for i in range(q.shape[-2]):
        z = scores(xp, q[..., i : i + 1, :], k[..., : i + 1, :])  # [..., H, 1, i+1]
        rows.append(softmax(xp, z) @ v[..., : i + 1, :])
    return project_out(xp, xp.concat(rows, axis=-2), c_proj_w, c_proj_b)


@rewrite(family="masks", claim="equivalent")
def causal_query_blocks(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Queries in 8 blocks, each scored only against the keys up to its last position.

    The tiles above the diagonal are all masked, so they are never computed: about 56% of
    the score and weights@v FLOPs (FlashAttention's causal skip, without its online
    softmax; each row's softmax still sees all of its keys at once). Eight blocks at every
    n_seq, so even the short sequences of a search cross block borders."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., H, n, hd]
    n = q.shape[-2]
    size = -(-n // 8)  # ceil(n / 8)
    out = []
    for start in range(0, n, size):
        end = min(start + size, n)
        z = scores(xp, q[..., start:end, :], k[..., :end, :])  # [..., H, b, end]
        z = xp.where(causal(xp, end - start, end, offset=start), z, -math.inf)
        out.append(softmax(xp, z) @ v[..., :end, :])  # [..., H, b, hd]
    return project_out(xp, xp.concat(out, axis=-2), c_proj_w, c_proj_b)
