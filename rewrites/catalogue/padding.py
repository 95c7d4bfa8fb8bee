"""Padded batches and packed sequences (oracles/problem.py says what they must compute):
each real position attends the earlier positions of its own sequence or document only,
and a padding position's attention output is 0, so the sublayer gives c_proj's bias
there, never NaN. Padded rewrites take Hugging Face's `attention_mask` [..., n_seq]
(1 real, 0 padding), packed ones FlashAttention's `cu_seqlens` [n_docs + 1].

The mutants are the faults people report against attention libraries and servers:
padding keys attended, fully masked rows giving NaN, packing that ignores the document
boundaries, and off-by-ones at a padded position or a document boundary."""

import math

from rewrites.common import causal, heads_qkv, project_out, scores, softmax
from rewrites.registry import rewrite


def _attend(xp, q, k, v, allowed):
    """Attention over the allowed keys, [..., H, n, hd] x3, allowed [..., 1, n, n]; a row
    that may attend nothing gets weights 0 (a safe softmax), not 0/0."""
    seen = xp.any(allowed, axis=-1, keepdims=True)  # [..., 1, n, 1]
    z = xp.where(allowed, scores(xp, q, k), -math.inf)  # [..., H, n, n]
    z = xp.where(seen, z, 0.0)  # a padding query: any finite row, its weights zeroed below
    return xp.where(seen, softmax(xp, z), 0.0) @ v  # [..., H, n, hd]


def padding_mask(xp, attention_mask, n: int, shift_keys: bool = False):
    """[..., 1, n, n] bool: causal, a real key, a real query. `shift_keys`: a key also
    counts as real when the one after it is (the off-by-one mutant)."""
    real = attention_mask == 1  # [..., n]
    keys = real
    if shift_keys:
        nxt = xp.concat([real[..., 1:], xp.zeros_like(real[..., :1])], axis=-1)  # real[j + 1]
        keys = real | nxt
    return causal(xp, n) & keys[..., None, None, :] & real[..., None, :, None]


def _documents(xp, cu_seqlens, n: int, boundary_off_by_one: bool = False):
    """([n] document of each position, [n] whether it is real) from cu_seqlens: position i
    is in document d where cu_seqlens[d] <= i < cu_seqlens[d + 1]; real below the last."""
    pos = xp.arange(n)
    ends = cu_seqlens[1:]  # [n_docs]
    later = pos[:, None] > ends[None, :] if boundary_off_by_one else pos[:, None] >= ends[None, :]
    return xp.sum(xp.astype(later, cu_seqlens.dtype), axis=-1), pos < cu_seqlens[-1]


def _packed_mask(xp, cu_seqlens, n: int, boundaries: bool = True, boundary_off_by_one: bool = False):
    """[n, n] bool: causal, a real query, and (with `boundaries`) the same document."""
    doc, real = _documents(xp, cu_seqlens, n, boundary_off_by_one)
    allowed = causal(xp, n) & real[:, None]
    return allowed & (doc[:, None] == doc[None, :]) if boundaries else allowed


# --- padded batches ----------------------------------------------------------------------


@rewrite(family="padding", claim="equivalent", layout="padded")
def padding_mask_safe_softmax(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, attention_mask):
    """A padded batch: causal and padding masks combined, softmax over what is left, a query with no key gets 0."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., H, n, hd] x3
    allowed = padding_mask(xp, attention_mask, x.shape[-2])  # [..., 1, n, n]
    return project_out(xp, _attend(xp, q, k, v, allowed), c_proj_w, c_proj_b)  # [..., n, n_embd]


@rewrite(family="padding", claim="equivalent", layout="padded")
def padding_additive_mask(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, attention_mask):
    """Hugging Face's way: (1 - mask) * finfo.min added to the causal logits; padding queries' outputs zeroed after."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., H, n, hd] x3
    real = xp.astype(attention_mask, x.dtype)  # [..., n] 1.0 real, 0.0 padding
    bias = (1.0 - real[..., None, None, :]) * xp.finfo(x.dtype).min  # [..., 1, 1, n]
    z = xp.where(causal(xp, x.shape[-2]), scores(xp, q, k) + bias, -math.inf)  # [..., H, n, n]
    o = softmax(xp, z) @ v * real[..., None, :, None]  # [..., H, n, hd], padding rows 0
    return project_out(xp, o, c_proj_w, c_proj_b)


@rewrite(family="padding", claim="inequivalent", layout="padded")
def padding_keys_attended(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, attention_mask):
    """Padding masked on the query side only: real tokens attend the padding keys before them (left padding)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    real = attention_mask == 1
    allowed = causal(xp, x.shape[-2]) & real[..., None, :, None]  # keys: causal only
    return project_out(xp, _attend(xp, q, k, v, allowed), c_proj_w, c_proj_b)


@rewrite(family="padding", claim="inequivalent", layout="padded")
def padding_rows_nan(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, attention_mask):
    """Masks right but with a plain softmax: a padding query sees only -inf, and exp(-inf - -inf) is NaN."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    allowed = padding_mask(xp, attention_mask, x.shape[-2])
    o = softmax(xp, xp.where(allowed, scores(xp, q, k), -math.inf)) @ v
    return project_out(xp, o, c_proj_w, c_proj_b)


@rewrite(family="padding", claim="inequivalent", layout="padded")
def padding_off_by_one(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, attention_mask):
    """The key mask one position early: with left padding, each sequence also attends the padding token before it."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    allowed = padding_mask(xp, attention_mask, x.shape[-2], shift_keys=True)
    return project_out(xp, _attend(xp, q, k, v, allowed), c_proj_w, c_proj_b)


# --- packed sequences --------------------------------------------------------------------


@rewrite(family="packing", claim="equivalent", layout="packed")
def packed_document_mask(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, cu_seqlens):
    """Packed documents: a document id per position from cu_seqlens, attention within one document, causal."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    allowed = _packed_mask(xp, cu_seqlens, x.shape[-2])  # [n, n], broadcast over batch and heads
    return project_out(xp, _attend(xp, q, k, v, allowed), c_proj_w, c_proj_b)


@rewrite(family="packing", claim="inequivalent", layout="packed")
def packing_without_boundaries(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, cu_seqlens):
    """Packed documents attended as one sequence: only the padding after the last is masked."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    allowed = _packed_mask(xp, cu_seqlens, x.shape[-2], boundaries=False)
    return project_out(xp, _attend(xp, q, k, v, allowed), c_proj_w, c_proj_b)


@rewrite(family="packing", claim="inequivalent", layout="packed")
def packing_boundary_off_by_one(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, cu_seqlens):
    """Document ids counted with > where >= was meant: each document's first token joins the document before it."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    allowed = _packed_mask(xp, cu_seqlens, x.shape[-2], boundary_off_by_one=True)
    return project_out(xp, _attend(xp, q, k, v, allowed), c_proj_w, c_proj_b)
