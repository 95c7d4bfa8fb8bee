"""Public Hypothesis strategies for attention problems.

Every strategy here generates `oracles.problem.AttentionProblem`s (float64 NumPy arrays
plus `n_head`). Small arrays are drawn elementwise, so Hypothesis shrinks a failure towards
few tokens, one head, head_dim 1, no batch and values like 0 and 1: a counterexample a
person can read. Large arrays (`dense_above`) come from a drawn seed instead, since
elementwise draws of thousands of values are mostly constant.

    @given(attention_problems())                # synthetic, moderate magnitudes
    @given(attention_problems(x_scales=EXTREME)) # large and tiny values too
    @given(attention_problems(logit_scales=LARGE_LOGITS)) # large logits
    @given(long_attention_problems())           # n_seq up to 2049, wide heads, dense values
    @given(gpt2_problems(weights))              # one of the 12 real GPT-2 layers
    @given(padded_problems(attention_problems())) # padded batches (Hugging Face's attention_mask)
    @given(packed_problems(attention_problems())) # packed documents (FlashAttention's cu_seqlens)

`SizeLimits` bounds what long problems cost (the float64 truth grows as n_seq^2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra.numpy import arrays

from oracles.gpt2 import GPT2Weights, attention_path, synthetic_stream
from oracles.problem import AttentionProblem
from oracles.truth import layer_norm

#: Scales of moderate inputs: logits stay within a few units.
MODERATE = (1.0, 0.5, 2.0)
#: Moderate scales plus large ones (logits in the thousands: exp overflows float32) and
#: tiny ones (values near float32's smallest normal numbers). Ordered so that shrinking,
#: which moves towards the front, finds the mildest scale that still fails.
EXTREME = (1.0, 0.5, 2.0, 8.0, 32.0, 128.0, 2.0**-10, 2.0**-60)

#: Extra factors on the query projection alone: logits of order 1e2..1e11 with ordinary
#: values everywhere else (exp(88) already overflows float32; a -1e4 mask leaks at 1e4;
#: picoGPT's -1e10 mask past 1e10, which only float64 holds within the bound).
LARGE_LOGITS = (1.0, 100.0, 3e4, 1e6, 1e11)

#: Batch shapes, simplest first: one item, then 2 and a trivial second dimension, then 3 x 11
#: items, where batch handling goes wrong: an odd count (a micro-batch loop that drops the
#: last item), past 4, 8, 16 and 32 (a kernel path chosen by batch size: 3 x 5 items let
#: one that broke from 16 items pass), two dimensions of several items each (merged in one
#: order, split in the other). Batches of 1 and 2 alone missed all three; (3,), (5,),
#: (2, 3) and (8,) as separate choices were each too rare to be drawn.
BATCHES = ((), (1,), (2,), (2, 1), (3, 11))

#: Sequence lengths where real rewrites change behaviour: a few short ones, then each power
#: of two from 16 (tiles, blocks, windows, chunks, caches) with one either side, past
#: GPT-2's context of 1024.
LENGTH_LADDER = (1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
                 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049)  # fmt: skip

#: (n_head, head_dim) pairs, simplest first (shrinking moves towards the front): few distinct
#: shapes, since JAX compiles every rewrite once per shape, and few enough that each is drawn
#: (with two more, 20 examples of 1..17 tokens missed both odd head counts). The small ones
#: make readable counterexamples; head_dim 64 and 128 reach the tile sizes of real kernels;
#: 7 heads leave a remainder in groups of 2 to 6 (GPT-2 XL has 25 heads); 33 heads of 1 test
#: many heads cheaply, past 16 and 32 (a fault from 16 heads on passed 12 heads of 2, which
#: this replaces; 12 heads divide evenly in (12, 64), GPT-2 small itself, and in the real
#: layers). head_dim 256 is tried as an explicit example (rewrites/verify/inputs.py).
HEAD_SHAPES = ((1, 1), (2, 1), (1, 3), (2, 3), (7, 2), (33, 1), (1, 64), (2, 64), (1, 128), (12, 64))

#: How many elementwise values a problem of `long_attention_problems` draws; arrays that do
#: not fit in them (any of more elements, for one) are dense: N(0, 1) from a drawn seed.
DENSE_ABOVE = 64


@dataclass(frozen=True)
class SizeLimits:
    """What a drawn problem may cost. Up to `short_seq` tokens any head shape and batch
    goes; past it n_embd is at most `long_max_embd` (so GPT-2's 768 only at short lengths)
    and the batch one of `long_batches`; at any length the attention matrices hold at most
    `max_scores` elements (batch x n_head x n_seq^2). The float64 truth and its bound keep
    about 15 arrays of that size: at the default, two 2049 x 2049 matrices, ground_truth
    plus tolerance("float32") take about 1.1 GB and 3 to 7 s on a shared 2-core machine."""

    short_seq: int = 64
    long_max_embd: int = 128
    long_batches: tuple[tuple[int, ...], ...] = ((), (2,))
    max_scores: int = 2 * 2049**2

    def allows(self, batch: tuple[int, ...], n_seq: int, n_head: int, head_dim: int) -> bool:
        """Is a problem of this shape within the limits? (A batch of more than 2 items also
        keeps n_embd to `long_max_embd`: 15 items of GPT-2's width cost NumPy's float16,
        which has no BLAS, 7 s a run, and its searches went from 63 to 548 s a catalogue.)"""
        if math.prod(batch) * n_head * n_seq**2 > self.max_scores:
            return False
        if math.prod(batch) > 2 and n_head * head_dim > self.long_max_embd:
            return False
        return n_seq <= self.short_seq or (n_head * head_dim <= self.long_max_embd and batch in self.long_batches)


SIZE_LIMITS = SizeLimits()


_UNIT = st.floats(-1.0, 1.0, allow_subnormal=False)


def unit_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of `shape` with elements in [-1, 1] (shrinking towards 0)."""
    return arrays(np.float64, shape, elements=_UNIT)


def _sizes(limit: int | Sequence[int]) -> st.SearchStrategy[int]:
    return st.integers(1, limit) if isinstance(limit, int) else st.sampled_from(sorted(limit))


def _size_list(limit: int | Sequence[int]) -> list[int]:
    return list(range(1, limit + 1)) if isinstance(limit, int) else sorted(limit)


@st.composite
def shapes(
    draw: st.DrawFn,
    *,
    max_seq: int | Sequence[int] = 6,
    max_head: int | Sequence[int] = 3,
    max_head_dim: int | Sequence[int] = 4,
    batches=BATCHES,
) -> tuple[tuple[int, ...], int, int, int]:
    """(batch, n_seq, n_head, head_dim): batch is one of `batches`; each size is drawn from
    1..limit, or from the given sizes when a limit is a sequence (few distinct shapes keep
    JAX's per-shape compilation caches warm)."""
    return (
        draw(st.sampled_from(batches)),
        draw(_sizes(max_seq)),
        draw(_sizes(max_head)),
        draw(_sizes(max_head_dim)),
    )


#: (batch, n_seq, n_head, head_dim)
Shape = tuple[tuple[int, ...], int, int, int]


def _menu(menu: Sequence[Shape]) -> list[Shape]:
    """`menu` checked: a shape of positive sizes each (one line naming the bad entry)."""
    for entry in menu:
        batch, *sizes = entry
        if not (isinstance(batch, tuple) and all(isinstance(n, int) and n >= 1 for n in (*batch, *sizes))):
            raise InvalidArgument(f"shape_menu entry {entry!r} is not (batch, n_seq, n_head, head_dim) of sizes >= 1")
    if not menu:
        raise InvalidArgument("shape_menu is empty")
    return list(menu)


def _rungs(ladder: Sequence[int], max_len: int | None) -> list[int]:
    rungs = {r for r in ladder if max_len is None or r <= max_len} | ({max_len} if max_len else set())
    if not rungs or min(rungs) < 1:
        raise InvalidArgument(f"no sequence length >= 1 in ladder={ladder} up to max_len={max_len}")
    return sorted(rungs)


def _in_band(lo: int, hi: int, on_rung: bool, slot: int) -> int:
    """Slot 0..254 of the lengths strictly between lo and hi, spread evenly (all of them when
    there are at most 255), in increasing order; slot 255, on a rung, or an empty gap: hi."""
    inside = hi - lo - 1
    return hi if on_rung or slot == 255 or inside <= 0 else lo + 1 + slot * inside // 255


@st.composite
def sequence_lengths(
    draw: st.DrawFn, *, ladder: Sequence[int] = LENGTH_LADDER, max_len: int | None = None, between: bool = True
) -> int:
    """A sequence length n_seq.

    The rungs are the lengths of `ladder` up to `max_len` (which, when given, is the top
    rung). Each draw picks a rung uniformly; with `between`, one draw in four instead takes
    a length strictly between that rung and the one below it, uniformly (every length in
    gaps up to 256 wide; a grid of 255 in wider gaps, e.g. every 4th length in 1026..2046),
    so thresholds off the ladder (100, 300, 1000) are crossed too. (Hypothesis's engine
    itself favours the simplest choices: in a derandomised search n_seq is 1 about a
    quarter of the time, and runs of examples share one length.)

    Lowering any choice behind n_seq never lengthens it, so Hypothesis shrinks a failure to
    the shortest length this strategy can draw that still fails: one at every n_seq > 300
    to 301, one at n_seq > 64 to the rung 65.
    """
    rungs = _rungs(ladder, max_len)
    band = draw(st.integers(0, len(rungs) - 1))
    if not between:
        return rungs[band]
    on_rung = draw(st.integers(0, 3)) > 0
    slot = draw(st.integers(255 if on_rung else 0, 255))  # pinned on a rung, so lowering on_rung keeps n_seq
    return rungs[0] if band == 0 else _in_band(rungs[band - 1], rungs[band], on_rung, slot)


def _lengths(lengths: st.SearchStrategy[int] | Sequence[int]) -> st.SearchStrategy[int]:
    return lengths if isinstance(lengths, st.SearchStrategy) else st.sampled_from(sorted(set(lengths)))


@st.composite
def _limited_shapes(
    draw: st.DrawFn,
    lengths: st.SearchStrategy[int],
    head_shapes: Sequence[tuple[int, int]],
    batches: Sequence[tuple[int, ...]],
    min_seq: int,
    limits: SizeLimits,
) -> tuple[tuple[int, ...], int, int, int]:
    """(batch, n_seq, n_head, head_dim): n_seq first, then a head shape and a batch that fit
    `limits` at that length. Up to `limits.short_seq` tokens, half the draws take a batch
    of more than 2 items where `batches` has one: drawn with the others, such batches were
    1 in 60 of a search's problems (Hypothesis favours the first choices), and faults that
    need 3 items, 5, or two batch dimensions went unseen. Shrinking moves towards the rest."""
    n_seq = max(draw(lengths), min_seq)
    fitting = [hs for hs in head_shapes if any(limits.allows(b, n_seq, *hs) for b in batches)]
    if not fitting:
        raise InvalidArgument(f"no head shape of {head_shapes} with a batch of {batches} fits {limits} at {n_seq=}")
    n_head, head_dim = draw(st.sampled_from(fitting))
    allowed = [b for b in batches if limits.allows(b, n_seq, n_head, head_dim)]
    several = [b for b in allowed if math.prod(b) > 2]
    if several and len(several) < len(allowed) and n_seq <= limits.short_seq and draw(st.booleans()):
        return draw(st.sampled_from(several)), n_seq, n_head, head_dim
    batch = draw(st.sampled_from([b for b in allowed if b not in several] or allowed))
    return batch, n_seq, n_head, head_dim


def _values(
    draw: st.DrawFn, shapes: Sequence[tuple[int, ...]], dense_above: int | None
) -> tuple[list[np.ndarray], int | None]:
    """Standard-scale values for arrays of `shapes`, and the seed if any array is dense.

    Without `dense_above`: `unit_arrays` each. With it, every problem draws a seed and a run
    of `dense_above` values in [-1, 1], each its own choice (shrinking towards 0); the
    arrays in turn take their values from the run while they fit in what is left, and any
    that does not is N(0, 1) from (seed, its index). Every problem thus makes the same
    choices whatever its shape, so Hypothesis (which prefers fewer choices) shrinks towards
    small shapes rather than towards dense ones."""
    if dense_above is None:
        return [draw(unit_arrays(shape)) for shape in shapes], None
    seed = draw(st.integers(0, 2**32 - 1))
    run = draw(arrays(np.float64, dense_above, elements=_UNIT, fill=st.nothing()))
    values, used, dense = [], 0, False
    for i, shape in enumerate(shapes):
        size = math.prod(shape)
        if used + size <= dense_above:
            values.append(run[used : used + size].reshape(shape))
            used += size
        else:
            values.append(np.random.default_rng([seed, i]).standard_normal(shape))
            dense = True
    return values, seed if dense else None


@st.composite
def attention_problems(
    draw: st.DrawFn,
    *,
    max_seq: int | Sequence[int] = 6,
    max_head: int | Sequence[int] = 3,
    max_head_dim: int | Sequence[int] = 4,
    batches=BATCHES,
    x_scales=MODERATE,
    w_scales=MODERATE,
    logit_scales=(1.0,),
    min_seq: int = 1,
    lengths: st.SearchStrategy[int] | Sequence[int] | None = None,
    head_shapes: Sequence[tuple[int, int]] | None = None,
    dense_above: int | None = None,
    limits: SizeLimits = SIZE_LIMITS,
    shape_menu: Sequence[Shape] | None = None,
) -> AttentionProblem:
    """A synthetic attention problem.

    Shapes: with neither `lengths` nor `head_shapes` (the default), batch, n_seq, n_head and
    head_dim are drawn independently by `shapes` from `batches`, `max_seq`, `max_head` and
    `max_head_dim`, as they always were. Given either, n_seq is drawn first, from `lengths`
    (a strategy such as `sequence_lengths()`, or a sequence of lengths) else from `max_seq`;
    then (n_head, head_dim) from `head_shapes` (else all pairs of `max_head` x `max_head_dim`,
    smallest n_embd first) and the batch from `batches`, keeping only those within `limits`
    at that length. Given `shape_menu`, (batch, n_seq, n_head, head_dim) is one of its
    entries instead (shrinking moves towards the first): a fixed handful of shapes for a
    backend that compiles per shape (JAX). n_seq is at least `min_seq` in every case.

    Values: by default every array is drawn elementwise in [-1, 1] (`unit_arrays`). With
    `dense_above` (0..1024), each problem draws `dense_above` such values, which x, c_attn_w,
    c_attn_b, c_proj_w and c_proj_b in turn take while they fit; an array that does not fit
    (so any of more than `dense_above` elements) is N(0, 1) from a seed drawn with the
    problem, and the label says so: "synthetic dense seed=123 x*1 w*1". x is that times a
    scale from `x_scales`; the weights times a scale from `w_scales` over sqrt(n_embd), the
    usual initialisation, so with MODERATE scales q, k, v are O(1) and logits a few units
    at most. The query columns of c_attn are further multiplied by a factor from
    `logit_scales`, which scales the logits alone (e.g.
    LARGE_LOGITS).
    """
    if dense_above is not None and not 0 <= dense_above <= 1024:
        raise InvalidArgument(f"{dense_above=}: each small array draws that many values; keep it within 0..1024")
    if shape_menu is not None:
        batch, n_seq, n_head, head_dim = draw(st.sampled_from(_menu(shape_menu)))
        n_seq = max(n_seq, min_seq)
    elif lengths is None and head_shapes is None:
        batch, n_seq, n_head, head_dim = draw(
            shapes(max_seq=max_seq, max_head=max_head, max_head_dim=max_head_dim, batches=batches)
        )
        n_seq = max(n_seq, min_seq)
    else:
        if head_shapes is None:
            pairs = [(h, d) for h in _size_list(max_head) for d in _size_list(max_head_dim)]
            head_shapes = sorted(pairs, key=lambda hd: (hd[0] * hd[1], hd[0]))
        seqs = _lengths(lengths) if lengths is not None else _sizes(max_seq)
        batch, n_seq, n_head, head_dim = draw(_limited_shapes(seqs, head_shapes, batches, min_seq, limits))
    n_embd = n_head * head_dim
    x_scale, w_scale = draw(st.sampled_from(x_scales)), draw(st.sampled_from(w_scales))
    logit_scale = draw(st.sampled_from(logit_scales))
    sizes = ((*batch, n_seq, n_embd), (n_embd, 3 * n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,))
    (x, c_attn_w, c_attn_b, c_proj_w, c_proj_b), seed = _values(draw, sizes, dense_above)
    w = w_scale / math.sqrt(n_embd)
    q_factor = np.concatenate([np.full(n_embd, logit_scale), np.ones(2 * n_embd)])
    label = "synthetic" + (f" dense seed={seed}" if seed is not None else "") + f" x*{x_scale:g} w*{w_scale:g}"
    return AttentionProblem(
        x=x * x_scale,
        c_attn_w=c_attn_w * w * q_factor,
        c_attn_b=c_attn_b * w * q_factor,
        c_proj_w=c_proj_w * w,
        c_proj_b=c_proj_b * w,
        n_head=n_head,
        label=label + (f" q*{logit_scale:g}" if logit_scale != 1 else ""),
    )


def long_attention_problems(
    *,
    max_len: int | None = None,
    ladder: Sequence[int] = LENGTH_LADDER,
    between: bool = True,
    head_shapes: Sequence[tuple[int, int]] = HEAD_SHAPES,
    batches: Sequence[tuple[int, ...]] = BATCHES,
    x_scales=MODERATE,
    w_scales=MODERATE,
    logit_scales=(1.0,),
    min_seq: int = 1,
    dense_above: int = DENSE_ABOVE,
    limits: SizeLimits = SIZE_LIMITS,
    shape_menu: Sequence[Shape] | None = None,
) -> st.SearchStrategy[AttentionProblem]:
    """Synthetic problems at the lengths where rewrites change behaviour, with dense values.

    n_seq from `sequence_lengths(ladder=..., max_len=..., between=...)` (1 to 2049 by
    default: a rung of LENGTH_LADDER, or one time in four a length between two rungs);
    (n_head, head_dim) from HEAD_SHAPES and the batch from BATCHES, as far as `limits`
    allow at that n_seq. By default, past 64 tokens n_embd <= 128 (so (12, 64) only up to
    64 tokens) and the batch is () or (2,); and batch x n_head x n_seq^2 <= 2 x 2049^2
    always, so 2049 tokens take one head in a batch of 2 or two heads alone, and 33 heads
    of 1 stop at 504 tokens (356 in a batch). Arrays of more than `dense_above` elements
    (and any that do not fit in the `dense_above` elementwise values the problem draws) are
    N(0, 1) from one drawn seed, labelled e.g. "synthetic dense seed=123 x*1 w*1"; the rest
    as in `attention_problems`. With `shape_menu`, the shape is one of its entries instead
    (see `attention_problems`).
    """
    return attention_problems(
        lengths=sequence_lengths(ladder=ladder, max_len=max_len, between=between),
        head_shapes=head_shapes,
        batches=batches,
        x_scales=x_scales,
        w_scales=w_scales,
        logit_scales=logit_scales,
        min_seq=min_seq,
        dense_above=dense_above,
        limits=limits,
        shape_menu=shape_menu,
    )


@st.composite
def gpt2_problems(draw: st.DrawFn, weights: GPT2Weights, *, max_seq: int = 16, layers=None) -> AttentionProblem:
    """One real GPT-2 attention sublayer (layer drawn from `layers`, default all 12) on a
    realistic input: synthetic token embeddings plus real positions (`synthetic_stream`),
    carried through the real attention path of the earlier layers, then the layer's ln_1."""
    layer = draw(st.sampled_from(layers if layers is not None else range(weights.config.n_layer)))
    n_seq = draw(st.integers(1, max_seq))
    seed = draw(st.integers(0, 2**16))
    stream = attention_path(weights, synthetic_stream(weights, n_seq, seed), layer)[-1]
    real = weights.layer(layer)
    return real.problem(layer_norm(stream, real.ln_g, real.ln_b, real.eps))


#: Lengths of a packed batch's short documents (a zero-length one too: cu_seqlens repeats)
SHORT_DOCUMENTS = (1, 0, 2, 3, 5, 8, 16, 17)


@st.composite
def padded_problems(
    draw: st.DrawFn, problems: st.SearchStrategy[AttentionProblem], *, sides: Sequence[str] = ("left", "right")
) -> AttentionProblem:
    """A problem from `problems` as a padded batch (`AttentionProblem.padded`): one side for
    the whole batch, as a tokenizer pads; each row's real length the full n_seq, 0 (all
    padding: its queries see nothing), 1, n_seq - 1, half, or anything between, shrinking
    towards no padding at all."""
    p = draw(problems)
    n, side = p.n_seq, draw(st.sampled_from(sides))
    rows = int(np.prod(p.x.shape[:-2], dtype=np.int64))
    typical = st.sampled_from(sorted({n, 0, 1, max(n - 1, 0), n // 2}, key=lambda m: (m != n, m)))
    return p.padded([draw(typical | st.integers(0, n)) for _ in range(rows)], side)


@st.composite
def packed_problems(
    draw: st.DrawFn, problems: st.SearchStrategy[AttentionProblem], *, max_documents: int = 64
) -> AttentionProblem:
    """A problem from `problems` as packed documents (`AttentionProblem.packed`): up to
    `max_documents` - 1 short ones (SHORT_DOCUMENTS, empty ones too) and one long one
    anywhere among them taking the rest, then 0, 1 or more padding positions; shrinking
    towards one document and no padding."""
    p = draw(problems)
    n = p.n_seq
    tail = draw(st.sampled_from((0, 1)) | st.integers(0, n))
    short = draw(st.lists(st.sampled_from(SHORT_DOCUMENTS), max_size=max_documents - 1))
    room, fitted = n - tail, []
    for d in short:  # as many as fit before the long one is left empty
        if sum(fitted) + d <= room:
            fitted.append(d)
    at = draw(st.integers(0, len(fitted)))
    return p.packed([*fitted[:at], room - sum(fitted), *fitted[at:]])
