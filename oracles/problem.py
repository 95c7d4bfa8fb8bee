"""`AttentionProblem`: the inputs of one GPT-2 attention sublayer, in float64 NumPy.

Every oracle, rewrite, strategy and counterexample speaks this one format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

WEIGHTS = ("c_attn_w", "c_attn_b", "c_proj_w", "c_proj_b")


@dataclass(frozen=True, eq=False)
class AttentionProblem:
    x: np.ndarray  # [..., n_seq, n_embd]
    c_attn_w: np.ndarray  # [n_embd, 3*n_embd]  (q, k, v side by side; y = x @ W + b)
    c_attn_b: np.ndarray  # [3*n_embd]
    c_proj_w: np.ndarray  # [n_embd, n_embd]
    c_proj_b: np.ndarray  # [n_embd]
    n_head: int
    label: str = field(default="synthetic")  # where it came from, e.g. "gpt2 layer 3"

    def __post_init__(self) -> None:
        n_embd = self.x.shape[-1] if self.x.ndim >= 2 else -1
        expected = {
            "x": (self.x.ndim >= 2, "[..., n_seq, n_embd]"),
            "c_attn_w": (self.c_attn_w.shape == (n_embd, 3 * n_embd), f"[{n_embd}, {3 * n_embd}]"),
            "c_attn_b": (self.c_attn_b.shape == (3 * n_embd,), f"[{3 * n_embd}]"),
            "c_proj_w": (self.c_proj_w.shape == (n_embd, n_embd), f"[{n_embd}, {n_embd}]"),
            "c_proj_b": (self.c_proj_b.shape == (n_embd,), f"[{n_embd}]"),
        }
        for name, (ok, shape) in expected.items():
            if not ok:
                raise ValueError(f"{name} has shape {list(getattr(self, name).shape)}, expected {shape}")
        if self.n_head < 1 or n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide n_embd={n_embd}")

    @property
    def n_seq(self) -> int:
        return self.x.shape[-2]

    @property
    def n_embd(self) -> int:
        return self.x.shape[-1]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def prefix(self, n: int) -> AttentionProblem:
        """The first n tokens: for causal attention, the first n rows of the output."""
        return AttentionProblem(self.x[..., :n, :], *self.arrays()[1:], n_head=self.n_head, label=self.label)

    def with_kv_heads(self, n_kv_head: int) -> AttentionProblem:
        """The same problem with its key and value heads tied in `n_kv_head` groups of
        n_head / n_kv_head consecutive heads (each head's k and v columns and biases
        those of its group's first head): grouped-query attention, which computes one k
        and v per group, is exactly this multi-head problem (multi-query at 1)."""
        if n_kv_head < 1 or self.n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} does not divide n_head={self.n_head}")
        if n_kv_head == self.n_head:
            return self
        e, hd, g = self.n_embd, self.head_dim, self.n_head // n_kv_head
        src = np.arange(self.n_head) // g * g  # [n_head] the head each one copies
        cols = np.concatenate([(e * part + src[:, None] * hd + np.arange(hd)).ravel() for part in (1, 2)])
        own = np.concatenate([e * part + np.arange(e) for part in (1, 2)])  # the k, v columns in order
        if np.array_equal(self.c_attn_w[:, own], self.c_attn_w[:, cols]) and np.array_equal(
            self.c_attn_b[own], self.c_attn_b[cols]
        ):
            return self  # tied already
        w, b = self.c_attn_w.copy(), self.c_attn_b.copy()
        w[:, own], b[own] = self.c_attn_w[:, cols], self.c_attn_b[cols]
        label = f"{self.label}, k and v heads tied in {n_kv_head} group(s)"
        return AttentionProblem(self.x, w, b, self.c_proj_w, self.c_proj_b, n_head=self.n_head, label=label)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b): the oracle's positional arrays."""
        return (self.x, self.c_attn_w, self.c_attn_b, self.c_proj_w, self.c_proj_b)

    def describe(self) -> str:
        batch = list(self.x.shape[:-2])
        return (
            f"{self.label}: batch={batch} n_seq={self.n_seq} n_embd={self.n_embd} "
            f"n_head={self.n_head} head_dim={self.head_dim} max|x|={np.abs(self.x).max():.3g}"
        )

    def fields(self) -> dict[str, np.ndarray | int | str]:
        """What an .npz of this problem holds (`save`, and the example database's entries)."""
        return {**dict(zip(("x", *WEIGHTS), self.arrays(), strict=True)), "n_head": self.n_head, "label": self.label}

    def save(self, path: str | Path, **extra: np.ndarray | str) -> Path:
        """Write the problem (plus any `extra` arrays or strings) to an .npz file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **self.fields(), **extra)
        return path

    @classmethod
    def load(cls, path: str | Path | BinaryIO) -> AttentionProblem:
        """Read a problem written by `save` (e.g. a counterexample), from a file or its bytes."""
        with np.load(path) as f:
            missing = [k for k in ("x", *WEIGHTS, "n_head") if k not in f]
            if missing:
                raise ValueError(f"{path}: not an attention problem, missing {', '.join(missing)}")
            return cls(
                *(np.asarray(f[k], np.float64) for k in ("x", *WEIGHTS)),
                n_head=int(f["n_head"]),
                label=str(f["label"]) if "label" in f else "loaded",
            )
