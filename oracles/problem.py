"""`AttentionProblem`: the inputs of one GPT-2 attention sublayer, in float64 NumPy.

Every oracle, rewrite, strategy and counterexample speaks this one format.

A problem may carry a layout, `segments` [..., n_seq]: each position's document (0, 1, ...:
consecutive runs) or -1 for padding. Query i then attends key j iff j <= i and both are in
the same document; a padding query attends nothing and its attention output is 0 (as
PyTorch's safe softmax gives), so the sublayer gives c_proj's bias there. Each real
position's output is thereby its own document's output computed alone (no position
encoding inside the sublayer). Rewrites see a layout in one of two conventions:
`attention_mask` (Hugging Face's padded batches: 1 real, 0 padding) or `cu_seqlens`
(FlashAttention's packed sequences: document boundaries, padding after the last).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
    segments: np.ndarray | None = None  # [..., n_seq] int: document of each position, -1 padding; None: one document

    @property
    def layout(self) -> str:
        """'dense' (no segments), 'padded' (one document per row) or 'packed' (several)."""
        if self.segments is None:
            return "dense"
        return "packed" if self.segments.max(initial=-1) > 0 else "padded"

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
        if self.segments is not None:
            seg = self.segments
            if seg.shape != self.x.shape[:-1] or seg.dtype.kind not in "iu":
                want = list(self.x.shape[:-1])
                raise ValueError(f"segments has shape {list(seg.shape)} ({seg.dtype}), expected ints {want}")
            if seg.size and seg.min() < -1:
                raise ValueError("segments holds values below -1 (-1 is padding, documents are 0, 1, ...)")

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
        seg = None if self.segments is None else self.segments[..., :n]
        return AttentionProblem(self.x[..., :n, :], *self.arrays()[1:], n_head=self.n_head, label=self.label,
                                segments=seg)  # fmt: skip

    # --- layouts: padded batches and packed documents ------------------------------------

    def padded(self, lengths: Sequence[int], side: str | Sequence[str]) -> AttentionProblem:
        """This problem as a padded batch: row r keeps `lengths[r]` real tokens, at the end
        (`side="left"`: the padding first) or at the start ("right"); a side per row, or one
        for all; x is unchanged (what padding positions hold must not matter). An unbatched
        problem takes one length."""
        rows = int(np.prod(self.x.shape[:-2], dtype=np.int64))
        sides = [side] * rows if isinstance(side, str) else list(side)
        fits = len(lengths) == rows == len(sides) and all(0 <= n <= self.n_seq for n in lengths)
        if not fits or not set(sides) <= {"left", "right"}:
            want = f"{rows} length(s) in 0..{self.n_seq} and sides left or right"
            raise ValueError(f"padding: {want}, got {list(lengths)} and {side!r}")
        pos = np.arange(self.n_seq)
        real = [pos >= self.n_seq - n if s == "left" else pos < n for n, s in zip(lengths, sides, strict=True)]
        seg = np.where(np.array(real), 0, -1).reshape(self.x.shape[:-1])
        said = side if isinstance(side, str) else "/".join(sides)
        return dataclasses.replace(self, segments=seg, label=f"{self.label}, {said}-padded to lengths {list(lengths)}")

    def packed(self, lengths: Sequence[int]) -> AttentionProblem:
        """This problem as packed documents of `lengths` along the sequence axis (the same in
        every batch row), padding after the last."""
        if any(n < 0 for n in lengths) or sum(lengths) > self.n_seq:
            raise ValueError(f"packing: document lengths {list(lengths)} do not fit {self.n_seq} tokens")
        seg = np.full(self.n_seq, -1)
        for d, (start, n) in enumerate(zip(np.cumsum([0, *lengths[:-1]]), lengths, strict=True)):
            seg[start : start + n] = d
        label = f"{self.label}, packed as documents of {list(lengths)}"
        return dataclasses.replace(self, segments=np.broadcast_to(seg, self.x.shape[:-1]).copy(), label=label)

    def attention_mask(self) -> np.ndarray:
        """[..., n_seq] int: 1 for a real position, 0 for padding (Hugging Face's convention)."""
        return np.ones(self.x.shape[:-1], np.int64) if self.segments is None else (self.segments >= 0).astype(np.int64)

    def cu_seqlens(self) -> np.ndarray:
        """[n_docs + 1] int: where each document starts, then where the last ends
        (FlashAttention's convention); padding follows. ValueError where batch rows differ
        or documents are not consecutive runs 0, 1, ... (a left-padded batch)."""
        if self.segments is None:
            return np.array([0, self.n_seq])
        rows = self.segments.reshape(-1, self.n_seq)
        seg = rows[0] if len(rows) else np.full(self.n_seq, -1)
        real = seg[seg >= 0]
        n_real = len(real)
        if (rows != seg).any() or (seg[n_real:] != -1).any() or (np.diff(real) < 0).any():
            raise ValueError(f"{self.label}: no cu_seqlens for this layout (rows differ, or padding before a document)")
        counts = np.bincount(real, minlength=int(real.max(initial=-1)) + 1)
        return np.concatenate([[0], np.cumsum(counts)])

    def allowed(self) -> np.ndarray:
        """[..., 1, n_seq, n_seq] bool, broadcast over heads: query i may attend key j."""
        causal = np.tri(self.n_seq, dtype=bool)
        if self.segments is None:
            return causal
        seg = self.segments[..., None, :, None], self.segments[..., None, None, :]  # [..., 1, n, 1], [..., 1, 1, n]
        return causal & (seg[0] == seg[1]) & (seg[0] >= 0)

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
        return dataclasses.replace(self, c_attn_w=w, c_attn_b=b, label=label)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b): the oracle's positional arrays."""
        return (self.x, self.c_attn_w, self.c_attn_b, self.c_proj_w, self.c_proj_b)

    def describe(self) -> str:
        batch = list(self.x.shape[:-2])
        return (
            f"{self.label}: batch={batch} n_seq={self.n_seq} n_embd={self.n_embd} "
            f"n_head={self.n_head} head_dim={self.head_dim} max|x|={np.abs(self.x).max():.3g}"
        ) + ("" if self.segments is None else f" ({self.layout}: {self.layout_text()})")

    def layout_text(self) -> str:
        """The layout in its convention: real lengths per row, or cu_seqlens."""
        if self.layout == "packed":
            try:
                return f"cu_seqlens {self.cu_seqlens().tolist()}"
            except ValueError:
                pass
        return f"real tokens per row {self.attention_mask().reshape(-1, self.n_seq).sum(-1).tolist()}"

    def fields(self) -> dict[str, np.ndarray | int | str]:
        """What an .npz of this problem holds (`save`, and the example database's entries)."""
        own = {**dict(zip(("x", *WEIGHTS), self.arrays(), strict=True)), "n_head": self.n_head, "label": self.label}
        return own if self.segments is None else {**own, "segments": self.segments}

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
                segments=np.asarray(f["segments"]) if "segments" in f else None,
            )
