"""Counterexample files: written once per failing search, read back by `replay`.

A synthetic problem is saved whole; a real layer saves only its input x and the layer
index, since its weights are GPT-2's and are reloaded from the weights file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oracles import gpt2
from oracles.backends import device
from oracles.problem import AttentionProblem
from rewrites.verify.record import Search
from rewrites.verify.verdicts import Counterexample, Inputs


def path_for(report_dir: Path, s: Search, inputs: Inputs) -> Path:
    return report_dir / "counterexamples" / f"{s.rewrite.name}-{s.backend}-{s.dtype}-{inputs}.npz"


def save(path: Path, s: Search) -> None:
    p = s.failure
    meta = dict(rewrite=s.rewrite.name, backend=s.backend, dtype=s.dtype, output=s.rewrite.output, device=device())
    if s.layer is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x=p.x, n_head=p.n_head, label=p.label, gpt2_layer=np.int64(s.layer), **meta)
    else:
        p.save(path, **meta)


def describe(path: Path, s: Search) -> Counterexample:
    p = s.failure
    return Counterexample(
        message=s.message,
        file=str(path),
        problem=p.describe(),
        shape={"batch": list(p.x.shape[:-2]), "n_seq": p.n_seq, "n_head": p.n_head, "head_dim": p.head_dim},
        examples_to_find=s.to_find,
        first_fails_at=s.first_fails_at,
        replay=f"attention-rewrites replay {path}" + ("" if device() == "cpu" else f" --device {device()}"),
    )


def load_counterexample(path: str | Path, weights: str | None = None) -> tuple[AttentionProblem, dict]:
    """A saved counterexample: the problem (real weights reloaded for GPT-2 ones) and its metadata."""
    with np.load(path) as f:
        meta = {k: f[k].item() for k in ("rewrite", "backend", "dtype", "output", "gpt2_layer", "device") if k in f}
        x = np.asarray(f["x"], np.float64) if "gpt2_layer" in f else None
    if x is None:
        return AttentionProblem.load(path), meta
    return gpt2.load(weights).layer(int(meta["gpt2_layer"])).problem(x), meta
