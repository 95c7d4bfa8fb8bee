"""Only the last token's row: what greedy decoding needs. Scores become [1, n_seq], O(N)."""

import math

from rewrites.common import array_namespace, linear, project_out, softmax, split_heads
from rewrites.registry import rewrite


@rewrite(family="last_token", claim="equivalent", output="last")
def last_token_only(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Keys and values for every position, a query for the final one only; it sees every key, so no mask."""
    xp = array_namespace(x)
    e = x.shape[-1]
    q = linear(x[..., -1:, :], c_attn_w[:, :e], c_attn_b[:e])  # [..., 1, n_embd]
    kv = linear(x, c_attn_w[:, e:], c_attn_b[e:])  # [..., n_seq, 2*n_embd]
    q, k, v = (split_heads(xp, t, n_head) for t in (q, kv[..., :e], kv[..., e:]))  # [..., H, *, hd]
    z = q @ xp.matrix_transpose(k) / math.sqrt(q.shape[-1])  # [..., H, 1, n_seq]
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)  # [..., 1, n_embd]
