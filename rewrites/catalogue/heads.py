"""Splitting, looping, permuting and merging heads."""

import math

from rewrites.common import array_namespace, causal, heads_qkv, linear, logits, project_out, softmax
from rewrites.registry import rewrite


@rewrite(family="heads", claim="equivalent")
def per_head_loop(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """picoGPT style: slice each head's columns, attend, concatenate."""
    xp = array_namespace(x)
    qkv = linear(x, c_attn_w, c_attn_b)  # [..., n_seq, 3*n_embd]
    e = x.shape[-1]
    hd = e // n_head
    outs = []
    for h in range(n_head):
        q, k, v = (qkv[..., i * e + h * hd : i * e + (h + 1) * hd] for i in range(3))  # [..., n_seq, hd]
        outs.append(softmax(xp, logits(xp, q, k)) @ v)
    return linear(xp.concat(outs, axis=-1), c_proj_w, c_proj_b)


@rewrite(family="heads", claim="equivalent")
def batched_heads(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """All heads in one batched matmul over a [..., n_head, n_seq, head_dim] layout."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)


@rewrite(family="heads", claim="equivalent")
def heads_permuted(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Renumber the heads (reversed) in q, k, v and c_proj together; attention is per head."""
    xp = array_namespace(x)
    e = x.shape[-1]
    hd = e // n_head
    cols = [h * hd + i for h in reversed(range(n_head)) for i in range(hd)]
    idx = xp.asarray(cols + [e + c for c in cols] + [2 * e + c for c in cols])
    w, b = xp.take(c_attn_w, idx, axis=1), xp.take(c_attn_b, idx, axis=0)
    return batched_heads.fn(x, w, b, xp.take(c_proj_w, xp.asarray(cols), axis=0), c_proj_b, n_head)


@rewrite(family="heads", claim="equivalent")
def merged_qk_ov_circuits(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Per head W_QK = W_q W_k^T and W_OV = W_v W_o; bias terms constant along a row are dropped (shift invariance)."""
    xp = array_namespace(x)
    e = x.shape[-1]
    hd = e // n_head
    n = x.shape[-2]
    out = linear(c_attn_b[2 * e :], c_proj_w, c_proj_b)  # b_v W_o + b_o: rows of P sum to 1
    for h in range(n_head):
        wq, wk, wv = (c_attn_w[:, i * e + h * hd : i * e + (h + 1) * hd] for i in range(3))
        bq = c_attn_b[h * hd : (h + 1) * hd]
        w_qk = wq @ xp.matrix_transpose(wk)  # [n_embd, n_embd]
        w_ov = wv @ c_proj_w[h * hd : (h + 1) * hd, :]  # [n_embd, n_embd]
        # (x W_q + b_q)(x W_k + b_k)^T = x W_QK x^T + b_q W_k^T x^T + [terms constant per row]
        z = (x @ w_qk + bq @ xp.matrix_transpose(wk)) @ xp.matrix_transpose(x) / math.sqrt(hd)  # [..., n, n]
        z = xp.where(causal(xp, n), z, -math.inf)
        out = out + softmax(xp, z) @ (x @ w_ov)
    return out
