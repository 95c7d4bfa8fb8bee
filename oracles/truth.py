"""The float64 ground truth, and the error bound that every computation is judged by.

`ground_truth(problem)` computes GPT-2 attention in float64 (all heads batched, a
log-sum-exp softmax) and keeps every intermediate. `Truth.bound(dtype)` then derives, from
those exact-enough intermediates, an elementwise first-order bound on how far a *correct*
computation of the same formula in `dtype` may land from the exact result. It is a
running-error analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3),
propagated stage by stage:

* a stored value v is rounded with |error| <= u|v|, plus up to `tiny` (the smallest normal
  number) from underflow, flushed to zero as JAX does: storing costs `u|v| + tiny`;
* an inner product of length n (n + 1 with a bias added in the accumulator) accumulated
  in precision `ua` (any summation order, FMA or not) errs by at most gamma(n) |A||B|, gamma(n) = n ua / (1 - n ua);
* softmax is shift-invariant, so the error of the row max cancels; what remains is each
  logit's own error, the rounding of z - max, `exp` (EXP_ULPS ulp), the row sum
  (gamma(n)) and the division (u);
* errors already present propagate through each product as eA|B| + |A|eB.

u is the unit roundoff of the storage dtype. float16 and bfloat16 products and sums are
accumulated in float32 on all three backends (checked by `properties/tests/test_bounds.py`),
so for them ua is float32's. The bound is worst case: it holds for any summation order
and any correct kernel, so real errors sit one to three orders of magnitude below it.
Where a true intermediate does not fit the dtype's range, or a logit is so large that one
rounding of it (u|z| >= 1/2) breaks the first-order model of exp, the bound is +inf: the
dtype cannot be held to anything there, and the input says nothing about a rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from oracles.problem import AttentionProblem

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
TINY = {"float64": 2.0**-1022, "float32": 2.0**-126, "float16": 2.0**-14, "bfloat16": 2.0**-126}
MAX = {
    "float64": 1.7976931348623157e308,
    "float32": 3.4028234663852886e38,
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
}
ACCUMULATOR = {"float64": "float64", "float32": "float32", "float16": "float32", "bfloat16": "float32"}
EXP_ULPS = 2  # vectorised exp (SLEEF, XLA, glibc) is accurate to <= 2 ulp = 4u
SQRT_ULPS = 1  # sqrt is correctly rounded; rsqrt approximations are within 1 ulp = 2u


@dataclass(frozen=True)
class Precision:
    """The rounding model of one dtype: storage roundoff, accumulation roundoff, tiny, max."""

    dtype: str

    @property
    def u(self) -> float:
        return UNIT_ROUNDOFF[self.dtype]

    @property
    def ua(self) -> float:
        return UNIT_ROUNDOFF[ACCUMULATOR[self.dtype]]

    def gamma(self, n: int) -> float:
        nu = n * self.ua
        return nu / (1 - nu) if nu < 1 else math.inf

    def flush(self, v: np.ndarray) -> np.ndarray | float:
        """Error from flushing v to zero where it is below the smallest normal number."""
        return self.flush_abs(np.abs(v))

    def flush_abs(self, a: np.ndarray) -> np.ndarray | float:
        """flush(v) from a = |v|; 0.0 where nothing is flushed (the usual case: a weight
        matrix of GPT-2's is 1.8M values, and the bounds of a diagnosis are many)."""
        small = a < TINY[self.dtype]
        if not small.any() or not a[small].any():
            return 0.0
        return np.where(small, a, 0.0)

    def store(self, v: np.ndarray) -> np.ndarray:
        """Error from storing v in this dtype: u|v| plus, as in the standard underflow model
        (Higham, sec. 2.1) with flush-to-zero, up to `tiny` for any operation, since an
        equivalent program may underflow in intermediates the reference does not have."""
        return self.store_abs(np.abs(v))

    def store_abs(self, a: np.ndarray) -> np.ndarray:
        """store(v) from a = |v|."""
        return self.u * a + TINY[self.dtype]

    def linear(self, product: Product, eA, eB) -> np.ndarray:
        """Error of y = A @ B + bias (`product`), given errors eA, eB of the operands (0.0: none).

        A kernel may accumulate onto the bias (BLAS gemm with beta=1, torch.addmm), so the
        bias is one more term of the inner product: gamma(n + 1) (|A||B| + |bias|)."""
        if product.largest > 0.5 * MAX[ACCUMULATOR[self.dtype]]:
            return np.full(product.ay.shape, np.inf)
        n = product.n
        tiny_acc = n * TINY[ACCUMULATOR[self.dtype]]  # products flushed in the accumulator
        # an error of 0.0 adds exact zeros: skipped, the sum has the same bits
        carried = [a @ b for a, b in ((eA, product.aB), (product.aA, eB)) if np.ndim(a) and np.ndim(b)]
        magnitude = (self.gamma(n) + self.u) * product.magnitude
        return sum(carried, start=np.zeros(())) + magnitude + self.store_abs(product.ay) + tiny_acc


@dataclass(frozen=True)
class Product:
    """What the error of y = A @ B + bias needs that no dtype changes: |A|, |B|, the
    magnitude |A||B| + |bias| and its largest element, |y|, and the inner length n (n + 1
    with a bias, which a kernel may accumulate onto)."""

    aA: np.ndarray
    aB: np.ndarray
    magnitude: np.ndarray
    largest: float
    ay: np.ndarray
    n: int

    @classmethod
    def of(cls, A: np.ndarray, B: np.ndarray, y: np.ndarray, bias=None) -> Product:
        """y = A @ B + bias."""
        aA, aB = np.abs(A), np.abs(B)
        magnitude = aA @ aB + (0.0 if bias is None else np.abs(bias))
        return cls(aA, aB, magnitude, magnitude.max(initial=0.0), np.abs(y), A.shape[-1] + (bias is not None))


def heads(t: np.ndarray, n_head: int) -> np.ndarray:
    """[..., n_seq, n_embd] -> [..., n_head, n_seq, head_dim]"""
    *batch, n_seq, n_embd = t.shape
    return np.swapaxes(t.reshape(*batch, n_seq, n_head, n_embd // n_head), -2, -3)


def merge_heads(t: np.ndarray) -> np.ndarray:
    """[..., n_head, n_seq, head_dim] -> [..., n_seq, n_embd]"""
    t = np.swapaxes(t, -2, -3)
    return t.reshape(*t.shape[:-2], -1)


@dataclass(frozen=True, eq=False)
class Truth:
    """The float64 result of one problem plus what the error bound needs."""

    problem: AttentionProblem
    out: np.ndarray  # [..., n_seq, n_embd]
    qkv: np.ndarray  # [..., n_seq, 3*n_embd]
    z: np.ndarray  # [..., n_head, n_seq, n_seq] scaled logits, -inf above the diagonal
    p: np.ndarray  # [..., n_head, n_seq, n_seq] attention weights
    o: np.ndarray  # [..., n_seq, n_embd] heads merged, before c_proj
    x_error: np.ndarray | None = None  # error already in x (e.g. from a layer norm)
    _bounds: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def bound(self, dtype: str) -> np.ndarray:
        """Elementwise bound on |attention computed in `dtype` - self.out|. See module doc."""
        return self.bounds((dtype,))[dtype]

    def bounds(self, dtypes: Iterable[str]) -> dict[str, np.ndarray]:
        """bound(dtype) for each of `dtypes`; those not known yet are derived together,
        sharing what no dtype changes (the magnitudes of the four products, the softmax's
        exponentials and sums): a tolerance needs two bounds, its dtype's and float64's."""
        todo = [d for d in dict.fromkeys(dtypes) if d not in self._bounds]
        if todo:
            self._bounds.update(_bounds(self, todo))
        return {d: self._bounds[d] for d in dtypes}

    def tolerance(self, dtype: str) -> np.ndarray:
        """What a `dtype` result may differ from `self.out` by: its bound plus the truth's own."""
        bounds = self.bounds((dtype, "float64"))
        return bounds[dtype] + bounds["float64"]


def _bounds(tr: Truth, dtypes: Sequence[str]) -> dict[str, np.ndarray]:
    """bound(dtype) of `tr` for each of `dtypes`, stage by stage (module doc)."""
    pb = tr.problem
    logits = np.where(np.isfinite(tr.z), np.abs(tr.z), 0.0).max(initial=0.0)
    # |q @ k.T| before scaling: the largest logit scaled back (rounding is monotonic)
    largest = max(logits * math.sqrt(pb.head_dim), *(np.abs(a).max(initial=0.0) for a in (tr.qkv, tr.o, tr.out)))
    # First order needs exp(t + d) ~ e^t (1 + d): once one rounding of a logit, u|z|, reaches
    # 1/2 that fails (in float32 beyond |z| ~ 8e6; past 1.5e9 half an ulp overflows exp).
    unbounded = {d for d in dtypes if largest > 0.5 * MAX[d] or Precision(d).u * logits >= 0.5}
    found = {d: np.full(tr.out.shape, np.inf) for d in unbounded}
    live = [Precision(d) for d in dtypes if d not in unbounded]
    if not live:
        return found
    x, w, b, wo, bo = pb.arrays()
    # qkv = x @ W + b (|W| once: GPT-2's is 1.8M values)
    qkv = Product.of(x, w, tr.qkv, b)
    e_qkv = {
        pr.dtype: pr.linear(qkv, pr.flush(x) if tr.x_error is None else tr.x_error, pr.flush_abs(qkv.aB)) + pr.flush(b)
        for pr in live
    }
    e_o = _attention_errors(tr, live, e_qkv)
    # out = o @ Wo + bo
    out = Product.of(tr.o, wo, tr.out, bo)
    for pr in live:
        found[pr.dtype] = pr.linear(out, e_o[pr.dtype], pr.flush_abs(out.aB)) + pr.flush(bo)
    return found


@dataclass(frozen=True)
class _Softmax:
    """What the error of o = softmax(z) v needs that no dtype changes."""

    allowed: np.ndarray  # [..., n_seq, n_seq] the keys each query sees (the mask is exact)
    scores: Product  # q @ k.T, masked
    abs_z: np.ndarray  # |z|, masked
    abs_t: np.ndarray  # |z - max|, masked
    e: np.ndarray  # exp(z - max), masked
    s: np.ndarray  # [..., n_seq, 1] its row sums
    o: Product  # p @ v

    @classmethod
    def of(cls, allowed, z, p, q, k, v, o) -> _Softmax:
        """From the truth's z, p, q, k, v and o (heads split)."""
        masked = np.where(allowed, z, 0.0)
        scores = Product.of(q, np.swapaxes(k, -1, -2), masked * math.sqrt(q.shape[-1]))  # stored before scaling
        # softmax: t = z - max (max's own error cancels), e = exp(t), p = e / sum(e)
        with np.errstate(invalid="ignore"):
            t = np.where(allowed, z - z.max(axis=-1, keepdims=True), 0.0)
        e = np.where(allowed, np.exp(t), 0.0)
        return cls(allowed, scores, np.abs(masked), np.abs(t), e, e.sum(axis=-1, keepdims=True), Product.of(p, v, o))


def _attention_errors(tr: Truth, precisions: Sequence[Precision], e_qkv: dict) -> dict[str, np.ndarray]:
    """Each dtype's error of o = softmax(q @ k.T / sqrt(head_dim)) @ v, heads merged (exact):
    [..., n_seq, n_embd], from its error of qkv."""
    pb = tr.problem
    q, k, v = (heads(t, pb.n_head) for t in np.split(tr.qkv, 3, axis=-1))
    shared = _Softmax.of(pb.allowed(), tr.z, tr.p, q, k, v, heads(tr.o, pb.n_head))
    e_o = {}
    for pr in precisions:
        eq, ek, ev = (heads(t, pb.n_head) for t in np.split(e_qkv[pr.dtype], 3, axis=-1))
        e_o[pr.dtype] = merge_heads(_softmax_error(pr, shared, eq, ek, ev, tr.p, pb))
    return e_o


def _softmax_error(pr: Precision, sh: _Softmax, eq, ek, ev, p, pb: AttentionProblem) -> np.ndarray:
    """The error of o = p @ v (heads split) in `pr`, from the errors of q, k, v."""
    # z = (q @ k.T) / sqrt(head_dim)
    e_s = pr.linear(sh.scores, eq, np.swapaxes(ek, -1, -2))
    e_z = e_s / math.sqrt(pb.head_dim) + 2 * pr.u * sh.abs_z + pr.flush_abs(sh.abs_z)
    # softmax; a padding row has no key: p = 0 there, exactly, and so is its error (s = 1 stands in)
    de = np.where(sh.allowed, sh.e * (e_z + pr.u * sh.abs_t + 2 * EXP_ULPS * pr.u) + pr.flush_abs(sh.e), 0.0)
    ds = de.sum(axis=-1, keepdims=True) + (pr.gamma(pb.n_seq) + pr.u) * sh.s
    s = np.where(sh.s > 0, sh.s, 1.0)
    dp = de / s + p * ds / s + pr.store_abs(sh.o.aA)
    # o = p @ v
    return pr.linear(sh.o, dp, ev)


def ground_truth(problem: AttentionProblem, x_error: np.ndarray | None = None) -> Truth:
    """Attention in float64, written independently of the three backend oracles."""
    qkv, z, p, o, out = _attention(problem, mask_offset=0)
    return Truth(problem, out, qkv, z, p, o, x_error)


def variant(problem: AttentionProblem, *, mask_offset: int) -> np.ndarray:
    """The output [..., n_seq, n_embd] of attention whose row i sees keys j <= i + mask_offset
    (-1: not itself; n_seq: every key), in float64: a wrong formula the diagnosis compares a
    failure with. A row that sees no key is NaN."""
    return _attention(problem, mask_offset)[-1]


def _attention(problem: AttentionProblem, mask_offset: int) -> tuple[np.ndarray, ...]:
    """qkv, z, p, o, out of attention masked at `mask_offset` (0: causal), in float64."""
    x, w, b, wo, bo = (np.asarray(a, np.float64) for a in problem.arrays())
    n_seq, hd = problem.n_seq, problem.head_dim
    qkv = x @ w + b  # [..., n_seq, 3*n_embd]
    q, k, v = (heads(t, problem.n_head) for t in np.split(qkv, 3, axis=-1))  # [..., H, n_seq, hd]
    z = np.einsum("...qd,...kd->...qk", q, k) / math.sqrt(hd)  # [..., H, n_seq, n_seq]
    allowed = np.tri(n_seq, k=mask_offset, dtype=bool) & (problem.allowed() | ~np.tri(n_seq, dtype=bool))
    z = np.where(allowed, z, -np.inf)  # [..., H, n_seq, n_seq]: the layout's documents, then the offset
    with np.errstate(invalid="ignore"):  # causal: the diagonal is never masked, so finite
        zmax = z.max(axis=-1, keepdims=True)  # [..., H, n_seq, 1]
        lse = zmax + np.log(np.exp(z - zmax).sum(axis=-1, keepdims=True))
        p = np.exp(z - lse)  # [..., H, n_seq, n_seq]
    if problem.segments is not None:  # a padding query attends nothing: its weights are 0
        p = np.where(problem.segments[..., None, :, None] >= 0, p, 0.0)
    o = merge_heads(p @ v)  # [..., n_seq, n_embd]
    out = o @ wo + bo  # [..., n_seq, n_embd]
    return qkv, z, p, o, out


# --- the pre-LN block x + attn(ln_1(x)) -------------------------------------------------


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    d = x - x.mean(axis=-1, keepdims=True)
    return g * d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps) + b


def layer_norm_bound(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float, dtype: str) -> np.ndarray:
    """Elementwise first-order bound on the error of layer_norm computed in `dtype`."""
    pr = Precision(dtype)
    n = x.shape[-1]
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    var = (d * d).mean(axis=-1, keepdims=True)
    sigma = np.sqrt(var + eps)
    h = g * d / sigma + b
    e_mu = (pr.gamma(n) + pr.u) * np.abs(x).mean(axis=-1, keepdims=True) + pr.flush(mu)
    e_d = e_mu + pr.store(d)
    e_var = 2 * (np.abs(d) * e_d).mean(axis=-1, keepdims=True) + (pr.gamma(n) + 2 * pr.u) * var
    e_var += pr.u * (var + eps) + float(eps < TINY[dtype]) * eps  # + eps, rounded (or flushed)
    rel_sigma = 0.5 * e_var / (var + eps) + 2 * SQRT_ULPS * pr.u
    e_h = np.abs(g) * (e_d + np.abs(d) * rel_sigma) / sigma + 2 * pr.u * np.abs(g * d / sigma)
    return e_h + pr.store(h)


@dataclass(frozen=True, eq=False)
class BlockTruth:
    """float64 truth of x + attn(ln_1(x)), with its bound."""

    x: np.ndarray
    attn: Truth  # on h = ln_1(x) exact
    ln_error: dict[str, np.ndarray]
    out: np.ndarray

    def bound(self, dtype: str) -> np.ndarray:
        attn = Truth(**{**self.attn.__dict__, "x_error": self.ln_error[dtype], "_bounds": {}})
        return attn.bound(dtype) + Precision(dtype).store(self.out)

    def tolerance(self, dtype: str) -> np.ndarray:
        return self.bound(dtype) + self.bound("float64")


def block_ground_truth(x, ln_g, ln_b, problem: AttentionProblem, eps: float, dtypes) -> BlockTruth:
    """Truth of the pre-LN block; `problem.x` is ignored (h = ln_1(x) takes its place)."""
    h = layer_norm(x, ln_g, ln_b, eps)
    attn = ground_truth(AttentionProblem(h, *problem.arrays()[1:], n_head=problem.n_head, label=problem.label))
    errors = {dt: layer_norm_bound(x, ln_g, ln_b, eps, dt) for dt in {*dtypes, "float64"}}
    return BlockTruth(x, attn, errors, x + attn.out)
