"""The attention people actually run: library kernels, as core-level rewrites
(`fn(q, k, v) -> o`, q, k, v `[..., n_head, n_seq, head_dim]`, causal, scale
1/sqrt(head_dim)), each on its own backend and named with the version installed.

Their verdicts are findings about that software, not about this project: a kernel that
computes its softmax in float32 whatever its inputs is `imprecise` in float64, and
its claim says what was measured. Kernels take 4-d arrays [batch, ..., n_seq, head_dim]:
any leading dimensions are folded into one batch and unfolded after."""

from __future__ import annotations

import functools
import importlib.metadata
import warnings

from oracles.backends import DEVICES
from rewrites.catalogue.padding import padding_mask
from rewrites.common import array_namespace
from rewrites.registry import Rewrite


def installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _four_d(t):
    """[..., n_head, n_seq, head_dim] -> [batch, n_head, n_seq, head_dim]."""
    return t.reshape(-1, *t.shape[-3:])


def _sdpa(kernel: str):
    def core(q, k, v):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, kernel)), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:  # only this kernel: one that cannot run raises, and its warnings say why
                o = torch.nn.functional.scaled_dot_product_attention(_four_d(q), _four_d(k), _four_d(v), is_causal=True)
            except RuntimeError as e:
                why = "; ".join(dict.fromkeys(str(w.message).split("\n")[0] for w in said))
                raise RuntimeError(f"{str(e).splitlines()[0]} {why}".strip()) from e
        return o.reshape(q.shape)

    core.__name__ = f"torch_sdpa_{kernel.lower()}"
    return core


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def torch_flex_attention(q, k, v):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[-2]
    mask = create_block_mask(_causal, B=None, H=None, Q_LEN=n, KV_LEN=n, device=q.device)
    with torch.no_grad():
        o = flex_attention(_four_d(q), _four_d(k), _four_d(v), block_mask=mask)
    return o.reshape(q.shape)


def torch_flex_attention_compiled(q, k, v):
    """flex_attention under torch.compile, as its documentation says to run it. Dynamo may
    recompile a function only so often and then silently runs it eagerly: the limit is
    raised and hitting it made an error, so the verdict is the compiled kernel's."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    n = q.shape[-2]
    mask = create_block_mask(_causal, B=None, H=None, Q_LEN=n, KV_LEN=n, device=q.device)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch.no_grad(), torch._dynamo.config.patch({limit: 4096, "fail_on_recompile_limit_hit": True}):
        o = _compiled_flex()(_four_d(q), _four_d(k), _four_d(v), block_mask=mask)
    return o.reshape(q.shape)


@functools.cache
def _compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _jax_dpa(implementation: str):
    def core(q, k, v):
        import jax
        import jax.numpy as jnp

        # jax.nn.dot_product_attention takes [batch, n_seq, n_head, head_dim]
        bthd = lambda t: jnp.swapaxes(_four_d(t), -3, -2)
        o = jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), is_causal=True, implementation=implementation)
        return jnp.swapaxes(o, -3, -2).reshape(q.shape)

    core.__name__ = f"jax_dot_product_attention_{implementation}"
    return core


jax_dot_product_attention = _jax_dpa("xla")


def picogpt_mha(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """picoGPT's `mha` in its own idiom, for one sequence [n_seq, n_embd] at a time (picoGPT
    has no batch): np.split into q, k, v and into heads, the additive mask
    (1 - tri) * -1e10, attention head by head, np.hstack, the output projection."""
    import numpy as np

    def softmax(z):
        e = np.exp(z - np.max(z, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)

    def one(t):  # [n_seq, n_embd] -> [n_seq, n_embd]
        qkv = np.split(t @ c_attn_w + c_attn_b, 3, axis=-1)  # 3 x [n_seq, n_embd]
        heads = [np.split(m, n_head, axis=-1) for m in qkv]  # 3 x n_head x [n_seq, head_dim]
        mask = (1 - np.tri(t.shape[0], dtype=t.dtype)) * -1e10  # [n_seq, n_seq]
        out = [softmax(q @ k.T / np.sqrt(q.shape[-1]) + mask) @ v for q, k, v in zip(*heads, strict=True)]
        return np.hstack(out) @ c_proj_w + c_proj_b

    flat = x.reshape(-1, *x.shape[-2:])  # [B, n_seq, n_embd]
    return np.stack([one(t) for t in flat]).reshape(x.shape)


def _kernel(
    name: str,
    backend: str,
    fn,
    claim: str,
    what: str,
    dist: str,
    devices: tuple[str, ...] = DEVICES,
    kv_heads: str = "all",
    layout: str = "dense",
) -> Rewrite:
    return Rewrite(
        name,
        f"{what} ({dist} {installed_version(dist)})",
        "library",
        None,
        claim=claim,
        backends={backend: fn},
        level="core",
        devices=devices,
        kv_heads=kv_heads,
        layout=layout,
    )


def torch_sdpa_gqa(q, k, v):
    """SDPA with fewer k, v heads than query heads, as PyTorch takes them (`enable_gqa`)."""
    import torch

    o = torch.nn.functional.scaled_dot_product_attention(
        _four_d(q), _four_d(k), _four_d(v), is_causal=True, enable_gqa=True
    )
    return o.reshape(q.shape)


def torch_sdpa_padding(q, k, v, attention_mask):
    """SDPA with a boolean mask for a padded batch (a fully masked row: PyTorch's safe softmax)."""
    import torch

    mask = _four_d(padding_mask(array_namespace(q), attention_mask, q.shape[-2]))  # [batch, 1, n, n]
    o = torch.nn.functional.scaled_dot_product_attention(_four_d(q), _four_d(k), _four_d(v), attn_mask=mask)
    return o.reshape(q.shape)


def jax_dpa_padding(q, k, v, attention_mask):
    """jax.nn.dot_product_attention with a boolean mask for a padded batch."""
    import jax
    import jax.numpy as jnp

    bthd = lambda t: jnp.swapaxes(_four_d(t), -3, -2)
    mask = _four_d(padding_mask(jnp, attention_mask, q.shape[-2]))  # [batch, 1, n, n]
    o = jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), mask=mask, implementation="xla")
    return jnp.swapaxes(o, -3, -2).reshape(q.shape)


torch_sdpa_math = _kernel(
    "torch_sdpa_math", "torch", _sdpa("MATH"), "equivalent",
    "torch scaled_dot_product_attention, is_causal, MATH kernel forced", "torch",
)  # fmt: skip
torch_sdpa_flash = _kernel(
    "torch_sdpa_flash", "torch", _sdpa("FLASH_ATTENTION"), "equivalent",
    "torch scaled_dot_product_attention, is_causal, FLASH_ATTENTION kernel forced (the CPU flash kernel)", "torch",
)  # fmt: skip
torch_sdpa_efficient = _kernel(
    "torch_sdpa_efficient", "torch", _sdpa("EFFICIENT_ATTENTION"), "equivalent",
    "torch scaled_dot_product_attention, is_causal, EFFICIENT_ATTENTION kernel forced", "torch", ("cuda",),
)  # fmt: skip
torch_sdpa_cudnn = _kernel(
    "torch_sdpa_cudnn", "torch", _sdpa("CUDNN_ATTENTION"), "equivalent",
    "torch scaled_dot_product_attention, is_causal, CUDNN_ATTENTION kernel forced", "torch", ("cuda",),
)  # fmt: skip
torch_flex = _kernel(
    "torch_flex_attention", "torch", torch_flex_attention, "equivalent",
    "torch flex_attention with a causal mask_mod, eager", "torch",
)  # fmt: skip
# CUDA only: on the CPU it works (float32, float16, bfloat16; float64 refused) but compiles
# for 11-13 s per head count and head_dim even with dynamic shapes, which the searches vary.
torch_flex_compiled = _kernel(
    "torch_flex_attention_compiled", "torch", torch_flex_attention_compiled, "equivalent",
    "torch flex_attention with a causal mask_mod, torch.compile", "torch", ("cuda",),
)  # fmt: skip
picogpt = Rewrite(
    "picogpt_mha",
    "picoGPT's mha as picoGPT writes it: split heads, (1 - tri) * -1e10 mask, hstack",
    "library",
    None,
    # No claim, reported only: it differs per dtype. float64: the -1e10 mask leaks at logits
    # near 1e10 (as masks.mask_pico_minus_1e10). float32: under NumPy 2 `/ np.sqrt(d)`
    # divides by a float64 scalar, which promotes (NEP 50), and the output is float64.
    claim=None,
    backends={"numpy": picogpt_mha},
)
jax_dpa_xla = _kernel(
    "jax_dot_product_attention", "jax", jax_dot_product_attention, "imprecise",
    'jax.nn.dot_product_attention(is_causal=True, implementation="xla")', "jax",
)  # fmt: skip
torch_sdpa_grouped = _kernel(
    "torch_sdpa_enable_gqa", "torch", torch_sdpa_gqa, "equivalent",
    "torch scaled_dot_product_attention, is_causal, enable_gqa, half as many k, v heads", "torch", kv_heads="half",
)  # fmt: skip
jax_dpa_grouped = _kernel(
    "jax_dot_product_attention_gqa", "jax", jax_dot_product_attention, "imprecise",
    'jax.nn.dot_product_attention(is_causal=True, implementation="xla"), half as many k, v heads', "jax",
    kv_heads="half",
)  # fmt: skip
jax_dpa_cudnn = _kernel(
    "jax_dot_product_attention_cudnn", "jax", _jax_dpa("cudnn"), "equivalent",
    'jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")', "jax", ("cuda",),
)  # fmt: skip
torch_sdpa_padded = _kernel(
    "torch_sdpa_padding_mask", "torch", torch_sdpa_padding, "equivalent",
    "torch scaled_dot_product_attention, boolean attn_mask of a padded batch", "torch", layout="padded",
)  # fmt: skip
# Measured: a fully masked row (a padding query) comes out as the mean of every value row
# (uniform weights over all keys), not 0: inequivalent on padding rows.
jax_dpa_padded = _kernel(
    "jax_dot_product_attention_padding_mask", "jax", jax_dpa_padding, "inequivalent",
    'jax.nn.dot_product_attention(mask=..., implementation="xla") for a padded batch', "jax", layout="padded",
)  # fmt: skip
