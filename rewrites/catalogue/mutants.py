"""Known-broken mutants: plausible bugs the verifier must catch, each with a counterexample."""

import math

from rewrites.catalogue.heads import batched_heads
from rewrites.catalogue.kv_cache import decode_step
from rewrites.common import (
    array_namespace,
    causal,
    heads_qkv,
    linear,
    logits,
    project_out,
    scale,
    scores,
    softmax,
    split_heads,
    split_qkv,
)
from rewrites.registry import rewrite


def _attend(xp, q, k, v, allowed, scale, c_proj_w, c_proj_b, axis=-1):
    z = xp.where(allowed, q @ xp.matrix_transpose(k) * scale, -math.inf)
    e = xp.exp(z - xp.max(z, axis=axis, keepdims=True))
    return project_out(xp, e / xp.sum(e, axis=axis, keepdims=True) @ v, c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def no_causal_mask(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Forgets the mask: every token sees the future."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, scores(xp, q, k)) @ v, c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def mask_off_by_one(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Mask shifted by one: each query also sees the next token."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n = q.shape[-2]
    return _attend(xp, q, k, v, causal(xp, n, n, offset=1), scale(q.shape[-1]), c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def softmax_wrong_axis(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Normalises over queries (axis -2) instead of keys."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n = q.shape[-2]
    return _attend(xp, q, k, v, causal(xp, n), scale(q.shape[-1]), c_proj_w, c_proj_b, axis=-2)


@rewrite(family="mutant", claim="inequivalent")
def scale_sqrt_n_embd(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Scale 1/sqrt(n_embd) instead of 1/sqrt(head_dim)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return _attend(xp, q, k, v, causal(xp, q.shape[-2]), 1 / math.sqrt(x.shape[-1]), c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def scale_one_over_head_dim(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Scale 1/head_dim instead of 1/sqrt(head_dim)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return _attend(xp, q, k, v, causal(xp, q.shape[-2]), 1 / q.shape[-1], c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def heads_merged_wrong_order(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Merges heads as [head_dim, n_head] instead of [n_head, head_dim] before c_proj."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    o = softmax(xp, logits(xp, q, k)) @ v  # [..., H, n, hd]
    nb = o.ndim - 3
    o = xp.permute_dims(o, (*range(nb), nb + 1, nb + 2, nb))  # [..., n, hd, H]: head index varies fastest
    return linear(xp.reshape(o, (*o.shape[:-2], x.shape[-1])), c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def value_bias_dropped(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Projects values without their bias (the query and key biases are kept)."""
    xp = array_namespace(x)
    e = x.shape[-1]
    bias = xp.concat([c_attn_b[: 2 * e], xp.zeros_like(c_attn_b[2 * e :])])
    xp, q, k, v = heads_qkv(x, c_attn_w, bias, n_head)
    return project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def linear_attention_elu(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Linear attention: softmax replaced by the feature map elu(x) + 1 (Katharopoulos et al.)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    phi = lambda t: xp.where(t > 0, t + 1, xp.exp(xp.minimum(t, 0.0)))
    a = xp.where(causal(xp, q.shape[-2]), phi(q) @ xp.matrix_transpose(phi(k)), 0.0)
    return project_out(xp, a / xp.sum(a, axis=-1, keepdims=True) @ v, c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent", output="last")
def last_token_wrong_row(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Last-token-only, but takes the query of the first token instead of the last."""
    xp, _, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    q, _, _ = split_qkv(xp, linear(x[..., :1, :], c_attn_w, c_attn_b))
    q = split_heads(xp, q, n_head)
    z = scores(xp, q, k)
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def kv_cache_missing_current_token(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """KV cache appended after attending, so a token never sees itself (token 0 is special-cased)."""
    xp, cache, steps = array_namespace(x), {}, []
    for t in range(x.shape[-2]):
        x_t = x[..., t : t + 1, :]
        if t == 0:  # nothing cached yet: fall back to the correct step
            steps.append(decode_step(xp, x_t, cache, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head))
            continue
        q, k, v = (split_heads(xp, s, n_head) for s in split_qkv(xp, linear(x_t, c_attn_w, c_attn_b)))
        z = scores(xp, q, cache["k"])
        steps.append(project_out(xp, softmax(xp, z) @ cache["v"], c_proj_w, c_proj_b))
        cache["k"], cache["v"] = xp.concat([cache["k"], k], axis=-2), xp.concat([cache["v"], v], axis=-2)
    return xp.concat(steps, axis=-2)


@rewrite(family="mutant", claim="unstable")
def mask_minus_1e4(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Additive mask of -1e4 (safe in float16's range): with logits near 1e4 the future leaks back in."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = scores(xp, q, k)
    z = z + (1 - xp.astype(causal(xp, q.shape[-2]), z.dtype)) * -1e4
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)


@rewrite(family="mutant", claim="inequivalent")
def microbatch_odd_item_dropped(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Batches in micro-batches of 2 that drop an odd last item (drop_last), left at zero.

    A single item runs alone, so batches of 1 and 2 are right; first fails with 3 items."""
    xp = array_namespace(x)
    items = xp.reshape(x, (-1, *x.shape[-2:]))  # [..., n_seq, n_embd] -> [B, n_seq, n_embd]
    b, w, attend = items.shape[0], (c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head), batched_heads.fn
    if b == 1:
        return attend(x, *w)
    done = [attend(items[i : i + 2], *w) for i in range(0, b - 1, 2)]  # whole pairs only: [2, n_seq, n_embd] each
    done += [xp.zeros_like(items[:1])] * (b % 2)  # the odd item out: [1, n_seq, n_embd]
    return xp.reshape(xp.concat(done, axis=0), x.shape)  # [B, n_seq, n_embd] -> [..., n_seq, n_embd]


@rewrite(family="mutant", claim="inequivalent")
def batch_dims_merged_transposed(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Two batch dimensions (e.g. sequences x beams) merged for the kernel in one order and
    split back in the other, so items trade places; right with one batch dimension, or
    where either has one item."""
    xp, w = array_namespace(x), (c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    if x.ndim != 4:
        return batched_heads.fn(x, *w)
    b1, b2, n, e = x.shape
    flat = xp.reshape(xp.permute_dims(x, (1, 0, 2, 3)), (b2 * b1, n, e))  # [b1, b2, n, e] -> [b2*b1, n, e]
    return xp.reshape(batched_heads.fn(flat, *w), (b1, b2, n, e))  # the bug: split as b1 x b2


@rewrite(family="mutant", claim="inequivalent")
def heads_in_pairs_odd_head_dropped(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Heads attended two at a time (a kernel tuned for pairs); an odd last head is left at zero.

    One head runs alone and every even count is right, GPT-2's 12 heads among them; first
    fails with 3 heads (GPT-2 XL has 25)."""
    if n_head == 1:
        return batched_heads.fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., H, n_seq, head_dim]
    pair = lambda t, h: t[..., h : h + 2, :, :]  # [..., 2, n_seq, head_dim]
    done = [softmax(xp, logits(xp, pair(q, h), pair(k, h))) @ pair(v, h) for h in range(0, n_head - 1, 2)]
    done += [xp.zeros_like(v[..., :1, :, :])] * (n_head % 2)  # the odd head out
    return project_out(xp, xp.concat(done, axis=-3), c_proj_w, c_proj_b)
