"""Only the last token's row: what greedy decoding needs. Scores become [1, n_seq], O(N)."""

import math

from rewrites.common import array_namespace, linear, project_out, scores, softmax, split_heads
from rewrites.registry import rewrite


@rewrite(family="last_token", claim="equivalent", output="last")
def last_token_only(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Keys and values for every position, a query for the final one only; it sees every key, so no mask."""
    xp = array_namespace(x)
    e = x.shape[-1]
    q = linear(x[..., -1:, :], c_attn_w[:, :e], c_attn_b[:e])  # [..., 1, n_embd]
    kv = linear(x, c_attn_w[:, e:], c_attn_b[e:])  # [..., n_seq, 2*n_embd]
    q, k, v = (split_heads(xp, t, n_head) for t in (q, kv[..., :e], kv[..., e:]))  # [..., H, *, hd]
    z = scores(xp, q, k)  # [..., H, 1, n_seq]
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)  # [..., 1, n_embd]


@rewrite(family="last_token", claim="equivalent", output="last")
def last_token_absorbed(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Last token with W_k and W_v absorbed: no key or value is formed, so O(N E H) in all.

    q.k_j = (W_k q).x_j + q.b_k, and q.b_k is the same for every j, so softmax drops it;
    sum_j p_j v_j = (sum_j p_j x_j) W_v + b_v because the p_j sum to 1. What is left per
    head is two passes over x instead of projecting all N tokens to keys and values."""
    xp = array_namespace(x)
    e = x.shape[-1]
    hd = e // n_head
    q = split_heads(xp, linear(x[..., -1:, :], c_attn_w[:, :e], c_attn_b[:e]), n_head)  # [..., H, 1, hd]
    w_k = xp.permute_dims(xp.reshape(c_attn_w[:, e : 2 * e], (e, n_head, hd)), (1, 2, 0))  # [H, hd, E]
    w_v = xp.permute_dims(xp.reshape(c_attn_w[:, 2 * e :], (e, n_head, hd)), (1, 0, 2))  # [H, E, hd]
    b_v = xp.reshape(c_attn_b[2 * e :], (n_head, 1, hd))  # [H, 1, hd]
    xs = x[..., None, :, :]  # [..., 1, N, E]: shared by every head
    z = (q @ w_k) @ xp.matrix_transpose(xs) / math.sqrt(hd)  # [..., H, 1, E] @ [..., 1, E, N] -> [..., H, 1, N]
    o = (softmax(xp, z) @ xs) @ w_v + b_v  # [..., H, 1, N] @ [..., 1, N, E] -> [..., H, 1, E] -> [..., H, 1, hd]
    return project_out(xp, o, c_proj_w, c_proj_b)  # [..., 1, n_embd]
