"""The bitwise invariances serving relies on, measured beside every verdict (per rewrite x
backend x dtype), on each of its sources (`Source`): a synthetic problem (n_embd 256, 4
heads of 64, seeded) and, where the GPT-2 weights are found, the rewrite's real layer
(n_embd 768, 12 heads: its inputs along the real attention path, other layers' inputs as
the other items of a batch):

- batch: an item's output has the same bits alone and inside batches of other items
  (sizes BATCHES), what a server needs for an answer that does not depend on the batch;
- prefix: the first m rows have the same bits whether the sequence has m or n tokens
  (PREFIX), what a KV or prefix cache needs to reproduce the full pass;
- deterministic: two calls on the same input give the same bits: execute.Nondeterminism's
  check, the one that makes a nondeterministic rewrite an `error` (one check, not two).

Each is True (on every source), False with a witness (the source, where the bits differ,
and by how much), or None with the reason where it cannot be measured (the rewrite raised,
returns the last row only, or its backend runs only a prefix of long problems:
Backend.tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from oracles import backends
from oracles.problem import AttentionProblem
from rewrites.verify.execute import NONDETERMINISM, RewriteFailed, reach, run_rewrite

if TYPE_CHECKING:
    from rewrites.registry import Rewrite

#: The first 100 rows of a 256-token run against a 100-token run: with the real layer at 32
#: and 96 tokens in half precision JAX's bfloat16 batch variance and PyTorch's flash kernel's
#: bfloat16 prefix variance went unseen. But in a dtype its backend computes without BLAS
#: (Backend.unblocked: NumPy's float16, 12 s a rewrite for the real layer at 100/256) there
#: are no blocking choices to vary with the shape: with the real layer at 32/96 all 134 of
#: NumPy's float16 cells were the same (the whole catalogue, both ways, 2026-12-05). The
#: synthetic source stays at 100/256 there (1.5 s): at 32/96 it missed two tile- and
#: cache-length prefix variances (tiles_64_tail_dropped, ring_buffer_kv_cache).
PREFIX = (100, 256)
PREFIX_UNBLOCKED = (32, 96)  # a real layer in a dtype its backend computes without BLAS
BATCHES = (2, 5)  # the item at index 1 of a batch of 2, and at index 3 of a batch of 5
AT = {2: 1, 5: 3}
SYNTHETIC_EMBD, SYNTHETIC_HEADS = 256, 4
NAMES = ("batch", "prefix", "deterministic")


@dataclass(frozen=True)
class Invariance:
    batch: bool | None
    prefix: bool | None
    deterministic: bool | None
    witness: dict[str, str] = field(default_factory=dict)  # per property: where the bits differ, or why not measured


@dataclass(frozen=True)
class Source:
    """One item's problem and, for the batches, other items with the same weights."""

    name: str
    item: AttentionProblem  # at PREFIX[1] tokens, unbatched
    others: np.ndarray  # [max(BATCHES) - 1, PREFIX[1], n_embd]: the other items' x
    real: bool = False  # a real layer: PREFIX_UNBLOCKED in a dtype its backend computes without BLAS

    def problem(self, n_seq: int, batch: int | None = None) -> AttentionProblem:
        """The item at `n_seq` tokens; with `batch`, inside that many items, at AT[batch]."""
        item = self.item.prefix(n_seq)
        if batch is None:
            return item
        x = list(self.others[: batch - 1, :n_seq])
        x.insert(AT[batch], item.x)
        label = f"{self.name}, batch of {batch}"
        return AttentionProblem(np.stack(x), *item.arrays()[1:], n_head=item.n_head, label=label)


def synthetic(seed: int = 0) -> Source:
    """Seeded GPT-2-scaled weights, normal inputs: the same problem in every run."""
    e, n = SYNTHETIC_EMBD, PREFIX[1]
    w = np.random.default_rng(seed)
    c_attn_w, c_attn_b = w.normal(size=(e, 3 * e)) * 0.02, w.normal(size=3 * e) * 0.02
    c_proj_w, c_proj_b = w.normal(size=(e, e)) * 0.02, w.normal(size=e) * 0.02
    x = np.random.default_rng(seed + 1).normal(size=(max(BATCHES), n, e))
    item = AttentionProblem(x[0], c_attn_w, c_attn_b, c_proj_w, c_proj_b, SYNTHETIC_HEADS, label="synthetic")
    return Source("synthetic", item, x[1:])


def real(layers: Sequence[AttentionProblem], layer: int) -> Source:
    """GPT-2 layer `layer` on its real input; the next layers' inputs are the other items."""
    others = [layers[(layer + i) % len(layers)].x[: PREFIX[1]] for i in range(1, max(BATCHES))]
    return Source(f"real layer {layer}", layers[layer].prefix(PREFIX[1]), np.stack(others), real=True)


Outcome = tuple[bool | None, str | None]  # (holds, where the bits differ) or (None, why not measured)
HOLDS: Outcome = (True, None)


def measure(rw: Rewrite, backend: str, dtype: str, sources: Sequence[Source]) -> Invariance:
    """The three invariances of `rw` on `backend` in `dtype`: broken where any source breaks
    one, held where every source that could measure it holds it."""
    known = NONDETERMINISM.known(rw, backend, dtype)  # seen in the searches already
    if known is not None:
        return nondeterministic(known)
    found = [_on(rw, backend, dtype, s) for s in sources]
    values: dict[str, bool | None] = {}
    witness: dict[str, str] = {}
    for name in NAMES:
        outcomes = [(s, f[name]) for s, f in zip(sources, found, strict=True)]
        broken = [f"{s.name}: {w}" for s, (v, w) in outcomes if v is False]
        measured = [v for _, (v, _) in outcomes if v is not None]
        values[name] = False if broken else (True if measured else None)
        if broken:
            witness[name] = broken[0]
        elif not measured:
            witness[name] = outcomes[0][1][1] or "not measured"
    return Invariance(values["batch"], values["prefix"], values["deterministic"], witness)


def nondeterministic(seen: str) -> Invariance:
    """A rewrite seen nondeterministic (`seen` says where): not deterministic, and no bits to
    compare for the others (every later call of it is that error: execute.Nondeterminism)."""
    return Invariance(None, None, False, {"deterministic": seen, **dict.fromkeys(NAMES[:2], f"not measured: {seen}")})


def prefix(backend: str, dtype: str, source: Source) -> tuple[int, int]:
    """(m, n): the rows compared and the longer run's tokens; the batches run at m."""
    return PREFIX_UNBLOCKED if source.real and dtype in backends.get(backend).unblocked else PREFIX


def _on(rw: Rewrite, backend: str, dtype: str, source: Source) -> dict[str, Outcome]:
    m, n = prefix(backend, dtype, source)
    short = rw.takes(source.problem(m))
    if reach(rw, backend, dtype, rw.takes(source.problem(n))).n_seq < n:
        return dict.fromkeys(NAMES, (None, f"not measured: {backend} runs this loop on a prefix of long problems only"))
    try:
        alone = run_rewrite(rw, backend, dtype, short)
    except RewriteFailed as e:
        return dict.fromkeys(NAMES, (None, f"not measured: {e}"))
    found: dict[str, Outcome] = {}
    for name, check in (("deterministic", _deterministic), ("batch", _batch), ("prefix", _prefix)):
        try:
            found[name] = check(rw, backend, dtype, source, short, alone)
        except RewriteFailed as e:
            found[name] = (None, f"not measured: {e}")
    return found


def _deterministic(
    rw: Rewrite, backend: str, dtype: str, source: Source, short: AttentionProblem, alone: np.ndarray
) -> Outcome:
    try:
        NONDETERMINISM.check(rw, backend, dtype, short, alone)
        return HOLDS
    except RewriteFailed as e:
        return (False, str(e))


def _batch(
    rw: Rewrite, backend: str, dtype: str, source: Source, short: AttentionProblem, alone: np.ndarray
) -> Outcome:
    for size in BATCHES:
        got = run_rewrite(rw, backend, dtype, rw.takes(source.problem(short.n_seq, size)))[AT[size]]
        if not np.array_equal(got, alone, equal_nan=True):
            return (False, f"item {AT[size]} of a batch of {size} differs from it alone {_where(got, alone)}")
    return HOLDS


def _prefix(
    rw: Rewrite, backend: str, dtype: str, source: Source, short: AttentionProblem, alone: np.ndarray
) -> Outcome:
    m, n = prefix(backend, dtype, source)
    if rw.output != "full":
        return (None, "not measured: the rewrite returns the last row only")
    got = run_rewrite(rw, backend, dtype, rw.takes(source.problem(n)))[:m]
    if not np.array_equal(got, alone, equal_nan=True):
        return (False, f"the first {m} rows of {n} tokens differ from {m} tokens alone {_where(got, alone)}")
    return HOLDS


def _where(a: np.ndarray, b: np.ndarray) -> str:
    """How far apart, and in which rows."""
    rows = np.flatnonzero((a != b).reshape(-1, a.shape[-2], a.shape[-1]).any(axis=(0, 2)))
    with np.errstate(all="ignore"):
        d = np.nanmax(np.abs(a - b))
    return f"by up to {d:.3g} (rows {rows[0]}..{rows[-1]}, {rows.size} of {a.shape[-2]})"
