"""The PyTorch oracle: PyTorch's own fused `scaled_dot_product_attention(is_causal=True)`.

The kernel is PyTorch's, not ours, so it is the most independent of the three oracles.
"""

from __future__ import annotations

from oracles.backends import get

get("torch")  # raises BackendUnavailable (a clean skip) when PyTorch is not installed
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head: int, segments=None) -> torch.Tensor:
    """GPT-2 causal self-attention sublayer: [..., n_seq, n_embd] -> [..., n_seq, n_embd].
    `segments` [..., n_seq]: each position's document, -1 for padding (problem.py)."""
    *batch, n_seq, n_embd = x.shape
    q, k, v = torch.addmm(c_attn_b, x.reshape(-1, n_embd), c_attn_w).split(n_embd, dim=-1)  # [B*n_seq, n_embd]
    # [B*n_seq, n_embd] -> [B, n_head, n_seq, head_dim]
    q, k, v = (t.reshape(-1, n_seq, n_head, n_embd // n_head).transpose(1, 2) for t in (q, k, v))
    if segments is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, n_head, n_seq, head_dim]
    else:  # a boolean mask: causal, the same document, a real query (whose row of False gives 0 below)
        seg = segments.reshape(-1, 1, n_seq, 1)  # [B, 1, n_seq, 1]
        causal = torch.ones(n_seq, n_seq, dtype=torch.bool, device=x.device).tril()
        mask = causal & (seg == seg.transpose(-1, -2)) & (seg >= 0)  # [B, 1, n_seq, n_seq]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, n_head, n_seq, head_dim]
        out = torch.where(mask.any(dim=-1, keepdim=True), out, 0.0)  # never NaN, whatever the kernel gives
    out = out.transpose(1, 2).reshape(-1, n_embd)  # merge heads: [B*n_seq, n_embd]
    return torch.addmm(c_proj_b, out, c_proj_w).reshape(*batch, n_seq, n_embd)


def layer_norm(x, g, b, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), g, b, eps)


def block(x, ln_g, ln_b, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head: int, eps: float = 1e-5):
    """Pre-LN residual attention: x + attn(ln_1(x))."""
    return x + attention(layer_norm(x, ln_g, ln_b, eps), c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
