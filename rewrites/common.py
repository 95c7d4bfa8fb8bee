"""The vocabulary rewrites are written in: array-API helpers shared by the catalogue.

Everything takes and returns arrays of any array-API namespace (NumPy, JAX, PyTorch via
array-api-compat), and only Python scalars meet arrays, so dtypes are never widened.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

__all__ = [
    "array_namespace",
    "causal",
    "heads_qkv",
    "linear",
    "logits",
    "merge_heads",
    "project_out",
    "scale",
    "scores",
    "softmax",
    "split_heads",
    "split_qkv",
    "write_at",
]


def linear(x, w, b):
    """Conv1D: [..., n_in] @ [n_in, n_out] + [n_out] -> [..., n_out]."""
    return x @ w + b


def split_qkv(xp, qkv):
    """[..., n_seq, 3*n_embd] -> q, k, v, each [..., n_seq, n_embd]."""
    e = qkv.shape[-1] // 3
    return qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]


def split_heads(xp, t, n_head: int):
    """[..., n_seq, n_embd] -> [..., n_head, n_seq, head_dim]."""
    *batch, n_seq, n_embd = t.shape
    t = xp.reshape(t, (*batch, n_seq, n_head, n_embd // n_head))
    return xp.permute_dims(t, (*range(len(batch)), len(batch) + 1, len(batch), len(batch) + 2))


def merge_heads(xp, t):
    """[..., n_head, n_seq, head_dim] -> [..., n_seq, n_head*head_dim]."""
    *batch, n_head, n_seq, hd = t.shape
    t = xp.permute_dims(t, (*range(len(batch)), len(batch) + 1, len(batch), len(batch) + 2))
    return xp.reshape(t, (*batch, n_seq, n_head * hd))


def causal(xp, n_q: int, n_k: int | None = None, offset: int = 0):
    """[n_q, n_k] bool: query i (at position offset + i) may see key j iff j <= offset + i."""
    n_k = n_q if n_k is None else n_k
    return xp.arange(n_q)[:, None] + offset >= xp.arange(n_k)[None, :]


def softmax(xp, z):
    """Softmax over the last axis, max-subtracted."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def scale(head_dim: int) -> float:
    """GPT-2's score scale, 1/sqrt(head_dim), as a factor (multiplying by it rounds differently
    from dividing by sqrt(head_dim): see `scores`)."""
    return 1.0 / math.sqrt(head_dim)


def scores(xp, q, k):
    """q @ k^T / sqrt(head_dim), divided as picoGPT does: [..., nq, hd] x [..., nk, hd] -> [..., nq, nk]."""
    return q @ xp.matrix_transpose(k) / math.sqrt(q.shape[-1])


def heads_qkv(x, c_attn_w, c_attn_b, n_head: int):
    """The usual first half: fused projection, split, heads. Returns xp, q, k, v with
    q, k, v of shape [..., n_head, n_seq, head_dim]."""
    xp = array_namespace(x)
    q, k, v = split_qkv(xp, linear(x, c_attn_w, c_attn_b))  # [..., n_seq, n_embd] x3
    return xp, *(split_heads(xp, t, n_head) for t in (q, k, v))


def project_out(xp, o, c_proj_w, c_proj_b):
    """The usual last step: [..., n_head, n_seq, head_dim] -> merge heads -> c_proj -> [..., n_seq, n_embd]."""
    return linear(merge_heads(xp, o), c_proj_w, c_proj_b)


def logits(xp, q, k):
    """Scaled, causally masked scores: [..., n_head, n_seq, n_seq], -inf above the diagonal."""
    return xp.where(causal(xp, q.shape[-2], k.shape[-2]), scores(xp, q, k), -math.inf)


def write_at(cache, at: tuple, value):
    """cache[..., *at, :] = value[..., 0, :], a KV cache's slot written: the cache back.
    JAX arrays are immutable: `.at[].set` (in place under jit, and `at` may be traced);
    NumPy and PyTorch write in place, O(1) per step, where a masked copy of the whole cache
    would be O(cache size)."""
    where = (Ellipsis, *at, slice(None))
    if hasattr(cache, "at"):
        return cache.at[where].set(value[..., 0, :])
    cache[where] = value[..., 0, :]
    return cache
