"""The NumPy oracle: GPT-2 attention exactly as picoGPT's `mha` writes it, head by head.

Computes in the dtype of its inputs (float64, float32 or float16). Python scalars only,
so NumPy's promotion rules never silently widen a float16 computation.
"""

from __future__ import annotations

import math

import numpy as np


def causal_mask(n_seq: int) -> np.ndarray:
    """[n_seq, n_seq] bool: query i may attend to key j iff j <= i."""
    return np.tri(n_seq, dtype=bool)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One head. [..., n_seq, head_dim] x3 -> [..., n_seq, head_dim]; `allowed` [..., n_seq, n_seq]."""
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])  # [..., n_seq, n_seq]
    scores = np.where(allowed, scores, -np.inf)  # keys not allowed get weight 0
    seen = allowed.any(axis=-1, keepdims=True)  # [..., n_seq, 1]: False for a padding query
    weights = softmax(np.where(seen, scores, 0.0))  # a row seeing nothing: any finite row, zeroed below
    return np.where(seen, weights, 0.0) @ v  # [..., n_seq, head_dim]


def layout_mask(segments: np.ndarray | None, n_seq: int) -> np.ndarray:
    """[..., n_seq, n_seq] bool: causal, and within one document (segments: -1 padding)."""
    if segments is None:
        return causal_mask(n_seq)
    same = segments[..., :, None] == segments[..., None, :]  # [..., n_seq, n_seq]
    return causal_mask(n_seq) & same & (segments[..., :, None] >= 0)


def attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head: int, segments=None) -> np.ndarray:
    """GPT-2 causal self-attention sublayer: [..., n_seq, n_embd] -> [..., n_seq, n_embd].
    `segments` [..., n_seq]: each position's document, -1 for padding (problem.py)."""
    allowed = layout_mask(segments, x.shape[-2])  # [..., n_seq, n_seq]
    qkv = x @ c_attn_w + c_attn_b  # [..., n_seq, n_embd] -> [..., n_seq, 3*n_embd]
    q, k, v = np.split(qkv, 3, axis=-1)  # 3 x [..., n_seq, n_embd]
    heads = zip(*(np.split(t, n_head, axis=-1) for t in (q, k, v)), strict=True)
    out = np.concatenate([attend(qh, kh, vh, allowed) for qh, kh, vh in heads], axis=-1)  # [..., n_seq, n_embd]
    return out @ c_proj_w + c_proj_b  # [..., n_seq, n_embd]


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def block(x, ln_g, ln_b, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head: int, eps: float = 1e-5):
    """Pre-LN residual attention: x + attn(ln_1(x)). [..., n_seq, n_embd] -> same."""
    return x + attention(layer_norm(x, ln_g, ln_b, eps), c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
