"""Attention as inference servers lay out the cache: split-KV decoding (flash-decoding) and a
paged KV cache, with the bugs people report against them.

Every query row is computed as its decode step would compute it, all rows at once: the
keys and values of its cache split into chunks combined by log-sum-exp, or read page by
page through a block table. The correct ones are exactly full causal attention at every
n_seq; the mutants fail as soon as there are two splits or two pages."""

import math
import random

from array_api_compat import device

from rewrites.common import causal, heads_qkv, project_out, scale
from rewrites.registry import rewrite

SPLITS = 4  # flash-decoding's num_splits: the keys of every row in 4 chunks
PAGE = 16  # tokens per page of the paged cache (vLLM's default block size)


def chunk(xp, s, v):
    """One chunk's partial result: its max m_s, sum l_s and unnormalised output o_s, from
    its masked scores s [..., H, nq, c] (-inf: not attended) and values v [..., H, c, hd].
    A chunk wholly masked for a row has m_s = -inf and contributes nothing (its max is
    taken as 0 inside the chunk, so exp(-inf - 0) = 0, never -inf - -inf = NaN)."""
    m_s = xp.max(s, axis=-1, keepdims=True)  # [..., H, nq, 1]
    p = xp.exp(s - xp.where(m_s == -math.inf, 0.0, m_s))  # [..., H, nq, c]
    return m_s, xp.sum(p, axis=-1, keepdims=True), p @ v


def combine(xp, parts, rescale: bool = True):
    """sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s with m = max_s m_s (finite: some
    chunk holds each row's own key). `rescale=False` is the bug of combining the chunks
    without their maxima."""
    m = parts[0][0]
    for m_s, _, _ in parts[1:]:
        m = xp.maximum(m, m_s)  # [..., H, nq, 1]
    weights = [xp.exp(m_s - m) if rescale else 1.0 for m_s, _, _ in parts]  # 0 for a masked chunk
    o = sum(w * o_s for w, (_, _, o_s) in zip(weights, parts, strict=True))  # [..., H, nq, hd]
    total = sum(w * l_s for w, (_, l_s, _) in zip(weights, parts, strict=True))  # [..., H, nq, 1]
    return o / total


def split_kv(xp, q, k, v, splits: int, rescale: bool = True):
    """Attention of q over k, v [..., H, n, hd] with the keys in `splits` chunks, each giving
    its own partial result (`chunk`), combined by log-sum-exp (`combine`)."""
    n = q.shape[-2]
    size = max(1, math.ceil(n / splits))
    parts = []
    for kj in range(0, n, size):
        s = q @ xp.matrix_transpose(k[..., kj : kj + size, :]) * scale(q.shape[-1])  # [..., H, n, c]
        parts.append(
            chunk(xp, xp.where(causal(xp, n, s.shape[-1], offset=-kj), s, -math.inf), v[..., kj : kj + size, :])
        )
    return combine(xp, parts, rescale)


@rewrite(family="split_kv", claim="equivalent")
def split_kv_decode(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Flash-decoding: each row's keys split into 4 chunks, combined by log-sum-exp."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, split_kv(xp, q, k, v, SPLITS), c_proj_w, c_proj_b)


@rewrite(family="split_kv", claim="inequivalent")
def split_kv_combined_without_maxima(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Flash-decoding whose combine adds the chunks' sums and outputs as they are, each still relative to its own max.

    Exact while one chunk holds every key (n_seq 1); wrong where chunks with different
    maxima meet, which needs only two tokens."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, split_kv(xp, q, k, v, SPLITS, rescale=False), c_proj_w, c_proj_b)


def block_table(n_pages: int) -> list[int]:
    """The physical slot of each logical page: a shuffled order (never the identity for two
    pages or more), as an allocator that reuses freed pages leaves it."""
    order = list(range(n_pages))
    random.Random(n_pages).shuffle(order)
    return order[::-1] if n_pages > 1 and order == sorted(order) else order


def paged(xp, k, table: list[int]):
    """k [..., H, n, hd] written page by page (PAGE tokens) into the slots `table` names:
    the page pool [..., H, n_pages, PAGE, hd], the last page zero-padded."""
    n = k.shape[-2]
    n_pages = math.ceil(n / PAGE)
    pad = xp.zeros((*k.shape[:-2], n_pages * PAGE - n, k.shape[-1]), dtype=k.dtype, device=device(k))
    pages = xp.reshape(xp.concat([k, pad], axis=-2), (*k.shape[:-2], n_pages, PAGE, k.shape[-1]))
    where = [table.index(slot) for slot in range(n_pages)]  # the logical page each slot holds
    return xp.take(pages, xp.asarray(where, device=device(k)), axis=-3)


def read_pages(xp, pool, table: list[int], n: int):
    """The first n keys back from the pool, page by page in the order `table` gives."""
    pages = xp.take(pool, xp.asarray(table, device=device(pool)), axis=-3)  # [..., H, n_pages, PAGE, hd]
    return xp.reshape(pages, (*pool.shape[:-3], -1, pool.shape[-1]))[..., :n, :]  # [..., H, n, hd]


def paged_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, read_table=None):
    """Keys and values stored in pages through a block table, read back through `read_table`
    (default the same table), then causal attention."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n = q.shape[-2]
    table = block_table(math.ceil(n / PAGE))
    read = table if read_table is None else read_table(table)
    k, v = (read_pages(xp, paged(xp, t, table), read, n) for t in (k, v))  # [..., H, n, hd]
    z = q @ xp.matrix_transpose(k) * scale(q.shape[-1])  # [..., H, n, n]
    z = xp.where(causal(xp, n), z, -math.inf)
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return project_out(xp, e / xp.sum(e, axis=-1, keepdims=True) @ v, c_proj_w, c_proj_b)


@rewrite(family="paged_kv", claim="equivalent")
def paged_kv_cache(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A paged KV cache: pages of 16 tokens in shuffled slots, read through the block table."""
    return paged_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)


@rewrite(family="paged_kv", claim="inequivalent")
def paged_kv_misordered_pages(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A paged KV cache read in slot order, not through the block table.

    One page (n_seq <= 16) is in order whatever the table says; first fails at n_seq 17,
    where the second page exists and the pages come back swapped."""
    return paged_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, read_table=sorted)


@rewrite(family="paged_kv", claim="inequivalent")
def paged_kv_stale_page(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A paged KV cache whose block table entry for the newest page is not yet written: it still names the page before.

    Exact on one page; first fails at n_seq 17, where token 16 reads page 0's keys in
    place of its own page's."""
    return paged_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, read_table=_stale)


def _stale(table: list[int]) -> list[int]:
    return table[:-1] + table[-2:-1] if len(table) > 1 else table
