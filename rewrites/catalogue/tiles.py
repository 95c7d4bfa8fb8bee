"""Attention as it is served, at the sizes it is served at: FlashAttention-2 tiles of 64 and 128,
chunked prefill against a growing KV cache, and decoding into a ring-buffer cache that wraps.

Each is exactly full causal attention for every n_seq; the sizes only decide which tile,
chunk and wraparound boundaries the inputs cross. `length_mutants` reuses these loops."""

import math

from array_api_compat import device

from rewrites.catalogue.softmax import _flash
from rewrites.common import (
    array_namespace,
    causal,
    heads_qkv,
    linear,
    project_out,
    scale,
    softmax,
    split_heads,
    split_qkv,
    write_at,
)
from rewrites.registry import rewrite


def attend(xp, q, k, v, allowed):
    """Softmax attention of q [..., H, nq, hd] over k, v [..., H, nk, hd] where `allowed` [nq, nk]."""
    z = q @ xp.matrix_transpose(k) * scale(q.shape[-1])  # [..., H, nq, nk]
    return softmax(xp, xp.where(allowed, z, -math.inf)) @ v  # [..., H, nq, hd]


def chunked_prefill(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, chunk: int, past_end: int = 0):
    """Prefill `chunk` tokens at a time: each chunk is projected, reads the cache of all earlier
    chunks plus itself under a causal mask, and appends its k, v to the cache.

    `past_end` < 0 reads the cache only up to that index (a boundary bug, see length_mutants)."""
    xp = array_namespace(x)
    cache_k = cache_v = None  # [..., H, c0, hd] the keys and values of the earlier chunks
    out = []
    for c0 in range(0, x.shape[-2], chunk):
        _, q, k_c, v_c = heads_qkv(x[..., c0 : c0 + chunk, :], c_attn_w, c_attn_b, n_head)  # [..., H, c, hd]
        k, v = k_c, v_c
        if c0:  # the first chunk has no past
            read = slice(0, c0 + past_end)  # past_end -1: key c0 - 1 is lost
            k = xp.concat([cache_k[..., read, :], k_c], axis=-2)  # [..., H, n_read + c, hd]
            v = xp.concat([cache_v[..., read, :], v_c], axis=-2)
        n_read = k.shape[-2] - q.shape[-2]  # the chunk's first query comes right after what it read
        out.append(attend(xp, q, k, v, causal(xp, q.shape[-2], k.shape[-2], offset=n_read)))  # [..., H, c, hd]
        cache_k = k_c if c0 == 0 else xp.concat([cache_k, k_c], axis=-2)  # [..., H, c0 + c, hd]
        cache_v = v_c if c0 == 0 else xp.concat([cache_v, v_c], axis=-2)
    return project_out(xp, xp.concat(out, axis=-2), c_proj_w, c_proj_b)  # [..., n_seq, n_embd]


def ring_decode(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, capacity: int, start: int = 0):
    """Decode token by token into a preallocated ring buffer of `capacity` slots, the write
    pointer starting at slot `start`; each slot records the position it holds (-1: empty),
    and attention reads every slot, masked to those holding positions 0..t.

    When n_seq > capacity the oldest entries are overwritten (ring_buffer_overflow_1000)."""
    xp = array_namespace(x)
    shape = (*x.shape[:-2], n_head, capacity, x.shape[-1] // n_head)
    k_buf = xp.zeros(shape, dtype=x.dtype, device=device(x))  # [..., H, cap, hd] empty slots weigh 0; 0 * NaN would not
    v_buf = xp.zeros(shape, dtype=x.dtype, device=device(x))
    pos = xp.full((capacity,), -1)  # [cap] the position each slot holds
    slots = xp.arange(capacity)  # [cap]
    out = []
    for t in range(x.shape[-2]):
        qkv = split_qkv(xp, linear(x[..., t : t + 1, :], c_attn_w, c_attn_b))  # [..., 1, n_embd] x3
        q, k, v = (split_heads(xp, s, n_head) for s in qkv)  # [..., H, 1, hd]
        slot = (start + t) % capacity  # the slot written now
        k_buf, v_buf = write_at(k_buf, (slot,), k), write_at(v_buf, (slot,), v)  # [..., H, cap, hd]
        pos = xp.where(slots == slot, t, pos)  # [cap]
        allowed = ((pos >= 0) & (pos <= t))[None, :]  # [1, cap] filled slots, none from the future
        out.append(project_out(xp, attend(xp, q, k_buf, v_buf, allowed), c_proj_w, c_proj_b))  # [..., 1, n_embd]
    return xp.concat(out, axis=-2)  # [..., n_seq, n_embd]


@rewrite(family="tiles", claim="equivalent")
def flash_tiled_block64(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """FlashAttention-2 forward, key tiles of 64 in order with an online softmax, future tiles skipped."""
    return _flash(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, block=64)


@rewrite(family="tiles", claim="equivalent")
def flash_tiled_block128(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """FlashAttention-2 forward, key tiles of 128 in order with an online softmax, future tiles skipped."""
    return _flash(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, block=128)


@rewrite(family="tiles", claim="equivalent")
def chunked_prefill_256(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Chunked prefill, 256 queries at a time, each chunk attending to the cached keys of earlier chunks."""
    return chunked_prefill(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, chunk=256)


@rewrite(family="tiles", claim="equivalent")
def ring_buffer_kv_cache(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Token-by-token decoding into a ring-buffer KV cache of n_seq slots whose write pointer wraps mid-sequence.

    The pointer starts at slot n_seq // 2 + 1, so the second half of the sequence is written
    from slot 0 again: the cache holds the tokens out of order and the mask must follow the
    positions the slots hold, not the slot indices. Nothing is ever overwritten."""
    n = x.shape[-2]
    return ring_decode(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, capacity=n, start=(n // 2 + 1) % n)
