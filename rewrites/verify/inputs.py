"""What each search sees: the synthetic strategies, the real-layer plan, and the explicit
examples of known hard cases.

Synthetic problems cross the lengths where real rewrites change behaviour (the rungs of
`LENGTH_LADDER`, 1 to 2049, and lengths between them; 4097 in an explicit example), with
head_dim up to 128 (256 on JAX's menu and in the explicit examples), up to 33 heads and
batches of up to 3 x 11 items (65 and 5 x 13 in the explicit examples), dense content at
long lengths (see `properties.strategies`); in float16 and bfloat16, whose NumPy matmuls
have no BLAS, up to 257 tokens. Real GPT-2 layers are seen at the full context: in float64
and float32 each rewrite x backend sees one of the 12 layers at n_seq 1024 and another at
1000 (not a power of two), chosen from the rewrite's name and the backend so that the three
backends see layers four apart and a catalogue run covers all 12; float16 and bfloat16 see
that layer at 256; every backend and dtype also sees all 12 layers at 16 tokens.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from hypothesis.strategies import SearchStrategy

from oracles import backends, gpt2, truth
from oracles.problem import AttentionProblem
from oracles.reference import file_fingerprint, stored
from properties.strategies import (
    EXTREME,
    LARGE_LOGITS,
    LENGTH_LADDER,
    attention_problems,
    long_attention_problems,
    packed_problems,
    padded_problems,
)
from rewrites.verify.verdicts import CLAIM_DTYPES

FULL_CONTEXT = 1024
OFF_LADDER = 1000  # a full-context length that is not a power of two
HALF_PRECISION_N_SEQ = 256
SHORT = 16
HALF_MAX_LEN = 257  # synthetic lengths in half precision: NumPy's float16 matmul has no BLAS


Bands = tuple[SearchStrategy, ...]  # one search = one Hypothesis search per band, examples shared out


@dataclass(frozen=True)
class Profile:
    """How far the searches go: the synthetic strategies (in length bands, each given its
    share of a search's examples, so long lengths are always reached) and the real-layer
    lengths."""

    name: str
    moderate: Bands  # Stage.FORMULA: float64, moderate magnitudes
    extreme: Bands  # Stage.DTYPE: each dtype, extreme magnitudes and large logits too
    real_n_seq: int | None  # None: `real_plan`'s lengths up to the full context; N: every layer at N
    extreme_half: Bands | None = None  # Stage.DTYPE in float16/bfloat16 (default: `extreme`)
    #: The same searches for a backend that compiles per shape (`Backend.compiles`): shapes
    #: from a fixed menu (default: this profile's own)
    few_shapes: Profile | None = None
    #: A failure of more tokens is not shrunk (None: every one is): on a fixed menu shrinking
    #: cannot shorten it, only reseed its dense values (the cut still makes its length exact)
    shrink_up_to: int | None = None
    #: Explicit examples (`known_hard`) of more tokens are left out (None: none is): pytest's
    #: quick verdicts, for every rewrite x backend, skip the 4097-token one
    explicit_up_to: int | None = None

    def extreme_for(self, dtype: str) -> Bands:
        return self.extreme if dtype in CLAIM_DTYPES or self.extreme_half is None else self.extreme_half

    def bands(self, stage_is_formula: bool, dtype: str) -> Bands:
        """The bands of one search: moderate inputs for the formula, else the dtype's own."""
        return self.moderate if stage_is_formula else self.extreme_for(dtype)

    def on(self, backend: backends.Backend) -> Profile:
        """This profile as `backend` runs it: its few-shapes form where each shape compiles."""
        return self.few_shapes if backend.compiles and self.few_shapes is not None else self


SHORT_BAND = tuple(n for n in LENGTH_LADDER if n <= HALF_MAX_LEN)  # 1 .. 257
LONG_BAND = tuple(n for n in LENGTH_LADDER if n >= 255)  # 255 .. 2049
_EXTREME = dict(x_scales=EXTREME, w_scales=EXTREME, logit_scales=LARGE_LOGITS)

#: The shapes (batch, n_seq, n_head, head_dim) of a search on a backend that compiles each
#: rewrite once per shape and dtype (JAX), simplest first. Drawn freely, a rewrite's five
#: searches took about 100 distinct shapes, each a compilation (~155 a rewrite with the
#: real layers; cold, most of JAX's time). These cover the kinds of fault the free draws
#: do, fewer times: one token; a batch of 3 x 11 (odd, more than 32, two dimensions) with
#: 7 heads (a remainder in groups of 2 to 6); 33 heads (past 16 and 32); 12 heads; head_dim
#: 64, 128 and 256; GPT-2's width;
#: lengths past each power of two from 16 to 2048 and off the ladder (100, 300, 1000), so
#: tiles, windows and thresholds of any size to 2048 are crossed with a partial last tile.
#: The formula and dtype searches share them (float64 compiles each once).
FEW_SHORT = (
    ((), 1, 1, 1),
    ((3, 11), 7, 7, 2),
    ((2,), 17, 33, 1),
    ((), 33, 1, 256),
    ((2, 1), 64, 12, 64),
    ((), 100, 1, 128),
    ((2,), 129, 4, 32),
    ((), 257, 2, 64),
)
FEW_LONG = (
    ((), 300, 12, 2),
    ((2,), 513, 2, 64),
    ((), 1000, 1, 128),
    ((), 1025, 4, 32),
    ((2,), 2048, 1, 64),
    ((), 2049, 2, 3),
)


def _profile(name: str, short: Sequence[dict], long: Sequence[dict], few_shapes: Profile | None = None) -> Profile:
    """Bands of `long_attention_problems` with these arguments: the short ones (1..257
    tokens) and the long ones (255..2049), or the short ones alone in half precision."""
    bands = lambda kinds, **magnitudes: tuple(long_attention_problems(**k, **magnitudes) for k in kinds)
    return Profile(name, bands([*short, *long]), bands([*short, *long], **_EXTREME), None, bands(short, **_EXTREME),
                   few_shapes)  # fmt: skip


def _pairs(menu: Sequence) -> list[dict]:
    """A band for each two shapes of a menu: Hypothesis draws a menu's first shape about
    half the time, and a band of four shapes with 7 examples left shapes out."""
    return [dict(shape_menu=menu[i : i + 2]) for i in range(0, len(menu), 2)]


#: What `verify` runs: half of each search's examples at 1..257 tokens, half at 255..2049
#: (both with lengths between the rungs too), head_dim to 128, 33 heads; real layers at 1024.
#: On JAX the same searches draw their shapes from FEW_SHORT and FEW_LONG.
FULL = _profile(
    "full",
    [dict(ladder=SHORT_BAND)],
    [dict(ladder=LONG_BAND)],
    dataclasses.replace(_profile("full, few shapes", _pairs(FEW_SHORT), _pairs(FEW_LONG)), shrink_up_to=64),
)
# Few distinct short shapes; still two heads, head_dim > 1, a partial tile, a batch.
_SHORT_SHAPES = dict(max_seq=(1, 2, 3, 5), max_head=(1, 2), max_head_dim=(1, 3), batches=((), (2,)))
#: QUICK's shapes on a backend that compiles per shape (bands of two, as FEW_SHORT's). Drawn
#: freely from _SHORT_SHAPES (32 shapes), a quick JAX verdict compiled about 30 programs,
#: most of its time in CI. These keep what the free draws cross: one token; two heads of 3
#: over an odd length with a partial tile of 2; a batch; one head of one dimension.
QUICK_SHAPES = (((), 1, 1, 1), ((), 5, 2, 3), ((2,), 3, 2, 3), ((2,), 2, 1, 1))


def _quick(name: str, kinds: Sequence[dict], few_shapes: Profile | None = None) -> Profile:
    """Bands of `attention_problems` with these arguments, moderate and extreme."""
    bands = lambda **magnitudes: tuple(attention_problems(**k, **magnitudes) for k in kinds)
    return Profile(name, bands(), bands(**_EXTREME), SHORT, few_shapes=few_shapes)


#: The quick profile pytest uses for rewrites whose behaviour does not depend on length.
QUICK = dataclasses.replace(
    _quick("quick", [_SHORT_SHAPES], _quick("quick, few shapes", _pairs(QUICK_SHAPES))), explicit_up_to=FULL_CONTEXT + 1
)


@dataclass(frozen=True)
class RealInput:
    layer: int
    n_seq: int


def real_layer(rewrite: str, backend: str, n_layer: int = 12, pinned: int | None = None) -> int:
    """The layer a rewrite sees at the full context on a backend: from its name, the
    backends' layers n_layer / 3 apart (the module doc says why); `pinned`: that layer for
    every rewrite and backend (pytest: their long truths are then computed once a run)."""
    if pinned is not None:
        if not 0 <= pinned < n_layer:
            raise ValueError(f"real layer {pinned}: the weights have layers 0..{n_layer - 1}")
        return pinned
    spread = n_layer // len(backends.NAMES)
    return (zlib.crc32(rewrite.encode()) + spread * backends.NAMES.index(backend)) % n_layer


def real_plan(
    rewrite: str, backend: str, dtype: str, n_layer: int = 12, n_seq: int | None = None, pinned: int | None = None
) -> list[RealInput]:
    """The (layer, n_seq) pairs a rewrite sees on a backend in a dtype (the module doc says
    why); with `n_seq` given, every layer at that length alone (a quick run); `pinned`: the
    long lengths' layer (see `real_layer`)."""
    if n_seq is not None:
        return [RealInput(i, n_seq) for i in range(n_layer)]
    layer = real_layer(rewrite, backend, n_layer, pinned)
    long = [RealInput(layer, FULL_CONTEXT), RealInput((layer + 1) % n_layer, OFF_LADDER)]
    if dtype not in CLAIM_DTYPES:
        long = [RealInput(layer, HALF_PRECISION_N_SEQ)]
    return [RealInput(i, SHORT) for i in range(n_layer)] + long


class RealLayers:
    """The 12 real layers' inputs along the real attention path, computed once at the
    longest length needed; shorter inputs are its prefixes (causal: the stream of the
    first n tokens is the first n rows of the stream)."""

    def __init__(self, weights: gpt2.GPT2Weights, n_seq: int, seed: int = 0) -> None:
        # ~20 s at 1024 tokens (the float64 attention path through 11 layers): kept on disk,
        # keyed by the weights file and the code that computes it
        c = weights.config
        parts = ("layer inputs", str(weights.path), weights.path.stat().st_size, weights.path.stat().st_mtime_ns,
                 file_fingerprint(gpt2.__file__), file_fingerprint(truth.__file__), n_seq, seed)  # fmt: skip
        make = lambda: np.stack([p.x for p in gpt2.layer_problems(weights, n_seq, seed)])
        xs = stored(parts, (c.n_layer, n_seq, c.n_embd), make)
        self.full = [layer.problem(x) for layer, x in zip(weights.layers(), xs, strict=True)]

    def problems(self, plan: Sequence[RealInput]) -> list[tuple[int, AttentionProblem]]:
        return [(r.layer, self.full[r.layer].prefix(r.n_seq)) for r in plan]


#: The longest explicit example: past a 4096-token window or cache.
LONGEST_KNOWN_HARD = 4097


def known_hard(stage_is_formula: bool) -> list[AttentionProblem]:
    """Explicit examples tried before every synthetic search, as Hypothesis's @example:
    inputs that found faults before. Empty them (Config.explicit_examples=False) to show
    that a search finds a fault by itself."""
    rng = np.random.default_rng(0)

    def dense(
        n_seq: int, n_head: int, head_dim: int, q: float = 1.0, label: str = "", batch: tuple[int, ...] = ()
    ) -> AttentionProblem:
        e = n_head * head_dim
        w = rng.normal(size=(e, 3 * e)) / np.sqrt(e)
        w[:, :e] *= q
        return AttentionProblem(
            rng.normal(size=(*batch, n_seq, e)), w, rng.normal(size=3 * e) / np.sqrt(e),
            rng.normal(size=(e, e)) / np.sqrt(e), rng.normal(size=e) / np.sqrt(e), n_head, label=f"known hard: {label}",
        )  # fmt: skip

    if stage_is_formula:  # moderate inputs only: a failure here means a wrong formula
        # four heads: two groups of two for grouped-KV kernels, where a wrong head map shows;
        # then an odd head count, a batch of 5 x 13 items (odd, more than 64, two
        # dimensions), 65 heads and head_dim 256 (past the thresholds of kernels that choose a
        # path by batch, head count or head_dim: 16, 32, 64; the searches go to 3 x 11 items
        # and 33 heads):
        # after the long one, so a fault that every input shows keeps it as its counterexample
        # (cut short), unbatched; last, the dearest: 4097 tokens, past the 4096-token
        # windows and caches real models ship (Mistral), which the searches (to 2049) never
        # reach, on one narrow head (its truth and bound: 2 GB of float64 for a moment)
        # with an attention sink (`attention_sink`)
        return [dense(1025, 4, 32, label="full context + 1, four heads of 32"),
                dense(7, 3, 2, label="three heads"),
                dense(7, 2, 3, batch=(5, 13), label="a batch of 5 x 13 items"),
                dense(17, 65, 1, batch=(2,), label="65 heads"),
                dense(33, 1, 256, label="head_dim 256"),
                attention_sink(dense(LONGEST_KNOWN_HARD, 1, 4, label="past 4096 tokens, a sink at token 0"))
                ]  # fmt: skip
    return [  # large logits: only instabilities show here, so only the dtype searches try them
        dense(5, 2, 3, q=3e4, label="logits near 1e4 (additive -1e4 masks leak)"),
        dense(2, 1, 3, q=1e11, label="logits near 1e11 (picoGPT's -1e10 mask leaks)"),
        dense(5, 2, 3, q=15, label="logits near 30 (exp overflows float16 from 11.1 on)"),
    ]


def attention_sink(p: AttentionProblem, logit: float = 12.0) -> AttentionProblem:
    """p (one head) with token 0 an attention sink, as trained models make their first
    token (StreamingLLM): every query's logit for key 0 near `logit` (the queries share a
    direction u through their bias, and k_0 lies along it); at 12, a median 90% of a row's
    weight on the 4097-token example. With diffuse weights, a key lost from a 4097-token
    row (a window's) moves the output by about 1/4097 of a value, as much as float32's own
    error bound admits at that length, so float32 judged a 4096-token window `equivalent`
    on such a problem; the sink's loss shows in every dtype."""
    if p.n_head != 1 or p.x.ndim != 2:
        raise ValueError(f"an attention sink is made for one head, unbatched, not {p.n_head} heads of {p.x.shape}")
    e = p.n_embd
    u = np.ones(e) / np.sqrt(e)
    b = p.c_attn_b.copy()
    b[:e] += 4 * u  # q_i . u near 4 for every query
    k0 = logit * np.sqrt(e) / 4 * u  # q_i . k_0 / sqrt(e) near `logit`
    x = p.x.copy()
    x[0] = np.linalg.solve(p.c_attn_w[:, e : 2 * e].T, k0 - b[e : 2 * e])  # x_0 W_k + b_k = k_0
    return dataclasses.replace(p, x=x, c_attn_b=b)


def laid_out(bands: Bands, layout: str) -> Bands:
    """The bands' problems with a drawn layout: padded batches or packed documents."""
    if layout == "dense":
        return bands
    return tuple(padded_problems(b) if layout == "padded" else packed_problems(b) for b in bands)


#: A real layer's packed documents, as many as fit before the rest (one long document) and
#: a padding tail of n_seq // 16: at 1024 tokens [1, 7, 100, 300, 552] and 64 padding.
REAL_DOCUMENTS = (1, 7, 100, 300)


def with_layout(problem: AttentionProblem, layout: str) -> AttentionProblem:
    """A fixed layout for a problem not drawn by Hypothesis (a real layer, an explicit
    example); one that has a layout keeps it. Padded: a batch of two copies, the first
    left-padded to two thirds of its tokens, the second right-padded to three quarters
    (padding positions hold real hidden states, as a pad token's do); a batched problem's
    rows alternate so. Packed: REAL_DOCUMENTS."""
    if layout == "dense" or problem.segments is not None:
        return problem
    n = problem.n_seq
    if layout == "padded":
        if problem.x.ndim == 2:
            problem = dataclasses.replace(problem, x=np.stack([problem.x, problem.x]))
        rows = int(np.prod(problem.x.shape[:-2], dtype=np.int64))
        return problem.padded([n - n // 3, n - n // 4] * (rows // 2) + [n - n // 3] * (rows % 2),
                              ["left", "right"] * (rows // 2) + ["left"] * (rows % 2))  # fmt: skip
    room, docs = n - n // 16, []
    for d in REAL_DOCUMENTS:
        if sum(docs) + d < room:
            docs.append(d)
    return problem.packed([*docs, room - sum(docs)])
