"""Grouped-query and multi-query attention at the core level: `fn(q, k, v)` with k and v of
n_kv_head heads (half of n_head, or one), each shared by a group of consecutive query heads.

The verifier gives these kernels problems whose key and value heads are tied in those groups
(`Rewrite.takes`), so each is judged against exact multi-head attention. GPT-2 has no
grouped heads: its real layers are judged with their heads tied the same way."""

from rewrites.common import array_namespace, logits, softmax
from rewrites.registry import rewrite


def _attention(xp, q, k, v):
    """Causal attention with as many k, v heads as query heads: [..., H, n, hd] x3 -> [..., H, n, hd]."""
    return softmax(xp, logits(xp, q, k)) @ v


@rewrite(family="gqa", claim="equivalent", level="core", kv_heads="half")
def gqa_repeat_interleave(q, k, v):
    """Grouped-query attention: each k, v head repeated for its group (repeat_interleave), then attention."""
    xp = array_namespace(q)
    g = q.shape[-3] // k.shape[-3]
    return _attention(xp, q, *(xp.repeat(t, g, axis=-3) for t in (k, v)))  # [..., H, n, hd]


@rewrite(family="gqa", claim="equivalent", level="core", kv_heads="half")
def gqa_grouped_matmul(q, k, v):
    """Grouped-query attention without copying k and v: a group's query heads in one matmul with their shared head."""
    xp = array_namespace(q)
    *batch, h, n, hd = q.shape
    kv = k.shape[-3]
    qg = xp.reshape(q, (*batch, kv, h // kv, n, hd))  # [..., KV, g, n, hd]
    kg, vg = (xp.reshape(t, (*batch, kv, 1, n, hd)) for t in (k, v))  # [..., KV, 1, n, hd] broadcast over g
    return xp.reshape(_attention(xp, qg, kg, vg), q.shape)  # [..., H, n, hd]


@rewrite(family="gqa", claim="equivalent", level="core", kv_heads="one")
def mqa_broadcast(q, k, v):
    """Multi-query attention: one k, v head broadcast over every query head."""
    return _attention(array_namespace(q), q, k, v)  # [..., 1, n, hd] broadcasts against [..., H, n, hd]


@rewrite(family="gqa", claim="inequivalent", level="core", kv_heads="half")
def gqa_tile_not_interleave(q, k, v):
    """Grouped-query attention that repeats the k, v heads with `tile` (torch's .repeat), not repeat_interleave.

    Query head h then reads k, v head h mod n_kv_head instead of h // group: right for one
    k, v head or one head per group, wrong from n_head 4 (two groups of two) on."""
    xp = array_namespace(q)
    g = q.shape[-3] // k.shape[-3]
    reps = (1,) * (k.ndim - 3) + (g, 1, 1)
    return _attention(xp, q, *(xp.tile(t, reps) for t in (k, v)))  # heads [kv0, kv1, .., kv0, kv1, ..]
