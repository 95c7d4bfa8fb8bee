"""Incremental decoding with cached keys and values, compared row by row with the full pass."""

from rewrites.common import array_namespace, linear, project_out, scores, softmax, split_heads, split_qkv
from rewrites.registry import rewrite


def decode_step(xp, x_t, cache, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """One token [..., 1, n_embd] through attention, appending its k, v to `cache` (a dict)."""
    q, k, v = (split_heads(xp, t, n_head) for t in split_qkv(xp, linear(x_t, c_attn_w, c_attn_b)))
    cache["k"] = k if cache.get("k") is None else xp.concat([cache["k"], k], axis=-2)  # [..., H, t+1, hd]
    cache["v"] = v if cache.get("v") is None else xp.concat([cache["v"], v], axis=-2)
    z = scores(xp, q, cache["k"])  # [..., H, 1, t+1]
    return project_out(xp, softmax(xp, z) @ cache["v"], c_proj_w, c_proj_b)  # [..., 1, n_embd]


@rewrite(family="kv_cache", claim="equivalent")
def kv_cache_decode(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Feed tokens one at a time, attending over a growing cache of keys and values."""
    xp, cache = array_namespace(x), {}
    steps = [
        decode_step(xp, x[..., t : t + 1, :], cache, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
        for t in range(x.shape[-2])
    ]
    return xp.concat(steps, axis=-2)


@rewrite(family="kv_cache", claim="equivalent")
def kv_cache_prefill_then_decode(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Prefill the first half as one causal pass that fills the cache, then decode the rest."""
    from rewrites.common import heads_qkv, logits

    xp = array_namespace(x)
    n_pre = (x.shape[-2] + 1) // 2
    _, q, k, v = heads_qkv(x[..., :n_pre, :], c_attn_w, c_attn_b, n_head)
    out = [project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)]
    cache = {"k": k, "v": v}
    for t in range(n_pre, x.shape[-2]):
        out.append(decode_step(xp, x[..., t : t + 1, :], cache, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head))
    return xp.concat(out, axis=-2)
