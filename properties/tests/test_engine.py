"""The verdict engine's own rules, each tested on both sides: what it must catch and what
it must not flag (the claim rule, the exact first failing length, the eager/compiled choice)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import oracles
from oracles import backends
from oracles.problem import AttentionProblem
from rewrites.common import array_namespace, causal, heads_qkv, logits, project_out, softmax
from rewrites.registry import builtin, rewrite
from rewrites.verify import Inputs, Verdict
from rewrites.verify.execute import NONDETERMINISM, RewriteFailed, reach, run_rewrite
from rewrites.verify.judge import References
from rewrites.verify.record import Search, Stage
from rewrites.verify.search import sweep
from rewrites.verify.verdicts import claim_holds


def _dense(n_seq: int, n_head: int = 2, head_dim: int = 4, seed: int = 0) -> AttentionProblem:
    rng = np.random.default_rng(seed)
    e = n_head * head_dim
    w = lambda *s: rng.normal(size=s) / np.sqrt(e)
    return AttentionProblem(rng.normal(size=(n_seq, e)), w(e, 3 * e), w(3 * e), w(e, e), w(e), n_head)


def window(size: int):
    """Sliding-window attention of `size` keys: exact below size + 1 tokens, wrong from it."""

    def fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
        n = q.shape[-2]
        seen = causal(xp, n) & ~causal(xp, n, offset=-size)  # keys i - size < j <= i
        z = xp.where(seen, q @ xp.matrix_transpose(k) / np.sqrt(q.shape[-1]), -np.inf)
        return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)

    return rewrite(family="test", claim="equivalent", name=f"window_{size}")(fn)


@pytest.mark.parametrize("size", [1, 7, 37])
def test_first_failing_length_is_exact(backend, size):
    """Bisection over prefixes finds L = size + 1: the first L tokens fail, the first L - 1 pass."""
    s = sweep([(0, _dense(3 * size + 5))], Search(window(size), backend, "float64", Stage.FORMULA), References())
    assert s.failure is not None and s.first_fails_at == size + 1 == s.failure.n_seq
    again = Search(window(size), backend, "float64", Stage.FORMULA)
    assert again.failing(s.failure.prefix(size), References()) is None  # L - 1 passes
    assert again.failing(s.failure, References()) is not None  # L fails


def floor_tiles(tile: int):
    """Keys in max(1, n_seq // tile) whole tiles: the partial last tile is dropped, so it
    fails at tile + 1 tokens and passes again at every multiple of `tile`."""

    def fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
        n = q.shape[-2]
        seen = causal(xp, n) & (xp.arange(n) < tile * max(1, n // tile))  # keys in whole tiles
        z = xp.where(seen, q @ xp.matrix_transpose(k) / np.sqrt(q.shape[-1]), -np.inf)
        return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)

    return rewrite(family="test", claim="equivalent", name=f"floor_tiles_{tile}")(fn)


def test_the_cut_finds_the_first_threshold_not_a_later_one(backend):
    """A fault that passes again at longer lengths: bisecting 257 tokens alone meets the
    threshold at 241 (240 = 15 whole tiles passes); the ladder's rungs find the first, 17."""
    s = sweep([(0, _dense(257))], Search(floor_tiles(16), backend, "float64", Stage.FORMULA), References())
    assert s.failure is not None and s.first_fails_at == 17 == s.failure.n_seq
    again = Search(floor_tiles(16), backend, "float64", Stage.FORMULA)
    assert again.failing(s.failure.prefix(16), References()) is None


def test_a_correct_rewrite_is_not_cut(backend):
    """What must not be flagged: a window wider than the input is plain attention."""
    s = sweep([(0, _dense(40))], Search(window(64), backend, "float64", Stage.FORMULA), References())
    assert s.failure is None and s.first_fails_at is None and s.max_ratio <= 1


@pytest.mark.parametrize(
    ("claim", "verdict", "holds"),
    [
        (Verdict.EQUIVALENT, Verdict.BITWISE, True),
        (Verdict.EQUIVALENT, Verdict.EQUIVALENT, True),
        (Verdict.EQUIVALENT, Verdict.UNSTABLE, False),
        (Verdict.EQUIVALENT, Verdict.ERROR, False),
        (Verdict.BITWISE, Verdict.EQUIVALENT, False),
        (Verdict.INEQUIVALENT, Verdict.INEQUIVALENT, True),
        (Verdict.INEQUIVALENT, Verdict.EQUIVALENT, False),
        (Verdict.UNSTABLE, Verdict.EQUIVALENT, False),
        (None, Verdict.ERROR, True),
    ],
)
def test_claim_rule_on_hypothesis_inputs(claim, verdict, holds):
    assert claim_holds(claim, verdict, Inputs.HYPOTHESIS, "float32") is holds


def test_claim_rule_details():
    # an existence claim is not contradicted by benign real inputs, a universal one is
    assert claim_holds(Verdict.INEQUIVALENT, Verdict.EQUIVALENT, Inputs.GPT2, "float32")
    assert not claim_holds(Verdict.EQUIVALENT, Verdict.INEQUIVALENT, Inputs.GPT2, "float32")
    # an instability witnessed in another claim dtype is enough; half precision is reported only
    assert claim_holds(Verdict.UNSTABLE, Verdict.EQUIVALENT, Inputs.HYPOTHESIS, "float32", witness="float64")
    assert claim_holds(Verdict.EQUIVALENT, Verdict.UNSTABLE, Inputs.HYPOTHESIS, "float16")


def test_claim_rule_on_problems_cut_short():
    """A search on problems cut to their first N tokens (a per-token loop where eager steps
    compile per shape) cannot refute an existence claim, whose failure may need more tokens,
    but its failures still contradict a universal claim."""
    cut = dict(witness=None, cut_to=32)
    assert claim_holds(Verdict.INEQUIVALENT, Verdict.EQUIVALENT, Inputs.HYPOTHESIS, "float32", **cut)
    assert claim_holds(Verdict.UNSTABLE, Verdict.BITWISE, Inputs.HYPOTHESIS, "float64", **cut)
    assert claim_holds(Verdict.INEQUIVALENT, Verdict.INEQUIVALENT, Inputs.HYPOTHESIS, "float32", **cut)
    assert not claim_holds(Verdict.EQUIVALENT, Verdict.INEQUIVALENT, Inputs.HYPOTHESIS, "float32", **cut)
    assert not claim_holds(Verdict.INEQUIVALENT, Verdict.ERROR, Inputs.HYPOTHESIS, "float32", **cut)


def test_verdict_vocabulary():
    assert [v.symbol for v in Verdict] == ["B", "E", "P", "U", "I", "X"]
    assert Verdict("equivalent") is Verdict.EQUIVALENT and Verdict.EQUIVALENT == "equivalent"


def per_token(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A loop per token: its traced program grows with n_seq; its steps keep their shapes."""
    xp = array_namespace(x)
    rows = [x[..., t : t + 1, :] * 1.0 for t in range(x.shape[-2])]
    return xp.concat(rows, axis=-2) @ c_proj_w


def _prefix_sum(xp, x, t: int):
    """Row t of a loop whose steps grow a token each, as a KV cache does: the sum of rows 0..t."""
    return xp.sum(x[..., : t + 1, :], axis=-2, keepdims=True)  # [..., 1, e]


def growing(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A loop per token whose steps grow."""
    xp = array_namespace(x)
    return xp.concat([_prefix_sum(xp, x, t) for t in range(x.shape[-2])], axis=-2) @ c_proj_w


def growing_swallowing(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """`growing`, each step retried on any exception (a plugin may swallow the probe's stop)."""
    xp = array_namespace(x)
    rows = []
    for t in range(x.shape[-2]):
        try:
            rows.append(_prefix_sum(xp, x, t))
        except Exception:
            rows.append(_prefix_sum(xp, x, t))
    return xp.concat(rows, axis=-2) @ c_proj_w


def steady_until(n: int):
    """per_token, raising past n tokens: a probe that fails must not make a loop steady."""

    def fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        if x.shape[-2] > n:
            raise ValueError(f"more than {n} tokens")
        return per_token(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)

    return fn


def plain(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    return x @ c_proj_w


def test_backend_compiles_a_loop_per_token_only_within_the_trace_budget(backend, monkeypatch):
    """Compiling a loop per token unrolls it (minutes at 1024 tokens): where its traced
    program would pass TRACE_BUDGET equations it runs eagerly; on a problem short enough to
    stay within, it is compiled (eagerly each primitive compiles per shape: twice the time
    on the quick profile's short problems). A fixed-size program is always compiled."""
    be = backends.get(backend)
    args = lambda n: (be.asarray(np.ones((n, 4)), "float32"), None, None, be.asarray(np.eye(4), "float32"), None, 1)
    if be.traces is None:  # eager backends: nothing to decide
        assert be.runner(per_token, args(1024), (5,)) is per_token
        return
    monkeypatch.setattr(backends, "TRACE_BUDGET", be.traces(per_token, *args(40), static=(5,)))
    monkeypatch.setattr(backends, "_GROWS", {})
    assert be.runner(per_token, args(1024), (5,)) is per_token
    assert be.runner(per_token, args(42), (5,)) is per_token
    assert be.runner(per_token, args(38), (5,)) is not per_token
    assert be.runner(per_token, args(8), (5,)) is not per_token
    assert be.runner(plain, args(1024), (5,)) is not plain
    assert be.runner(plain, args(8), (5,)) is not plain


@pytest.mark.parametrize("fn", [growing, growing_swallowing])
def test_only_growing_per_token_loops_are_cut_and_only_where_the_backend_says(backend, fn, monkeypatch):
    """`reach`: a loop per token whose steps grow (a KV cache) runs on the first
    Backend.loop_tokens tokens where the backend sets them; a fixed-size program, and every
    program elsewhere, sees them all."""
    be, p = backends.get(backend), _dense(45)
    monkeypatch.setattr(backends, "_STEADY", {})
    loop = rewrite(family="test", claim="equivalent", name="growing_loop")(fn)
    fixed = rewrite(family="test", claim="equivalent", name="fixed_program")(plain)
    assert reach(fixed, backend, "float32", p) is p
    assert reach(loop, backend, "float32", p.prefix(8)).n_seq == 8  # short problems are never cut
    cut = reach(loop, backend, "float32", p)
    assert cut.n_seq == (be.loop_tokens or 45)
    np.testing.assert_array_equal(cut.x, p.x[: cut.n_seq])


def test_a_per_token_loop_whose_steps_keep_their_shapes_runs_on_every_token(backend, monkeypatch):
    """A loop per token whose steps keep their shapes (a ring buffer of fixed slots)
    compiles a fixed set of programs eagerly, so it runs on every token (past the trace
    budget eagerly: test_backend_compiles_a_loop_per_token_only_within_the_trace_budget);
    one whose probe raises keeps the cut of a growing loop."""
    be, p = backends.get(backend), _dense(45)
    monkeypatch.setattr(backends, "_GROWS", {})
    monkeypatch.setattr(backends, "_STEADY", {})
    steady = rewrite(family="test", claim="equivalent", name="steady_loop")(per_token)
    assert reach(steady, backend, "float32", p) is p
    failing_probe = rewrite(family="test", claim="equivalent", name="steady_loop_raising")(steady_until(45))
    assert reach(failing_probe, backend, "float32", p).n_seq == (be.loop_tokens or 45)
    fixed = rewrite(family="test", claim="equivalent", name="fixed_program")(plain)
    out = run_rewrite(steady, backend, "float32", p)
    assert out.shape[-2] == 45
    np.testing.assert_allclose(out, run_rewrite(fixed, backend, "float32", p), rtol=1e-6)


def per_tile(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A loop per tile of 16 rows: its traced program grows with n_seq / 16, not per token."""
    xp = array_namespace(x)
    rows = [x[..., t : t + 16, :] * 1.0 for t in range(0, x.shape[-2], 16)]
    return xp.concat(rows, axis=-2) @ c_proj_w


def test_a_loop_per_tile_is_compiled_on_as_many_tokens_as_the_trace_budget_allows(backend, monkeypatch):
    """Unrolled, tiles of 16 at 2049 tokens took minutes to compile for every new length: a
    loop per tile is cut where its traced program reaches TRACE_BUDGET equations (within a
    tile: the size is extrapolated from 16 and 256 tokens), and still compiled; a backend
    that compiles nothing runs it whole. The budget is lowered so that 300 tokens exceed it."""
    be, p = backends.get(backend), _dense(300)
    monkeypatch.setattr(backends, "TRACE_BUDGET", 30)
    monkeypatch.setattr(backends, "_GROWS", {})
    loop = rewrite(family="test", claim="equivalent", name="per_tile_loop")(per_tile)
    cut = reach(loop, backend, "float32", p)
    if not be.compiles:
        assert cut is p
        return
    args = lambda n: (*oracles.as_backend(p.prefix(n), backend, "float32"), p.n_head)
    size = lambda n: be.traces(per_tile, *args(n), static=(5,))
    one_tile = size(32) - size(16)
    assert 16 < cut.n_seq < 300
    assert size(cut.n_seq) <= 30 + one_tile and size(cut.n_seq + 32) > 30
    assert be.runner(per_tile, args(cut.n_seq), (5,)) is not per_tile  # compiled, not eager
    np.testing.assert_array_equal(cut.x, p.x[: cut.n_seq])


def test_an_overflowing_rewrite_is_judged_not_warned_of(backend):
    """no_max_subtraction at logits of 1e3 overflows exp: a non-finite output, no warning
    (warnings as errors here: a warning would make the call an error)."""
    (rw,) = [r for r in builtin() if r.name == "no_max_subtraction"]
    p = _dense(3)
    p = dataclasses.replace(p, c_attn_w=p.c_attn_w * 30)  # logits of about 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_rewrite(rw, backend, "float32", p)
    assert not np.isfinite(out).all()


def test_nondeterminism_in_one_dtype_leaves_the_others_their_verdicts():
    """A rewrite whose float32 output changes from call to call is an `error` in float32
    on every later call, and float64 (another program) is still run and judged. (On
    NumPy: the noise is a Python side effect, which a compiled JAX program runs once.)"""
    calls = [0]

    def noisy_in_float32(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
        out = project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)
        calls[0] += 1
        return out * (1 + 2.0**-10) if out.dtype == np.float32 and calls[0] % 2 else out

    rw = rewrite(family="test", claim="equivalent")(noisy_in_float32)
    p = _dense(3)
    first = run_rewrite(rw, "numpy", "float32", p)
    with pytest.raises(RewriteFailed, match="nondeterministic: two calls on the same input differ"):
        NONDETERMINISM.check(rw, "numpy", "float32", p, first)
    with pytest.raises(RewriteFailed, match="nondeterministic"):  # known from now on: at once
        run_rewrite(rw, "numpy", "float32", _dense(2))
    out = run_rewrite(rw, "numpy", "float64", p)
    NONDETERMINISM.check(rw, "numpy", "float64", p, out)  # float64 is deterministic: nothing raised
    np.testing.assert_allclose(out, oracles.run("numpy", p, "float64"), rtol=1e-12, atol=1e-12)


def test_result_round_trips_through_json():
    """verdicts.json is read back (bench, pytest-xdist): every field survives, typed."""
    from rewrites.verify import Counterexample, Result

    r = Result("rw", "fam", "numpy", "float32", Inputs.GPT2, Verdict.EQUIVALENT, Verdict.INEQUIVALENT, 1.5,
               float("inf"), 7, Counterexample("m", first_fails_at=301), witness="float64", cut_to=32)  # fmt: skip
    d = r.to_json()
    assert {type(d[k]) for k in ("inputs", "claim", "verdict")} == {str}  # pytest-xdist sends no enums
    back = Result.from_json(d)
    assert back == r and back.verdict is Verdict.INEQUIVALENT and back.counterexample.first_fails_at == 301


def test_a_pinned_real_layer_is_every_rewrite_s_long_layer_and_a_bad_one_is_refused():
    """Config.real_layer (pytest's): every rewrite and backend sees that layer at 1024 and
    the next at 1000 (256 in half precision), so their truths are computed once; unpinned,
    the plan spreads them by rewrite and backend; a layer the weights lack is one error."""
    from rewrites.verify import inputs

    long = lambda plan: [(r.layer, r.n_seq) for r in plan if r.n_seq > inputs.SHORT]
    pairs = [(rw.name, b) for rw in builtin()[:6] for b in backends.NAMES]
    assert {tuple(long(inputs.real_plan(n, b, "float32", 12, pinned=5))) for n, b in pairs} == {((5, 1024), (6, 1000))}
    assert {tuple(long(inputs.real_plan(n, b, "float16", 12, pinned=11))) for n, b in pairs} == {((11, 256),)}
    assert len({tuple(long(inputs.real_plan(n, b, "float32", 12))) for n, b in pairs}) > 1
    with pytest.raises(ValueError, match=r"real layer 12: the weights have layers 0\.\.11"):
        inputs.real_plan("batched_heads", "numpy", "float32", 12, pinned=12)


@pytest.mark.parametrize("shrink_up_to", [None, 64, 100])
def test_a_failure_longer_than_shrink_up_to_is_kept_as_found(monkeypatch, shrink_up_to):
    """On a fixed menu of shapes shrinking cannot shorten a long failure, only reseed its
    dense values: past `shrink_up_to` tokens the failure found is kept (and still cut),
    while up to it, and with no limit, it is shrunk. Problem i is 100 tokens of seed i (i = 0
    is 8 tokens, which pass), so shrinking ends at i = 1; the cut is left out to compare."""
    from hypothesis import strategies as st

    from rewrites.verify import search

    monkeypatch.setattr(search, "to_first_failing_length", lambda s, refs: None)
    problems = st.integers(0, 10**6).map(
        lambda i: dataclasses.replace(_dense(8 if i == 0 else 100, seed=i), label=str(i))
    )
    s = search.hypothesis_search([problems], Search(window(64), "numpy", "float64", Stage.FORMULA), References(),
                                 examples=10, shrink_up_to=shrink_up_to)  # fmt: skip
    assert s.failure is not None and s.failure.n_seq == 100
    assert (s.failure.label == "1") == (shrink_up_to is None or shrink_up_to >= 100)
