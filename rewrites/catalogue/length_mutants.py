"""Mutants that only break at real lengths: each is exactly causal attention below a threshold
length (a window, a top-k, a tile, a chunk, a cache capacity) and wrong from it on, so a
search confined to short sequences calls them equivalent."""

import math

from rewrites.catalogue.tiles import attend, chunked_prefill, ring_decode
from rewrites.common import causal, heads_qkv, project_out, scale
from rewrites.registry import rewrite


def key_tiles(xp, q, k, v, tile: int, n_tiles: int, rescale: bool = True):
    """Online softmax over the first `n_tiles` key tiles of `tile` keys, all queries at once.

    q, k, v [..., H, n, hd] -> [..., H, n, hd]. `rescale=False` is the bug of forgetting to
    rescale the running sum and accumulator when the running max grows."""
    n = q.shape[-2]
    m = acc = total = None  # running max, unnormalised output, running sum
    for kj in range(0, n_tiles * tile, tile):
        s = q @ xp.matrix_transpose(k[..., kj : kj + tile, :]) * scale(q.shape[-1])  # [..., H, n, bk]
        s = xp.where(causal(xp, n, s.shape[-1], offset=-kj), s, -math.inf)  # key kj + j seen from query kj + j on
        m_tile = xp.max(s, axis=-1, keepdims=True)  # [..., H, n, 1]
        m_new = m_tile if m is None else xp.maximum(m, m_tile)  # tile 0 holds key 0: finite
        p = xp.exp(s - m_new)  # [..., H, n, bk]
        pv, ps = p @ v[..., kj : kj + tile, :], xp.sum(p, axis=-1, keepdims=True)  # [..., H, n, hd], [..., H, n, 1]
        if m is None:
            acc, total = pv, ps
        elif rescale:
            alpha = xp.exp(m - m_new)  # [..., H, n, 1] old terms were relative to the old max
            acc, total = acc * alpha + pv, total * alpha + ps
        else:
            acc, total = acc + pv, total + ps  # the bug: old terms stay relative to the old max
        m = m_new
    return acc / total  # [..., H, n, hd]


@rewrite(family="length_mutant", claim="inequivalent")
def sliding_window_300(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Sliding-window attention: each query sees only its last 300 keys, itself included.

    Local attention (Longformer, Mistral's 4096 window) swapped in for full attention, or a
    window configured smaller than the context. Sequences of up to 300 tokens fit in the
    window, so it is exact there; first fails at n_seq 301, where query 300 loses key 0."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n = q.shape[-2]
    window = causal(xp, n) & ~causal(xp, n, n, offset=-300)  # [n, n] 0 <= i - j < 300
    return project_out(xp, attend(xp, q, k, v, window), c_proj_w, c_proj_b)


@rewrite(family="length_mutant", claim="inequivalent")
def top_k_32(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Top-k attention: keeps the 32 largest scores of each query row, masks the rest.

    Sparse top-k attention sold as a lossless speed-up because the dropped weights are
    small, yet they are not zero. A row with at most 32 visible keys keeps them all, so it is
    exact up to n_seq 32; first fails at n_seq 33, where query 32 drops its smallest score."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n = q.shape[-2]
    z = xp.where(causal(xp, n), q @ xp.matrix_transpose(k) * scale(q.shape[-1]), -math.inf)  # [..., H, n, n]
    kth = xp.sort(z, axis=-1)[..., n - min(32, n) : n - min(32, n) + 1]  # [..., H, n, 1] 32nd largest (or -inf)
    z = xp.where(z >= kth, z, -math.inf)  # ties at the threshold are kept
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))  # [..., H, n, n]
    return project_out(xp, e / xp.sum(e, axis=-1, keepdims=True) @ v, c_proj_w, c_proj_b)


@rewrite(family="length_mutant", claim="inequivalent")
def tiles_64_tail_dropped(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Key tiles of 64 counted as max(1, n_seq // 64): the last partial tile is skipped.

    Floor division where a ceiling was meant, a classic in tiled kernels whose tests use
    multiples of the tile size (and guard only n_seq < 64). Exact up to n_seq 64 and at every
    multiple of 64; first fails at n_seq 65, where query 64 loses every key from 64 on,
    itself included."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    o = key_tiles(xp, q, k, v, tile=64, n_tiles=max(1, q.shape[-2] // 64))  # [..., H, n, hd]
    return project_out(xp, o, c_proj_w, c_proj_b)


@rewrite(family="length_mutant", claim="inequivalent")
def online_softmax_64_no_rescale(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Online softmax over key tiles of 64 that updates the running max but never rescales the sum and accumulator.

    The easy line to forget in a FlashAttention kernel: `acc * exp(m_old - m_new)`. With one
    tile (n_seq <= 64) there is nothing to rescale and it is exact; it fails at the first
    length past 64 where a later tile raises some row's max, so the exact first failing
    length depends on the content (usually a few tokens past 64 on random inputs)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    o = key_tiles(xp, q, k, v, tile=64, n_tiles=math.ceil(q.shape[-2] / 64), rescale=False)  # [..., H, n, hd]
    return project_out(xp, o, c_proj_w, c_proj_b)


@rewrite(family="length_mutant", claim="inequivalent")
def chunked_prefill_100_off_by_one(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Chunked prefill in chunks of 100 where each chunk misses the last cached key of the previous chunk.

    The cache is read as `cache[..., :n_past - 1, :]`, an inclusive/exclusive slip at the chunk
    boundary, and the causal offset is taken from what was read, so every row still has keys
    and nothing crashes. One chunk (n_seq <= 100) is exact; first fails at n_seq 101, where
    query 100 (the second chunk) loses key 99."""
    return chunked_prefill(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, chunk=100, past_end=-1)


@rewrite(family="length_mutant", claim="inequivalent")
def ring_buffer_overflow_1000(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Token-by-token decoding into a ring-buffer KV cache of 1000 slots that silently overwrites the oldest when full.

    A cache sized for a shorter context than the model's 1024, wrapping instead of failing:
    it quietly turns into a 1000-token sliding window. Exact up to n_seq 1000; first fails
    at n_seq 1001, where token 1000 overwrites token 0 before attending."""
    capacity = min(1000, x.shape[-2])  # shorter sequences never fill it: don't allocate the rest
    return ring_decode(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, capacity=capacity)
