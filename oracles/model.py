"""The full GPT-2 in NumPy, picoGPT style: the reference for a complete checkpoint.

`../shared/gpt2/` has neither the MLP matrices nor the token embedding, so this runs on
a complete `model.safetensors` given by path (or the *synthetic* checkpoint of
`gpt2.synthetic_checkpoint`). It computes in the dtype asked: float64 is the ground truth,
float32 the plain reference whose error a reordered computation is compared with. Greedy
generation recomputes the whole prefix for every new token, as picoGPT does: there is no
cache to get wrong.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from oracles.gpt2 import GPT2Weights, WeightsError
from oracles.numpy_oracle import block, layer_norm


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def mlp(x, c_fc_w, c_fc_b, c_proj_w, c_proj_b) -> np.ndarray:
    h = gelu(x @ c_fc_w + c_fc_b)  # [n_seq, n_embd] -> [n_seq, 4*n_embd]
    return h @ c_proj_w + c_proj_b  # [n_seq, 4*n_embd] -> [n_seq, n_embd]


ATTN = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias")
MLP = ("ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


@lru_cache(maxsize=2)  # converting the checkpoint costs more than a short forward pass
def params(weights: GPT2Weights, dtype: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as a `dtype` NumPy array."""
    return {k: np.asarray(v, dtype) for k, v in weights.tensors.items()}


def blocks(weights: GPT2Weights, x: np.ndarray, dtype: str = "float64", n_layers: int | None = None) -> np.ndarray:
    """The residual stream after the first `n_layers` blocks, then ln_f. [..., n_seq, n_embd] -> same.

    A complete checkpoint runs whole blocks (x + attn(ln_1(x)), then x + mlp(ln_2(x)));
    an attention-only one runs the attention path (the first half of each block)."""
    p, c = params(weights, dtype), weights.config
    x = np.asarray(x, dtype)
    for i in range(c.n_layer if n_layers is None else n_layers):
        x = block(x, *(p[f"h.{i}.{k}"] for k in ATTN), c.n_head, c.eps)  # x + attn(ln_1(x))
        if weights.is_complete:
            g, b, *w = (p[f"h.{i}.{k}"] for k in MLP)
            x = x + mlp(layer_norm(x, g, b, c.eps), *w)  # x + mlp(ln_2(x))
    return layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], c.eps)  # [..., n_seq, n_embd]


def embed(weights: GPT2Weights, ids, start: int = 0, dtype: str = "float64") -> np.ndarray:
    """Token ids [n_seq] at positions start.. -> [n_seq, n_embd]: wte[ids] + wpe[positions]."""
    wte, ids = weights["wte.weight"], np.asarray(ids, dtype=np.int64)
    if ids.size and not 0 <= ids.min() <= ids.max() < wte.shape[0]:
        raise ValueError(f"token id out of range 0..{wte.shape[0] - 1}: {ids.min()}..{ids.max()}")
    if start + len(ids) > weights.config.n_ctx:
        raise ValueError(f"{start + len(ids)} tokens exceed GPT-2's context of {weights.config.n_ctx}")
    return np.asarray(wte[ids], dtype) + np.asarray(weights["wpe.weight"][start : start + len(ids)], dtype)


def logits(weights: GPT2Weights, ids, dtype: str = "float64") -> np.ndarray:
    """Token ids [n_seq] -> next-token logits [n_seq, n_vocab]. The LM head is tied to wte."""
    require_complete(weights)
    h = blocks(weights, embed(weights, ids, dtype=dtype), dtype)  # [n_seq, n_embd]
    return h @ params(weights, dtype)["wte.weight"].T  # [n_seq, n_embd] -> [n_seq, n_vocab]


def generate(weights: GPT2Weights, ids, n_new: int, dtype: str = "float64") -> list[int]:
    """Greedy decoding, recomputing the whole prefix each step. Returns the n_new new ids."""
    require_complete(weights)
    wte, ids = params(weights, dtype)["wte.weight"], [int(i) for i in ids]
    for _ in range(n_new):
        h = blocks(weights, embed(weights, ids, dtype=dtype), dtype)[-1]  # [n_embd]: the last position
        ids.append(int(np.argmax(h @ wte.T)))  # [n_embd] -> [n_vocab] -> the likeliest id
    return ids[len(ids) - n_new :]


def require_complete(weights: GPT2Weights) -> None:
    if not weights.is_complete:
        raise WeightsError(
            f"{weights.path}: attention-only checkpoint (no token embedding, no MLP matrices); "
            "the full model needs a complete GPT-2 model.safetensors, given with --gpt2-weights"
        )
