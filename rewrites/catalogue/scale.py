"""Where the 1/sqrt(head_dim) goes: on q, on k, on the scores, or into W_q."""

import math

from rewrites.common import array_namespace, causal, heads_qkv, project_out, scale, softmax
from rewrites.registry import rewrite


def _attend_prescaled(xp, q, k, v, c_proj_w, c_proj_b):
    """Attention whose scale was already applied somewhere upstream."""
    z = xp.where(causal(xp, q.shape[-2]), q @ xp.matrix_transpose(k), -math.inf)
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)


@rewrite(family="scale", claim="equivalent")
def scale_on_q(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """(q / sqrt(d)) @ k^T."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return _attend_prescaled(xp, q / math.sqrt(q.shape[-1]), k, v, c_proj_w, c_proj_b)


@rewrite(family="scale", claim="equivalent")
def scale_on_k(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """q @ (k / sqrt(d))^T."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return _attend_prescaled(xp, q, k / math.sqrt(q.shape[-1]), v, c_proj_w, c_proj_b)


@rewrite(family="scale", claim="equivalent")
def scale_multiplied_on_scores(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """(q @ k^T) * (1/sqrt(d)): a multiplication by the rounded reciprocal instead of a division."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = q @ xp.matrix_transpose(k) * scale(q.shape[-1])
    z = xp.where(causal(xp, q.shape[-2]), z, -math.inf)
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)


@rewrite(family="scale", claim="equivalent")
def scale_folded_into_w_q(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Pre-multiply the q columns of c_attn (weight and bias) by 1/sqrt(d), once, offline."""
    xp = array_namespace(x)
    e = x.shape[-1]
    s = scale(e // n_head)
    factor = xp.concat([xp.full((e,), s, dtype=x.dtype), xp.ones((2 * e,), dtype=x.dtype)])
    xp, q, k, v = heads_qkv(x, c_attn_w * factor, c_attn_b * factor, n_head)
    return _attend_prescaled(xp, q, k, v, c_proj_w, c_proj_b)
