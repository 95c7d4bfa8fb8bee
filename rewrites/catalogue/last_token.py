"""Only the last token's row: what greedy decoding needs. Scores become [1, n_seq], O(N)."""

from rewrites.common import heads_qkv, linear, project_out, softmax, split_heads, split_qkv
from rewrites.registry import rewrite


@rewrite(family="last_token", claim="equivalent", output="last")
def last_token_only(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Project a query for the final position only; it sees every key, so no mask."""
    xp, _, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., H, n_seq, hd]
    q, _, _ = split_qkv(xp, linear(x[..., -1:, :], c_attn_w, c_attn_b))  # [..., 1, n_embd]
    q = split_heads(xp, q, n_head)  # [..., H, 1, hd]
    z = q @ xp.matrix_transpose(k) / q.shape[-1] ** 0.5  # [..., H, 1, n_seq]
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)  # [..., 1, n_embd]
