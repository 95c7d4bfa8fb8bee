"""The bitwise invariances serving relies on, measured beside every verdict (per rewrite x
backend x dtype), on one dense GPT-2-sized problem (n_embd 768, 12 heads, seeded):

- batch: an item's output has the same bits alone and inside batches of other items
  (sizes BATCHES), what a server needs for an answer that does not depend on the batch;
- prefix: the first PREFIX[0] rows have the same bits whether the sequence has PREFIX[0]
  or PREFIX[1] tokens, what a KV or prefix cache needs to reproduce the full pass;
- deterministic: two calls on the same input give the same bits: execute.Nondeterminism's
  check, the one that makes a nondeterministic rewrite an `error` (one check, not two).

Each is True, False with a witness (where the bits differ, and by how much), or None with
the reason where it cannot be measured (the rewrite raised, returns the last row only, or
its backend runs only a prefix of long problems: Backend.tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from oracles.problem import AttentionProblem
from rewrites.verify.execute import NONDETERMINISM, RewriteFailed, reach, run_rewrite

if TYPE_CHECKING:
    from rewrites.registry import Rewrite

N_EMBD, N_HEAD = 768, 12
PREFIX = (100, 256)  # the first 100 rows of a 256-token run against a 100-token run
BATCHES = (2, 5)  # the item at index 1 of a batch of 2, and at index 3 of a batch of 5
AT = {2: 1, 5: 3}


@dataclass(frozen=True)
class Invariance:
    batch: bool | None
    prefix: bool | None
    deterministic: bool | None
    witness: dict[str, str] = field(default_factory=dict)  # per property: where the bits differ, or why not measured


def problem(n_seq: int, batch: int | None = None, seed: int = 0) -> AttentionProblem:
    """The dense problem: GPT-2-scaled weights (seed 0, shared by every size), inputs of
    `n_seq` tokens; with `batch`, that many items, item AT[batch] the unbatched one."""
    w = np.random.default_rng(seed)
    c_attn_w, c_attn_b = w.normal(size=(N_EMBD, 3 * N_EMBD)) * 0.02, w.normal(size=3 * N_EMBD) * 0.02
    c_proj_w, c_proj_b = w.normal(size=(N_EMBD, N_EMBD)) * 0.02, w.normal(size=N_EMBD) * 0.02
    item = np.random.default_rng(seed + 1).normal(size=(PREFIX[1], N_EMBD))[:n_seq]  # the same rows at every n_seq
    x = item
    if batch is not None:
        others = np.random.default_rng(seed + 2).normal(size=(batch, n_seq, N_EMBD))
        others[AT[batch]] = item
        x = others
    return AttentionProblem(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, N_HEAD, label=f"invariance {x.shape}")


Outcome = tuple[bool | None, str | None]  # (holds, where the bits differ) or (None, why not measured)
HOLDS: Outcome = (True, None)


def measure(rw: Rewrite, backend: str, dtype: str) -> Invariance:
    """The three invariances of `rw` on `backend` in `dtype`."""
    m, n = PREFIX
    short = rw.takes(problem(m))
    if reach(rw, backend, dtype, rw.takes(problem(n))).n_seq < n:
        why = f"not measured: {backend} runs this loop on a prefix of long problems only"
        return Invariance(None, None, None, dict.fromkeys(("batch", "prefix", "deterministic"), why))
    try:
        alone = run_rewrite(rw, backend, dtype, short)
    except RewriteFailed as e:
        return Invariance(None, None, None, dict.fromkeys(("batch", "prefix", "deterministic"), f"not measured: {e}"))
    found: dict[str, Outcome] = {}
    for name, check in (("deterministic", _deterministic), ("batch", _batch), ("prefix", _prefix)):
        try:
            found[name] = check(rw, backend, dtype, short, alone)
        except RewriteFailed as e:
            found[name] = (None, f"not measured: {e}")
    witness = {k: w for k, (_, w) in found.items() if w is not None}
    return Invariance(found["batch"][0], found["prefix"][0], found["deterministic"][0], witness)


def _deterministic(rw: Rewrite, backend: str, dtype: str, short: AttentionProblem, alone: np.ndarray) -> Outcome:
    known = NONDETERMINISM.known(rw, backend)  # seen in the searches already
    if known is None:
        try:
            NONDETERMINISM.check(rw, backend, dtype, short, alone)
            return HOLDS
        except RewriteFailed as e:
            known = str(e)
    return (False, known)


def _batch(rw: Rewrite, backend: str, dtype: str, short: AttentionProblem, alone: np.ndarray) -> Outcome:
    for size in BATCHES:
        got = run_rewrite(rw, backend, dtype, rw.takes(problem(short.n_seq, size)))[AT[size]]
        if not np.array_equal(got, alone, equal_nan=True):
            return (False, f"item {AT[size]} of a batch of {size} differs from it alone {_where(got, alone)}")
    return HOLDS


def _prefix(rw: Rewrite, backend: str, dtype: str, short: AttentionProblem, alone: np.ndarray) -> Outcome:
    m, n = PREFIX
    if rw.output != "full":
        return (None, "not measured: the rewrite returns the last row only")
    got = run_rewrite(rw, backend, dtype, rw.takes(problem(n)))[:m]
    if not np.array_equal(got, alone, equal_nan=True):
        return (False, f"the first {m} rows of {n} tokens differ from {m} tokens alone {_where(got, alone)}")
    return HOLDS


def _where(a: np.ndarray, b: np.ndarray) -> str:
    """How far apart, and in which rows."""
    rows = np.flatnonzero((a != b).reshape(-1, a.shape[-2], a.shape[-1]).any(axis=(0, 2)))
    with np.errstate(all="ignore"):
        d = np.nanmax(np.abs(a - b))
    return f"by up to {d:.3g} (rows {rows[0]}..{rows[-1]}, {rows.size} of {a.shape[-2]})"
