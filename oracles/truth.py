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
        return self.u * np.abs(v) + TINY[self.dtype]

    def linear(self, A, eA, B, eB, y, bias=None, aB=None) -> np.ndarray:
        """Error of y = A @ B + bias, given errors eA, eB of the operands (0.0: none), and
        aB = |B| where the caller has it.

        A kernel may accumulate onto the bias (BLAS gemm with beta=1, torch.addmm), so the
        bias is one more term of the inner product: gamma(n + 1) (|A||B| + |bias|)."""
        n = A.shape[-1] + (bias is not None)
        aA, aB = np.abs(A), np.abs(B) if aB is None else aB
        magnitude = aA @ aB + (0.0 if bias is None else np.abs(bias))
        if magnitude.max(initial=0.0) > 0.5 * MAX[ACCUMULATOR[self.dtype]]:
            return np.full(y.shape, np.inf)
        tiny_acc = n * TINY[ACCUMULATOR[self.dtype]]  # products flushed in the accumulator
        # an error of 0.0 adds exact zeros: skipped, the sum has the same bits
        carried = [a @ b for a, b in ((eA, aB), (aA, eB)) if np.ndim(a) and np.ndim(b)]
        return sum(carried, start=np.zeros(())) + (self.gamma(n) + self.u) * magnitude + self.store(y) + tiny_acc


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
        if dtype not in self._bounds:
            self._bounds[dtype] = self._bound(dtype)
        return self._bounds[dtype]

    def _bound(self, dtype: str) -> np.ndarray:
        pr = Precision(dtype)
        pb = self.problem
        logits = np.where(np.isfinite(self.z), np.abs(self.z), 0.0)
        scores = logits * math.sqrt(pb.head_dim)  # q @ k.T, stored before scaling
        too_big = max(np.abs(a).max(initial=0.0) for a in (self.qkv, scores, self.o, self.out)) > 0.5 * MAX[dtype]
        # First order needs exp(t + d) ~ e^t (1 + d): once one rounding of a logit, u|z|, reaches
        # 1/2 that fails (in float32 beyond |z| ~ 8e6; past 1.5e9 half an ulp overflows exp).
        if too_big or pr.u * logits.max(initial=0.0) >= 0.5:
            return np.full(self.out.shape, np.inf)
        x, w, b, wo, bo = pb.arrays()
        ex = pr.flush(x) if self.x_error is None else self.x_error
        aw, awo = np.abs(w), np.abs(wo)  # once each: GPT-2's are 1.8M and 0.6M values
        # qkv = x @ W + b
        e_qkv = pr.linear(x, ex, w, pr.flush_abs(aw), self.qkv, b, aw) + pr.flush(b)
        q, k, v = (heads(t, pb.n_head) for t in np.split(self.qkv, 3, axis=-1))
        eq, ek, ev = (heads(t, pb.n_head) for t in np.split(e_qkv, 3, axis=-1))
        # z = (q @ k.T) / sqrt(head_dim), the mask exact (causal, and the layout's documents)
        allowed = pb.allowed()
        kt, ekt = np.swapaxes(k, -1, -2), np.swapaxes(ek, -1, -2)
        z = np.where(allowed, self.z, 0.0)
        e_s = pr.linear(q, eq, kt, ekt, z * math.sqrt(pb.head_dim))
        e_z = e_s / math.sqrt(pb.head_dim) + 2 * pr.u * np.abs(z) + pr.flush(z)
        # softmax: t = z - max (max's own error cancels), e = exp(t), p = e / sum(e); a
        # padding row has no key: p = 0 there, exactly, and so is its error (s = 1 stands in)
        with np.errstate(invalid="ignore"):
            t = np.where(allowed, self.z - self.z.max(axis=-1, keepdims=True), 0.0)
        e = np.where(allowed, np.exp(t), 0.0)
        de = np.where(allowed, e * (e_z + pr.u * np.abs(t) + 2 * EXP_ULPS * pr.u) + pr.flush(e), 0.0)
        s = e.sum(axis=-1, keepdims=True)
        ds = de.sum(axis=-1, keepdims=True) + (pr.gamma(pb.n_seq) + pr.u) * s
        s = np.where(s > 0, s, 1.0)
        dp = de / s + self.p * ds / s + pr.store(self.p)
        # o = p @ v, heads merged (exact), out = o @ Wo + bo
        e_o = merge_heads(pr.linear(self.p, dp, v, ev, heads(self.o, pb.n_head)))
        return pr.linear(self.o, e_o, wo, pr.flush_abs(awo), self.out, bo, awo) + pr.flush(bo)

    def tolerance(self, dtype: str) -> np.ndarray:
        """What a `dtype` result may differ from `self.out` by: its bound plus the truth's own."""
        return self.bound(dtype) + self.bound("float64")


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
