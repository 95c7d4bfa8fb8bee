"""Hugging Face transformers' GPT-2 attention, run as the model runs it: `GPT2Attention`
with the problem's weights, the causal mask built by `create_causal_mask` (the model's own
call: the layer alone is not causal under eager attention, the model's mask makes it so),
eager and SDPA attention functions. Optional: `pip install attention-rewrites[hf]`;
skipped with the reason where transformers is absent. Written against transformers 5's
API (`cache=`, `position_ids=`)."""

from __future__ import annotations

from rewrites.catalogue.libraries import installed_version
from rewrites.registry import Rewrite

_MODULES: dict[tuple, object] = {}  # (implementation, n_embd, n_head, dtype, device) -> GPT2Attention


def _layer(implementation: str, n_embd: int, n_head: int, dtype, device):
    """One GPT2Attention per shape, dtype and device (built once: its init is slow)."""
    key = (implementation, n_embd, n_head, dtype, device)
    if key not in _MODULES:
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        config = GPT2Config(n_embd=n_embd, n_head=n_head, attn_pdrop=0.0, resid_pdrop=0.0)
        config._attn_implementation = implementation
        _MODULES[key] = GPT2Attention(config, layer_idx=0).to(dtype=dtype, device=device).eval()
    return _MODULES[key]


def _sublayer(implementation: str, model_mask: bool = True):
    def gpt2_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        import torch
        from transformers.masking_utils import create_causal_mask

        *batch, n_seq, n_embd = x.shape
        attn = _layer(implementation, n_embd, n_head, x.dtype, x.device)
        h = x.reshape(-1, n_seq, n_embd)  # [B, n_seq, n_embd]: the model's hidden states
        with torch.no_grad():
            for param, value in ((attn.c_attn.weight, c_attn_w), (attn.c_attn.bias, c_attn_b),
                                 (attn.c_proj.weight, c_proj_w), (attn.c_proj.bias, c_proj_b)):  # fmt: skip
                param.copy_(value)  # Conv1D weights are [in, out], as the problem's
            position_ids = torch.arange(n_seq, device=x.device)[None, :]  # [1, n_seq]
            mask = create_causal_mask(
                config=attn.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=position_ids
            ) if model_mask else None  # fmt: skip
            out, _ = attn(h, attention_mask=mask)  # [B, n_seq, n_embd]
        return out.reshape(*batch, n_seq, n_embd)

    gpt2_attention.__name__ = f"hf_gpt2_attention_{implementation}"
    return gpt2_attention


def _hf(name: str, implementation: str, what: str, claim: str, model_mask: bool = True) -> Rewrite:
    return Rewrite(
        name,
        f"transformers GPT2Attention, {implementation} attention, {what}"
        f" (transformers {installed_version('transformers')})",
        "library",
        None,
        claim=claim,
        backends={"torch": _sublayer(implementation, model_mask)},
        requires="transformers",
    )


hf_gpt2_eager = _hf("hf_gpt2_eager", "eager", "the model's causal mask", "equivalent")
hf_gpt2_sdpa = _hf("hf_gpt2_sdpa", "sdpa", "the model's causal mask", "equivalent")
#: The layer called on its own, as code that reuses it outside GPT2Model does. Measured with
#: transformers 5.24: eager attention applies only the mask it is given, so without the
#: model's mask every position attends to the future; SDPA falls back to is_causal and holds.
hf_gpt2_eager_layer_alone = _hf(
    "hf_gpt2_eager_layer_alone", "eager", "called alone, without the model's mask", "inequivalent", model_mask=False
)
