"""Each dtype's verdict is true of that dtype, and a formula failure says what it is.

Both sides of each rule: a rewrite computed at a lower precision is `imprecise` with its
effective precision (never `inequivalent`), a scale error however small is `inequivalent`
with its factor (never `imprecise`); a crash in float64 alone is an `error` in float64
alone. The rewrites here are unnamed test rewrites: the diagnosis works from behaviour.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracles
from oracles import backends, numpy_oracle
from oracles.problem import AttentionProblem
from oracles.reference import reference
from properties.tests.test_shape_thresholds import shape_faulted
from rewrites.common import array_namespace, causal, heads_qkv, logits, project_out, softmax
from rewrites.registry import Rewrite, builtin, rewrite
from rewrites.verify import Config, Inputs, Verdict, Verifier, diagnose, inputs, probes
from rewrites.verify.execute import run_rewrite
from rewrites.verify.precision import INFORMATIVE, Precision


def _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, factor: float = 1.0, cast=None):
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = logits(xp, q, k) * factor  # [..., H, n, n] causal, scaled
    p = softmax(xp, z if cast is None else xp.astype(z, cast(xp)))
    return project_out(xp, xp.astype(p, x.dtype) @ v, c_proj_w, c_proj_b)


def _test_rewrite(name: str, fn):
    return rewrite(family="test", claim="equivalent", name=name)(fn)


def _float64_searched(tmp_path_factory, band, examples: int):
    """rewrite -> its float64 Result on NumPy, both stages searched on `band` alone
    (synthetic inputs, no explicit examples, no invariances)."""
    profile = inputs.Profile("one band", (band,), (band,), None)
    config = Config(examples=examples, report_dir=tmp_path_factory.mktemp("report"), dtypes=("float64",),
                    profile=profile, explicit_examples=False, invariance=False)  # fmt: skip
    verifier = Verifier(config)
    return lambda rw: verifier.verify_one(rw, ["numpy"], gpt2_inputs=False)[0]


def _builtin(name: str) -> Rewrite:
    (rw,) = [rw for rw in builtin() if rw.name == name]
    return rw


def softmax_in_float32(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """The softmax in float32 whatever the inputs (as jax.nn.dot_product_attention does)."""
    return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, cast=lambda xp: xp.float32)


def all_in_float16(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Everything in float16, the result cast back."""
    xp = array_namespace(x)
    h = lambda a: xp.astype(a, xp.float16)
    out = _attention(h(x), h(c_attn_w), h(c_attn_b), h(c_proj_w), h(c_proj_b), n_head)
    return xp.astype(out, x.dtype)


def raises_in_float64(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Right in every dtype but float64, where it raises."""
    xp = array_namespace(x)
    if x.dtype == xp.float64:
        raise RuntimeError("attn_weights does not have dtype float32")
    return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)


def scaled(factor: float):
    def fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
        return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, factor=factor)

    return fn


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    """name -> {dtype: Result} on NumPy, synthetic inputs (the quick profile)."""
    config = Config(
        examples=10,
        report_dir=tmp_path_factory.mktemp("report"),
        dtypes=("float64", "float32", "float16"),
        profile=inputs.QUICK,
        explicit_examples=False,
        invariance=False,  # not what these tests are about (test_invariance.py); 20 s a rewrite in float16
    )
    verifier, cache = Verifier(config), {}

    def get(name: str, fn) -> dict:
        """fn: a test rewrite's function, or a built-in Rewrite (its output and claim kept)."""
        if name not in cache:
            rw = fn if isinstance(fn, Rewrite) else _test_rewrite(name, fn)
            results = verifier.verify_one(rw, ["numpy"], gpt2_inputs=False)
            cache[name] = {r.dtype: r for r in results if r.inputs is Inputs.HYPOTHESIS}
        return cache[name]

    return get


def test_float32_arithmetic_on_float64_inputs_is_imprecise_not_inequivalent(verdicts):
    rs = verdicts("softmax_in_float32", softmax_in_float32)
    assert rs["float64"].verdict is Verdict.IMPRECISE and rs["float64"].precision == "float32", rs["float64"]
    # the float32 column is about float32: there it is the right computation
    assert rs["float32"].verdict.holds_equivalence, rs["float32"]
    assert rs["float32"].precision is None


def test_float16_arithmetic_is_imprecise_at_float16_in_float64_and_float32(verdicts):
    rs = verdicts("all_in_float16", all_in_float16)
    for dtype in ("float64", "float32"):
        assert rs[dtype].verdict is Verdict.IMPRECISE and rs[dtype].precision == "float16", rs[dtype]
    assert rs["float16"].verdict.holds_equivalence, rs["float16"]


def test_a_crash_in_float64_alone_is_an_error_in_float64_alone(verdicts):
    rs = verdicts("raises_in_float64", raises_in_float64)
    assert rs["float64"].verdict is Verdict.ERROR
    assert "attn_weights does not have dtype float32" in rs["float64"].counterexample.message
    assert rs["float32"].verdict.holds_equivalence and rs["float16"].verdict.holds_equivalence


@pytest.mark.parametrize("factor", [0.5, 1.01, 1 + 2**-10])
def test_a_scale_error_is_inequivalent_in_every_dtype_with_its_factor(verdicts, factor):
    rs = verdicts(f"scale_x{factor}", scaled(factor))
    for dtype in ("float64", "float32"):
        r = rs[dtype]
        assert r.verdict is Verdict.INEQUIVALENT and r.precision is None, r
        found = float(r.counterexample.message.rsplit("scaled by ", 1)[1].split()[0])
        assert math.isclose(found, factor, rel_tol=1e-4), r.counterexample.message


def test_a_correct_rewrite_gets_no_diagnosis(verdicts):
    rs = verdicts("plain", scaled(1.0))
    assert all(r.verdict.holds_equivalence and r.precision is None and r.counterexample is None for r in rs.values())


@pytest.mark.parametrize(
    ("name", "factor_of"), [("scale_sqrt_n_embd", "n_head"), ("scale_one_over_head_dim", "head_dim")]
)
def test_the_built_in_scale_mutants_name_their_factor(verdicts, name, factor_of):
    """1/sqrt(n_embd) for 1/sqrt(head_dim) is a factor 1/sqrt(n_head); 1/head_dim is 1/sqrt(head_dim)."""
    r = verdicts(name, _builtin(name))["float64"]
    assert r.verdict is Verdict.INEQUIVALENT
    said = r.counterexample.message.rsplit("scaled by ", 1)[1]  # "0.707107 = 1/sqrt(2) (n_head=2, head_dim=3)"
    shape = dict(kv.split("=") for kv in said.rsplit("(", 1)[1].rstrip(")").split(", "))
    assert math.isclose(float(said.split()[0]), int(shape[factor_of]) ** -0.5, rel_tol=1e-4), said


def batch_mean_mixer(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Right for one sequence; in a batch, every item gets a little of the batch mean."""
    xp = array_namespace(x)
    out = _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    if x.ndim == 2:
        return out
    return out + 0.1 * (xp.mean(x, axis=0, keepdims=True) - x)


def precision_by_shape(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """float32 arithmetic for one sequence, float16 for a batch: a library choosing its kernel,
    and with it its rounding, by shape (XLA's TF32 on a GPU, measured). Imprecise, and no
    batch item sees another: batched and alone differ by more than the bound all the same."""
    xp = array_namespace(x)
    low = lambda a: xp.astype(a, xp.float16 if x.ndim > 2 else xp.float32)
    out = _attention(low(x), low(c_attn_w), low(c_attn_b), low(c_proj_w), low(c_proj_b), n_head)
    return xp.astype(out, x.dtype)


def _finding(r, name: str) -> dict | None:
    return next((f for f in r.diagnosis if f["finding"] == name), None)


@pytest.mark.parametrize(("name", "exactly_one_ahead"), [("no_causal_mask", False), ("mask_off_by_one", True)])
def test_a_leak_of_the_future_is_found_and_how_far_ahead(verdicts, name, exactly_one_ahead):
    r = verdicts(name, _builtin(name))["float64"]
    leak = _finding(r, "leaks the future")
    assert r.verdict is Verdict.INEQUIVALENT and leak is not None, r
    n = leak["n_seq"]  # the probe's length: the counterexample's, or 8 tokens where it had fewer
    assert n >= max(8, r.counterexample.shape["n_seq"]), (leak, r.counterexample.shape)
    assert leak["ahead"] == (1 if exactly_one_ahead else n - 1) and leak["first_row"] == 0, leak
    assert _finding(r, "mixes batch items") is None
    assert "leaks the future" in r.counterexample.message


def test_mixing_batch_items_is_found_and_nothing_else(verdicts):
    r = verdicts("batch_mean_mixer", batch_mean_mixer)["float64"]
    assert r.verdict is Verdict.INEQUIVALENT and _finding(r, "mixes batch items") is not None, r
    assert _finding(r, "leaks the future") is None


def test_precision_alone_gets_no_finding(verdicts):
    assert all(not r.diagnosis for r in verdicts("softmax_in_float32", softmax_in_float32).values())


def test_batch_mixing_is_told_from_a_rounding_chosen_by_shape():
    """Both sides of the batch probe on one sequence: an item's output moved by another item
    is mixing; an item whose rounding changes when it is batched (but not with what it is
    batched with) is not, and its verdict stays `imprecise`."""
    p = _keys_problem()
    p = AttentionProblem(p.x[0], *p.arrays()[1:], p.n_head)  # one sequence: batched is another shape
    fired = lambda fn: [f["finding"] for f in probes.batch_mixing(_test_rewrite("t", fn), "numpy", "float64", p)]
    assert fired(batch_mean_mixer) == ["mixes batch items"]
    assert fired(precision_by_shape) == []
    assert fired(scaled(1.0)) == []  # the right formula


def test_a_rounding_chosen_by_shape_is_imprecise_with_no_finding(verdicts):
    r = verdicts("precision_by_shape", precision_by_shape)["float64"]
    assert r.verdict is Verdict.IMPRECISE and not r.diagnosis, r


def heads_swapped(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Heads 0 and 1 trade places before c_proj."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    o = softmax(xp, logits(xp, q, k)) @ v  # [..., H, n, hd]
    if n_head > 1:
        o = xp.concat([o[..., 1:2, :, :], o[..., :1, :, :], o[..., 2:, :, :]], axis=-3)
    return project_out(xp, o, c_proj_w, c_proj_b)


def output_bias_twice(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """The output bias added twice."""
    return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head) + c_proj_b


def mask_shifted_by_two(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Row i sees keys up to i + 2."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    n = q.shape[-2]
    z = xp.where(causal(xp, n, offset=2), q @ xp.matrix_transpose(k) / math.sqrt(q.shape[-1]), -math.inf)
    return project_out(xp, softmax(xp, z) @ v, c_proj_w, c_proj_b)


def last_slot_stale(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A cache whose newest slot still holds position 0's key and value (a slot not yet written),
    from 3 tokens on (at 2, reading key 0 twice is the same as not seeing itself)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    if q.shape[-2] > 2:
        k, v = (xp.concat([t[..., :-1, :], t[..., :1, :]], axis=-2) for t in (k, v))  # [..., H, n, hd]
    return project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)


def split_in_two_without_maxima(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Flash-decoding in 2 chunks whose partial results are added without their maxima."""
    from rewrites.catalogue.serving import split_kv

    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, split_kv(xp, q, k, v, splits=2, rescale=False), c_proj_w, c_proj_b)


#: name -> (the finding its float64 counterexample must have, the rewrite); every other finding absent
ONE_FINDING = {
    "no_causal_mask": "leaks the future",
    "mask_off_by_one": "leaks the future",
    "scale_one_over_head_dim": "scale",
    "softmax_wrong_axis": "rows do not sum to 1",
    "heads_merged_wrong_order": "mixes heads",
    "value_bias_dropped": "missing bias",
    "last_token_wrong_row": "wrong last row",
    "kv_cache_missing_current_token": "does not see itself",
    "linear_attention_elu": "no known fault",
    "scale_sqrt_n_embd": "scale",
    "heads_swapped": "reorders heads",
    "mask_shifted_by_two": "leaks the future",
    "scale_x0.5": "scale",
    "output_bias_twice": "extra bias",
    "last_slot_stale": "reads the wrong key",
    "split_in_two_without_maxima": "combined without maxima",
}
_UNNAMED = {"heads_swapped": heads_swapped, "mask_shifted_by_two": mask_shifted_by_two, "scale_x0.5": scaled(0.5),
            "output_bias_twice": output_bias_twice, "last_slot_stale": last_slot_stale,
            "split_in_two_without_maxima": split_in_two_without_maxima}  # fmt: skip


@pytest.mark.parametrize("name", ONE_FINDING)
def test_a_formula_failure_gets_its_finding_and_no_other(verdicts, name):
    r = verdicts(name, _UNNAMED[name] if name in _UNNAMED else _builtin(name))["float64"]
    assert r.verdict is Verdict.INEQUIVALENT, r
    assert [f["finding"] for f in r.diagnosis] == [ONE_FINDING[name]], r.diagnosis
    assert r.diagnosis[0]["text"] in r.counterexample.message
    if name in SAYS_WHICH:  # checked here, on the verdict just computed (a worker of its own would redo it)
        assert SAYS_WHICH[name](r.diagnosis[0], r.counterexample.first_fails_at), r.diagnosis


#: The details a finding gives: which bias, which row, which heads, how far ahead, what the
#: rows sum to, which key is read from where, what chunk size (finding, first failing length).
SAYS_WHICH = {
    "value_bias_dropped": lambda f, n: f["bias"] == "value",
    "output_bias_twice": lambda f, n: f["bias"] == "output",
    "last_token_wrong_row": lambda f, n: f["row"] == 0 and "query of position 0" in f["text"],
    "heads_swapped": lambda f, n: f["heads"][:2] == [{"head": 0, "columns_of": [1]}, {"head": 1, "columns_of": [0]}],
    "mask_shifted_by_two": lambda f, n: f["ahead"] == 2,
    # normalised over queries: the first row's weights are shared out
    "softmax_wrong_axis": lambda f, n: f["min"] < 1 < f["max"],
    # the newest row reads position 0 in place of its own key
    "last_slot_stale": lambda f, n: f["key"] == f["position"][-1] == n - 1 and f["read"] == 0,
    # two chunks of the cut failure's length
    "split_in_two_without_maxima": lambda f, n: f["chunk"] == -(-n // 2),
}


def _keys_problem(n: int = 9, n_head: int = 2, head_dim: int = 3) -> AttentionProblem:
    rng, e = np.random.default_rng(n), n_head * head_dim
    w = lambda *shape: rng.normal(size=shape) / math.sqrt(shape[0])
    return AttentionProblem(rng.normal(size=(2, n, e)), w(e, 3 * e), w(3 * e), w(e, e), w(e), n_head)


def _key_outputs(p: AttentionProblem) -> dict:
    """Outputs of one fault each, in float64: the row of position 6 of sequence 1 drops key 2,
    or reads position 7's key and value in place of key 3; split-KV in chunks of 3 combined
    without maxima; the logits doubled."""
    from rewrites.catalogue.serving import split_kv

    xp, q, k, v = heads_qkv(*p.arrays()[:3], p.n_head)
    keep = np.ones(p.n_seq, bool)
    keep[2] = False
    drop = oracles.ground_truth(p).out
    drop[1, 6] = probes._row_over(oracles.ground_truth(p), (1, 6), keep & (np.arange(p.n_seq) <= 6))
    read = k.copy(), v.copy()
    for t in read:
        t[1, :, 3] = t[1, :, 7]  # [2, H, n, hd]: key 3 of sequence 1 holds position 7's entry
    row = project_out(xp, softmax(xp, logits(xp, q, read[0])) @ read[1], *p.arrays()[3:])
    stale = oracles.ground_truth(p).out
    stale[1, 6:] = row[1, 6:]  # rows 3-5 would see it too; the probe reads the first wrong row (3)
    split = project_out(xp, split_kv(xp, q, k, v, splits=3, rescale=False), *p.arrays()[3:])
    doubled = project_out(xp, softmax(xp, 2 * logits(xp, q, k)) @ v, *p.arrays()[3:])
    return {"drop": drop, "stale": stale, "split": split, "doubled": doubled, "right": oracles.ground_truth(p).out}


def test_key_probes_name_their_fault_and_no_other():
    """Both sides of wrong_keys and split_without_maxima: each fires on its fault only, and
    neither on the right output or on attention at another scale."""
    p = _keys_problem()
    truth, outs = oracles.ground_truth(p), _key_outputs(p)
    fired = {name: [f["finding"] for f in probes.wrong_keys(p, truth, "float64", out) +
                    probes.split_without_maxima(p, truth, "float64", out)] for name, out in outs.items()}  # fmt: skip
    assert fired == {"drop": ["drops a key"], "stale": ["reads the wrong key"], "split": ["combined without maxima"],
                     "doubled": [], "right": []}, fired  # fmt: skip
    (drop,) = probes.wrong_keys(p, truth, "float64", outs["drop"])
    assert (drop["position"], drop["key"]) == ([1, 6], 2), drop
    (stale,) = probes.wrong_keys(p, truth, "float64", outs["stale"])
    assert (stale["position"], stale["key"], stale["read"]) == ([1, 6], 3, 7), stale
    (split,) = probes.split_without_maxima(p, truth, "float64", outs["split"])
    assert split["chunk"] == 3, split


@pytest.fixture(scope="module")
def unstable(tmp_path_factory):
    """name -> {dtype: Result} on NumPy with the known hard large-logit examples (`verify`'s own)."""
    config = Config(examples=10, report_dir=tmp_path_factory.mktemp("report"), dtypes=("float64", "float32"),
                    profile=inputs.QUICK, invariance=False)  # fmt: skip
    verifier = Verifier(config)
    return lambda name: {r.dtype: r for r in verifier.verify_one(_builtin(name), ["numpy"], False)}


@pytest.mark.parametrize(
    ("name", "dtype", "logits"), [("mask_minus_1e4", "float32", 1e4), ("mask_pico_minus_1e10", "float64", 1e10)]
)
def test_a_finite_mask_leaks_the_future_at_its_logit_magnitude(unstable, name, dtype, logits):
    r = unstable(name)[dtype]
    assert r.verdict is Verdict.UNSTABLE, r
    (leak,) = r.diagnosis
    assert leak["finding"] == "leaks the future" and logits <= leak["logits"] < 100 * logits, leak


def test_an_overflow_says_where_and_at_which_logits(unstable):
    r = unstable("no_max_subtraction")["float32"]
    assert r.verdict is Verdict.UNSTABLE, r
    (overflow,) = r.diagnosis
    # float32's exp overflows past 88.72 (a row sum of n terms a little earlier) and is 0
    # below -103.97 (a row whose every exp is 0 divides 0 by 0): where the search's failure starts
    assert overflow["finding"] == "non-finite" and 80 <= overflow["logits"] <= 104, overflow


def value_circuit_flushed(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """W_v W_o merged per head, its products below the smallest normal flushed to zero (as
    XLA on a CPU flushes them): the reference never forms a product of two weights."""
    xp, q, k, _ = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    e = x.shape[-1]
    hd = e // n_head
    p = softmax(xp, logits(xp, q, k))  # [..., n_head, n_seq, n_seq]
    out = c_attn_b[2 * e :] @ c_proj_w + c_proj_b  # rows of p sum to 1
    for h in range(n_head):
        w_ov = c_attn_w[:, 2 * e + h * hd : 2 * e + (h + 1) * hd] @ c_proj_w[h * hd : (h + 1) * hd, :]
        w_ov = xp.where(xp.abs(w_ov) < xp.finfo(x.dtype).smallest_normal, 0.0, w_ov)  # [n_embd, n_embd]
        out = out + p[..., h, :, :] @ (x @ w_ov)
    return out


def _tiny_weights(scale: float) -> AttentionProblem:
    """3 tokens, 4 heads of 2, inputs of 64, weights `scale` times GPT-2's size and no
    biases (which would swamp an output of the weights' magnitude squared)."""
    rng, e = np.random.default_rng(1), 8
    w = lambda *shape: rng.normal(size=shape) / np.sqrt(e) * scale
    return AttentionProblem(64 * rng.normal(size=(3, e)), w(e, 3 * e), np.zeros(3 * e), w(e, e), np.zeros(e), 4)


def _is_named_an_underflow(rw: Rewrite, backend: str, p: AttentionProblem) -> None:
    out = run_rewrite(rw, backend, "float32", p)
    assert reference(p, backend, "float32").excess(out) > 1  # it does fail there
    (found,) = diagnose.instability(rw, backend, "float32", p, out)
    assert found["finding"] == "underflow" and found["shift"] > 20, found


def test_an_underflow_of_the_rewrite_s_own_is_named(backend):
    """Weights of 2^-62: the products W_v W_o lie below float32's smallest normal, which the
    reference never forms; balanced magnitudes (the same q, k, v) make it pass."""
    rw = _test_rewrite("value_circuit_flushed", value_circuit_flushed)
    _is_named_an_underflow(rw, backend, _tiny_weights(2.0**-62))


def test_merged_circuits_underflow_on_jax_in_float32():
    """Measured: XLA on a CPU flushes subnormals, and merged QK and OV circuits form W_v W_o."""
    if "jax" not in backends.available():
        pytest.skip("jax is not installed")
    _is_named_an_underflow(_builtin("merged_qk_ov_circuits"), "jax", _tiny_weights(2.0**-62))


def plus_epsilon(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Attention plus 1e-30: wrong wherever outputs are that small, whatever their balance."""
    return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head) + 1e-30


def test_a_failure_that_balanced_magnitudes_do_not_mend_is_not_an_underflow(backend):
    rw, p = _test_rewrite("plus_epsilon", plus_epsilon), _tiny_weights(2.0**-62)
    out = run_rewrite(rw, backend, "float32", p)
    assert reference(p, backend, "float32").excess(out) > 1
    assert diagnose.instability(rw, backend, "float32", p, out) == []
    # and at magnitudes far from the subnormal range the probe does not run at all
    assert probes.underflow(rw, backend, "float32", _tiny_weights(2.0**-20)) == []


def test_the_page_shows_the_verdicts_first_then_each_diagnosis_with_its_picture(verdicts, tmp_path):
    import html

    from rewrites import report

    leak = verdicts("mask_shifted_by_two", mask_shifted_by_two)["float64"]
    unknown = verdicts("linear_attention_elu", _builtin("linear_attention_elu"))["float64"]
    report.write([leak, unknown], tmp_path, {"examples": 10})
    page = (tmp_path / "index.html").read_text()
    assert page.index("<table") < page.index("What is wrong") < page.index("<svg") < page.index("<h2>Run")
    for r in (leak, unknown):
        assert html.escape(r.diagnosis[0]["text"]) in page
    assert page.count('fill="#d33"') == len(leak.diagnosis[0]["seen"])  # one red cell per key seen ahead
    assert "x = [" in page  # a small counterexample's values in full
    markdown = (tmp_path / "verdicts.md").read_text()  # and one line per rewrite in verdicts.md and the terminal
    assert all(f"{r.rewrite}: {r.diagnosis[0]['text']}" in markdown for r in (leak, unknown))


def rounding_by_length(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """float32 arithmetic from 17 tokens on, exact below: the whole output's rounding chosen
    by length (a kernel chosen by shape; JAX's TF32 on a GPU went wrong at 37 tokens so).
    float32, not float16: shrinking drives the biases below float16's smallest subnormal,
    where float16 arithmetic does drop them (and is told so)."""
    xp = array_namespace(x)
    if x.shape[-2] < 17:
        return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    h = lambda a: xp.astype(a, xp.float32)
    return xp.astype(_attention(h(x), h(c_attn_w), h(c_attn_b), h(c_proj_w), h(c_proj_b), n_head), x.dtype)


def shifted_from_17(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """A formula switched by length: from 17 tokens on every output is 0.1 off."""
    out = _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    return out + 0.1 if x.shape[-2] >= 17 else out


@pytest.fixture(scope="module")
def across_17(tmp_path_factory):
    """name -> its float64 Result, searched across n_seq 17 (NumPy, synthetic inputs)."""
    from properties.strategies import long_attention_problems

    band = long_attention_problems(ladder=(1, 2, 3, 5, 8, 16, 17, 31, 32, 33), between=False)
    verdict = _float64_searched(tmp_path_factory, band, examples=10)
    return lambda name, fn: verdict(_test_rewrite(name, fn))


def test_a_length_where_every_row_fails_is_left_to_the_precision_evidence(across_17):
    """Both sides: a threshold where row 0 fails too is no formula finding by itself. A
    rounding that changes with the length is `imprecise` at it; a formula that changes with
    the length (every row shifted) is `inequivalent`, with the threshold said."""
    r = across_17("rounding_by_length", rounding_by_length)
    assert r.verdict is Verdict.IMPRECISE and r.precision == "float32" and not r.diagnosis, r
    r = across_17("shifted_from_17", shifted_from_17)
    assert r.verdict is Verdict.INEQUIVALENT, r
    (t,) = [f for f in r.diagnosis if f["finding"] == "length threshold"]
    assert t["first_fails_at"] == 17 and not t["earlier_rows_pass"] and "every row from 0" in t["text"], t


def _logits_near(z: float) -> AttentionProblem:
    """Dense, 6 tokens, 2 heads of 4, the query weights scaled so the logits are about z."""
    rng, e = np.random.default_rng(5), 8
    w = lambda *shape: rng.normal(size=shape) / math.sqrt(e)
    c_attn_w = w(e, 3 * e)
    c_attn_w[:, :e] *= z / 2
    return AttentionProblem(rng.normal(size=(6, e)), c_attn_w, w(3 * e), w(e, e), w(e), n_head=2)


def _float32(problem: AttentionProblem) -> np.ndarray:
    """The right formula in float32 arithmetic, back in float64."""
    args = [a.astype(np.float32) for a in problem.arrays()]
    return numpy_oracle.attention(*args, problem.n_head).astype(np.float64)


def test_a_failure_within_a_lower_precision_s_wide_bound_is_called_undecided():
    wide = _logits_near(3e5)  # float32's bound is finite but wider than 1/16 of the output here
    bound = float(oracles.ground_truth(wide).tolerance("float32").max())
    assert INFORMATIVE * np.abs(oracles.ground_truth(wide).out).max() < bound < math.inf
    p = Precision("float64")
    p.add(_float32(wide), wide, "numpy")
    found = p.undecided
    assert p.effective is None and found is not None and found["precision"] == "float32", (p, found)
    assert found["bound"] == pytest.approx(bound) and "too wide to tell float32 arithmetic" in found["text"]


def test_a_failure_that_leaves_the_wide_bound_or_an_informative_one_is_not_undecided():
    wide, moderate = _logits_near(3e5), _logits_near(1.0)
    wrong = lambda pb: oracles.ground_truth(pb).out + 100.0  # a wrong formula, beyond even the wide bound (14)
    f32 = (wide, _float32(wide))
    for failures in ([(wide, wrong(wide)), f32], [(moderate, wrong(moderate)), f32]):
        p = Precision("float64")  # one failure leaves the wide bound, or an informative one
        for pb, out in failures:
            p.add(out, pb, "numpy")
        assert p.undecided is None, p
    p = Precision("float64")
    p.add(_float32(moderate), moderate, "numpy")  # an informative bound, held: evidence, not undecided
    p.add(_float32(wide), wide, "numpy")
    assert p.undecided is None and "float32" in p.seen, p


def _batched(batch: tuple[int, ...], n_seq: int = 5, n_head: int = 2, head_dim: int = 3) -> AttentionProblem:
    """Dense values, every item its own."""
    rng, e = np.random.default_rng(11), n_head * head_dim
    w = lambda *shape: rng.normal(size=shape) / math.sqrt(e)
    return AttentionProblem(rng.normal(size=(*batch, n_seq, e)), w(e, 3 * e), w(3 * e), w(e, e), w(e), n_head)


def test_batch_items_names_the_wrong_items_and_the_smallest_failing_batch():
    """Both sides of the batch-items probe: items wrong inside a batch and right alone are
    named, with the smallest batch that fails (a dropped odd item: 3) or, where no flat batch
    fails, the batch dimensions (two merged in the wrong order); a formula wrong for every
    item alone, the right formula and a batch of one item get nothing."""

    def fired(rw: Rewrite, p: AttentionProblem) -> list[dict]:
        return probes.batch_items(rw, "numpy", "float64", p, run_rewrite(rw, "numpy", "float64", p))

    (f,) = fired(_builtin("microbatch_odd_item_dropped"), _batched((5,)))
    assert f["finding"] == "batch items" and f["items"] == [4] and f["first_fails_at_batch"] == 3, f
    (f,) = fired(_builtin("batch_dims_merged_transposed"), _batched((2, 3)))
    assert f["items"] == [1, 2, 3, 4] and f["first_fails_at_batch"] is None and "dimensions [2, 3]" in f["text"], f
    assert fired(_test_rewrite("t", scaled(0.5)), _batched((5,))) == []  # wrong alone too: not the batch's doing
    assert fired(_test_rewrite("t", scaled(1.0)), _batched((5,))) == []
    assert fired(_builtin("microbatch_odd_item_dropped"), _batched((1,))) == []


@pytest.fixture(scope="module")
def short_lengths(tmp_path_factory):
    """rewrite -> its float64 Result, searched at short lengths with the default batches
    (NumPy, synthetic inputs, no explicit examples)."""
    from properties.strategies import long_attention_problems

    return _float64_searched(tmp_path_factory, long_attention_problems(ladder=(1, 2, 3, 5, 8, 16, 17)), examples=20)


@pytest.mark.parametrize("name", ["microbatch_odd_item_dropped", "batch_dims_merged_transposed"])
def test_a_batch_fault_is_found_by_the_search_alone(short_lengths, name):
    """Batches of 1 and 2 alone cannot show these (two such faults, tried as plugins with
    those batches only, were `bitwise` on every backend)."""
    r = short_lengths(_builtin(name))
    assert r.verdict is Verdict.INEQUIVALENT and _finding(r, "batch items") is not None, r
    batch = r.counterexample.shape["batch"]
    assert (len(batch) == 2 and min(batch) > 1) if "merged" in name else math.prod(batch) % 2 == 1, batch


def test_a_dropped_head_is_named_and_a_head_without_values_is_not():
    """Both sides of the dropped-heads check: a kernel that leaves an odd last head at zero
    drops head 6 of 7 (and nothing of 12); the right formula on a problem whose head 1 has
    no values (its columns are zero in the truth too) drops nothing."""
    dropped = _builtin("heads_in_pairs_odd_head_dropped")
    names = lambda found: [f["finding"] for f in found]
    (f,) = probes.heads_mixed(dropped, "numpy", "float64", _batched((), n_head=7, head_dim=2))
    assert f["finding"] == "drops heads" and f["heads"] == [6], f
    assert probes.heads_mixed(dropped, "numpy", "float64", _batched((), n_head=12, head_dim=2)) == []
    p = _batched((), n_head=3, head_dim=2)
    p.c_attn_w[:, 2 * p.n_embd + 2 : 2 * p.n_embd + 4] = 0.0  # head 1's values: none
    p.c_attn_b[2 * p.n_embd + 2 : 2 * p.n_embd + 4] = 0.0
    assert names(probes.heads_mixed(_test_rewrite("t", scaled(1.0)), "numpy", "float64", p)) == []


def test_an_odd_head_count_fault_is_found_by_the_search_alone(short_lengths):
    """Head counts 1, 2 and 12 alone never show a fault in the remainder of pairs of heads."""
    r = short_lengths(_builtin("heads_in_pairs_odd_head_dropped"))
    assert r.verdict is Verdict.INEQUIVALENT and _finding(r, "drops heads") is not None, r
    assert r.counterexample.shape["n_head"] % 2 == 1 and r.counterexample.shape["n_head"] > 1, r.counterexample


def bits_differ_at_head_dim_3(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """At head_dim 3 only: float32 arithmetic for float64 inputs (a float64 failure), and
    in float32 other bits (within the bound: (out + 1) - 1 drops the low bits of small
    values); else the right formula, as the oracle computes it."""
    xp = array_namespace(x)
    if x.shape[-1] // n_head != 3:
        return _attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    if x.dtype == xp.float64:
        return softmax_in_float32(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    return (_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head) + 1) - 1


def test_bitwise_counts_the_replayed_float64_failure_too(tmp_path):
    """Both sides: float32's own search sees head_dim 1 only, where both rewrites have the
    oracle's bits; float64's failure (head_dim 3), replayed in float32, has other bits for
    one of them, which is then `equivalent` in float32, not `bitwise`."""
    from properties.strategies import attention_problems

    shapes = dict(max_seq=(2, 3), max_head=(1, 2), batches=((),))
    profile = inputs.Profile("t", (attention_problems(max_head_dim=(3,), **shapes),),
                             (attention_problems(max_head_dim=(1,), **shapes),), None)  # fmt: skip
    config = Config(examples=5, report_dir=tmp_path, dtypes=("float64", "float32"), profile=profile,
                    explicit_examples=False, invariance=False)  # fmt: skip
    verifier = Verifier(config)
    got = lambda name, fn: {r.dtype: r.verdict for r in verifier.verify_one(_test_rewrite(name, fn), ["numpy"], False)}
    assert got("differs", bits_differ_at_head_dim_3) == {"float64": Verdict.IMPRECISE, "float32": Verdict.EQUIVALENT}
    same_bits = lambda *a: bits_differ_at_head_dim_3(*a) if a[0].dtype == np.float64 else _attention(*a)
    assert got("same_bits", same_bits) == {"float64": Verdict.IMPRECISE, "float32": Verdict.BITWISE}


def wrong_head_map_from_16_heads(*args):
    """From 16 heads on, the last head attends with head 0's logits (a kernel's head
    mapping that goes wrong past a head count); exact below."""
    return shape_faulted(*args, heads=16)


def float32_from_16_heads(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """From 16 heads on, the softmax in float32 (a kernel chosen by head count); exact below."""
    fn = softmax_in_float32 if n_head >= 16 else _attention
    return fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)


@pytest.fixture(scope="module")
def at_33_heads(tmp_path_factory):
    """rewrite -> its float64 Result, searched at 2 tokens of 33 heads of 1 alone (NumPy)."""
    from properties.strategies import attention_problems

    verdict = _float64_searched(tmp_path_factory, attention_problems(shape_menu=[((), 2, 33, 1)]), examples=10)
    return lambda name, fn: verdict(_test_rewrite(name, fn))


def test_a_fault_of_many_heads_is_not_taken_for_rounding(at_33_heads):
    """Both sides of the evidence on the failure's own heads: a wrong head map from 16
    heads, whose error on 2 tokens of 33 heads of 1 lies within float16's bound, is
    `inequivalent` (the 8-token problem of 2 heads, exact for it, let it pass for float16
    arithmetic); float32 arithmetic from 16 heads is still `imprecise` at float32."""
    r = at_33_heads("wrong_head_map_from_16_heads", wrong_head_map_from_16_heads)
    assert r.verdict is Verdict.INEQUIVALENT and r.precision is None, r
    r = at_33_heads("float32_from_16_heads", float32_from_16_heads)
    assert r.verdict is Verdict.IMPRECISE and r.precision == "float32", r


def test_rows_that_sum_to_one_are_not_told_otherwise_by_values_that_underflow():
    """Both sides of the rows probe on values far below float32's range (a value bias of
    1e-171, no value weights: what shrinking left of a failure): float32 arithmetic, whose
    values underflow to 0, has rows that sum to 1 (the probe scales the values up, exactly);
    weights that sum to 1/2 still sum to 1/2."""
    p = _keys_problem()
    e = p.n_embd
    w, b = p.c_attn_w.copy(), p.c_attn_b.copy()
    w[:, 2 * e :], b[2 * e :] = 0.0, 1e-171
    tiny = AttentionProblem(p.x, w, b, p.c_proj_w, p.c_proj_b, p.n_head)
    fired = lambda fn: probes.rows_do_not_sum_to_one(_test_rewrite("t", fn), "numpy", "float64", tiny)
    assert fired(_all_in_float32) == []
    (f,) = fired(_half_weights)
    assert f["finding"] == "rows do not sum to 1" and f["min"] == pytest.approx(0.5) == f["max"], f


def _half_weights(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Attention weights that sum to 1/2."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, logits(xp, q, k)) / 2 @ v, c_proj_w, c_proj_b)


def _all_in_float32(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Everything in float32, the result cast back."""
    xp = array_namespace(x)
    h = lambda a: xp.astype(a, xp.float32)
    return xp.astype(_attention(h(x), h(c_attn_w), h(c_attn_b), h(c_proj_w), h(c_proj_b), n_head), x.dtype)
