"""The input projection: fused or separate, and einsum straight into heads."""

import math

from rewrites.common import array_namespace, causal, linear, logits, project_out, softmax, split_heads
from rewrites.registry import rewrite


@rewrite(family="projections", claim="equivalent")
def separate_qkv(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Three matmuls with W_q, W_k, W_v instead of one with the fused c_attn."""
    xp = array_namespace(x)
    e = x.shape[-1]
    q, k, v = (
        split_heads(xp, linear(x, c_attn_w[:, i * e : (i + 1) * e], c_attn_b[i * e : (i + 1) * e]), n_head)
        for i in range(3)
    )
    return project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)


@rewrite(family="projections", claim="equivalent")
def einsum_heads(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """einsum from x straight into [3, H, n, hd] and from heads straight through c_proj.

    einsum is not in the array API standard, but NumPy, JAX and PyTorch share its syntax."""
    xp = array_namespace(x)
    e = x.shape[-1]
    hd = e // n_head
    w = xp.reshape(c_attn_w, (e, 3, n_head, hd))
    b = xp.reshape(c_attn_b, (3, n_head, 1, hd))
    qkv = xp.einsum("...ne,eshd->...shnd", x, w) + b  # [..., 3, H, n, hd]
    q, k, v = qkv[..., 0, :, :, :], qkv[..., 1, :, :, :], qkv[..., 2, :, :, :]
    z = xp.einsum("...hqd,...hkd->...hqk", q, k) / math.sqrt(hd)
    z = xp.where(causal(xp, z.shape[-2]), z, -math.inf)
    o = xp.einsum("...hqk,...hkd->...hqd", softmax(xp, z), v)
    return xp.einsum("...hqd,hde->...qe", o, xp.reshape(c_proj_w, (n_head, hd, e))) + c_proj_b
