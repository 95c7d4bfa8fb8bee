"""The bitwise invariances reported beside each verdict (rewrites/verify/invariance.py), on
both sides: a rewrite that holds them by construction (each item alone, each row from its
own prefix only) is reported invariant, and each fault made on top of it is reported,
with its witness, as the invariance it breaks and no other; on the synthetic problem and
on a real GPT-2 layer, where a fault that shows on one source only is still reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oracles.problem import AttentionProblem
from rewrites import cli
from rewrites.common import array_namespace, linear, project_out, scores, softmax, split_heads, split_qkv
from rewrites.registry import Rewrite
from rewrites.report import invariance_table
from rewrites.verify import Config, Verifier, inputs
from rewrites.verify.execute import NONDETERMINISM
from rewrites.verify.invariance import PREFIX, PREFIX_UNBLOCKED, measure, prefix, real, synthetic


def by_construction(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Each batch item alone, each row from the keys of its own prefix, one token at a time."""
    xp = array_namespace(x)
    if x.ndim > 2:
        w = (c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
        return xp.stack([by_construction(x[i], *w) for i in range(x.shape[0])])
    ks, vs, rows = [], [], []
    for t in range(x.shape[0]):
        q, k, v = (split_heads(xp, s, n_head) for s in split_qkv(xp, linear(x[t : t + 1], c_attn_w, c_attn_b)))
        ks.append(k)
        vs.append(v)
        z = scores(xp, q, xp.concat(ks, axis=-2))  # [H, 1, t + 1]
        rows.append(project_out(xp, softmax(xp, z) @ xp.concat(vs, axis=-2), c_proj_w, c_proj_b))
    return xp.concat(rows, axis=-2)


def rounded_again(out):
    """Within the bound, other bits: (out + 1) - 1 drops the low bits of small values."""
    return (out + 1.0) - 1.0


def batch_dependent(x, *w):
    out = by_construction(x, *w)
    return rounded_again(out) if x.ndim > 2 else out


def length_dependent(x, *w, rows: int = PREFIX[0]):
    out = by_construction(x, *w)
    return rounded_again(out) if x.shape[-2] > rows else out


def test_a_real_layer_in_a_dtype_without_blas_compares_shorter_prefixes():
    """NumPy's float16 (no BLAS: 12 s a rewrite for a real layer at 100/256 tokens) measures
    a real layer at 32/96, where a fault from 32 rows on is reported; the synthetic source
    and every other backend x dtype stay at 100/256."""
    m, n = PREFIX_UNBLOCKED
    layer, synth = real([small_layer(i) for i in range(12)], 3), synthetic()
    assert prefix("numpy", "float16", layer) == (m, n)
    assert prefix("numpy", "float32", layer) == prefix("numpy", "float16", synth) == PREFIX

    def longer_than_m(x, *w):
        return length_dependent(x, *w, rows=m)

    inv = measure(case(longer_than_m), "numpy", "float16", [layer])
    assert (inv.batch, inv.prefix, inv.deterministic) == (True, False, True), inv
    assert inv.witness["prefix"].startswith(f"real layer 3: the first {m} rows of {n} tokens differ"), inv.witness
    inv = measure(case(length_dependent), "numpy", "float16", [synth])  # from 100 rows on
    assert inv.witness["prefix"].startswith(f"synthetic: the first {PREFIX[0]} rows of {PREFIX[1]}"), inv.witness


CALLS = [0]


def nondeterministic(x, *w):
    CALLS[0] += 1
    out = by_construction(x, *w)
    return rounded_again(out) if CALLS[0] % 2 else out


def raises(x, *w):
    raise ValueError("no")


def case(fn, output: str = "full") -> Rewrite:
    return Rewrite(fn.__name__, "test", "test", fn, output, claim="equivalent")


@pytest.mark.parametrize(
    "fn, expected, broken",
    [
        (by_construction, (True, True, True), None),
        (batch_dependent, (False, True, True), ("batch", "item 1 of a batch of 2 differs")),
        (length_dependent, (True, False, True), ("prefix", f"the first {PREFIX[0]} rows of {PREFIX[1]} tokens differ")),
        # once seen nondeterministic, a rewrite's every call is an error: no bits to compare
        (nondeterministic, (None, None, False), ("deterministic", "nondeterministic: two calls on the same input")),
    ],
)
def test_each_invariance_is_reported_and_only_where_broken(backend, fn, expected, broken):
    if backend != "numpy":  # JAX runs a loop per token on a prefix only; PyTorch's would add a minute to CI
        pytest.skip(f"the rewrite invariant by construction loops per token: measured on NumPy, not {backend}")
    rw = case(fn) if fn is not nondeterministic else Rewrite(f"nondeterministic_{backend}", "test", "test", fn)
    inv = measure(rw, backend, "float64", [synthetic()])
    assert (inv.batch, inv.prefix, inv.deterministic) == expected, inv
    if broken is None:
        assert inv.witness == {}
    else:
        name, says = broken
        assert inv.witness[name].startswith(f"synthetic: {says}"), inv.witness
        others = {k: w for k, w in inv.witness.items() if k != name}
        assert all(w.startswith("not measured: nondeterministic") for w in others.values()), others
        assert len(others) == sum(v is None for v in expected)


def wider_than(n_embd: int):
    """Invariant by construction below n_embd, other bits when batched from it on."""

    def wide_batch_dependent(x, *w):
        return batch_dependent(x, *w) if x.shape[-1] >= n_embd else by_construction(x, *w)

    return wide_batch_dependent


def test_a_fault_on_one_source_only_is_reported_with_that_source(gpt2_weights):
    layers = [layer.problem(np.random.default_rng(i).normal(size=(PREFIX[1], 768))) for i, layer in
              enumerate(gpt2_weights.layers())]  # fmt: skip
    sources = [synthetic(), real(layers, 3)]
    inv = measure(case(wider_than(768)), "numpy", "float64", sources)  # the real layer's width only
    assert (inv.batch, inv.prefix, inv.deterministic) == (False, True, True), inv
    assert inv.witness["batch"].startswith("real layer 3: item 1 of a batch of 2 differs"), inv.witness
    held = measure(case(by_construction), "numpy", "float64", sources)  # and on both sources, nothing flagged
    assert (held.batch, held.prefix, held.deterministic, held.witness) == (True, True, True, {}), held


def test_a_rewrite_its_searches_saw_nondeterministic_is_not_deterministic_in_that_dtype_only():
    """What the searches saw (execute.NONDETERMINISM) is the deterministic column's answer,
    the same as when the invariances see it themselves; another dtype is measured."""
    rw = Rewrite("seen_nondeterministic", "test", "test", by_construction)
    seen = "nondeterministic: two calls on the same input differ by 0.5 (seen in a search)"
    NONDETERMINISM.seen[(*rw.identity, "numpy", "float32")] = seen
    try:
        inv = measure(rw, "numpy", "float32", [synthetic()])
        assert (inv.batch, inv.prefix, inv.deterministic) == (None, None, False), inv
        unmeasured = f"not measured: {seen}"
        assert inv.witness == {"deterministic": seen, "batch": unmeasured, "prefix": unmeasured}
        other = measure(rw, "numpy", "float64", [synthetic()])
        assert (other.batch, other.prefix, other.deterministic, other.witness) == (True, True, True, {}), other
    finally:
        NONDETERMINISM.seen.pop((*rw.identity, "numpy", "float32"))


def small_layer(i: int) -> AttentionProblem:
    r = np.random.default_rng(i)
    e = 16
    return AttentionProblem(r.normal(size=(PREFIX[1], e)), r.normal(size=(e, 3 * e)), r.normal(size=3 * e),
                            r.normal(size=(e, e)), r.normal(size=e), 2, label=f"layer {i}")  # fmt: skip


def test_a_real_layer_batches_other_layers_inputs():
    layers = [small_layer(i) for i in range(12)]
    batch = real(layers, 11).problem(PREFIX[0], 5)
    assert batch.x.shape == (5, PREFIX[0], 16)
    # the item at its place, the next layers' inputs (wrapping round) around it, one layer's weights
    for i, layer in ((3, 11), (0, 0), (1, 1), (2, 2), (4, 3)):
        assert np.array_equal(batch.x[i], layers[layer].x[: PREFIX[0]]), (i, layer)
    assert np.array_equal(batch.c_attn_w, layers[11].c_attn_w)


def test_what_cannot_be_measured_says_why():
    inv = measure(case(raises), "numpy", "float64", [synthetic()])
    assert (inv.batch, inv.prefix, inv.deterministic) == (None, None, None)
    assert all(w.startswith("not measured: raised ValueError") for w in inv.witness.values()), inv.witness

    def last_row(x, *w):
        return by_construction(x, *w)[..., -1:, :]

    inv = measure(case(last_row, output="last"), "numpy", "float64", [synthetic()])
    assert (inv.batch, inv.prefix, inv.deterministic) == (True, None, True)
    assert inv.witness == {"prefix": "not measured: the rewrite returns the last row only"}


def test_verify_reports_them(tmp_path: Path):
    argv = ["verify", "--rewrite", "batched_heads", "--backend", "numpy", "--dtype", "float64", "--no-gpt2"]
    assert cli.main([*argv, "--examples", "2", "--report", str(tmp_path)]) == cli.OK
    results = json.loads((tmp_path / "verdicts.json").read_text())["results"]
    assert results and all(set(r["invariance"]) == {"batch", "prefix", "deterministic", "witness"} for r in results)
    assert "## Bitwise invariances" in (tmp_path / "verdicts.md").read_text()


def test_verdicts_carry_it_and_the_report_shows_it(tmp_path: Path):
    config = Config(examples=2, report_dir=tmp_path, dtypes=("float64",), profile=inputs.QUICK)
    results = Verifier(config).verify_one(case(batch_dependent), ["numpy"], gpt2_inputs=False)
    assert results and all(r.invariance["batch"] is False and r.invariance["prefix"] for r in results)
    assert all(r.to_json()["invariance"] == r.invariance for r in results)
    assert "| -pd " in invariance_table(results)
    off = Verifier(Config(examples=2, report_dir=tmp_path, dtypes=("float64",), profile=inputs.QUICK, invariance=False))
    assert all(r.invariance is None for r in off.verify_one(case(batch_dependent), ["numpy"], gpt2_inputs=False))
    assert np.isfinite(results[0].max_error_over_bound)


def test_verify_measures_them_on_the_rewrite_s_real_layer_too(tmp_path: Path, gpt2_weights):
    rw = case(wider_than(768))  # other bits when batched at GPT-2's width only: the real layer shows it
    config = Config(examples=2, report_dir=tmp_path, dtypes=("float64",), profile=inputs.QUICK,
                    gpt2_weights=str(gpt2_weights.path), gpt2_n_seq=PREFIX[1])  # fmt: skip
    results = Verifier(config).verify_one(rw, ["numpy"])
    layer = inputs.real_layer(rw.name, "numpy")
    assert {r.inputs.value for r in results} == {"hypothesis", "gpt2"}
    for r in results:
        assert r.invariance["batch"] is False, r.invariance
        assert r.invariance["witness"]["batch"].startswith(f"real layer {layer}: item 1 of a batch of 2"), r.invariance


def test_the_numpy_oracle_is_batch_invariant_and_its_prefix_verdict_is_its_bits():
    """The NumPy oracle as a rewrite: batch-invariant (np.matmul runs the same GEMM per item);
    prefix-variant where BLAS blocks 100 and 256 rows differently, as measured here (x86-64,
    OpenBLAS: rows 97-99 of 100 differ in float64), which is checked against its own bits."""
    from oracles import numpy_oracle

    rw = Rewrite("numpy_oracle", "test", "test", numpy_oracle.attention, claim="equivalent")
    src = synthetic()
    inv = measure(rw, "numpy", "float64", [src])
    assert inv.batch is True and inv.deterministic is True, inv
    m, n = PREFIX
    bits_kept = np.array_equal(
        numpy_oracle.attention(*src.problem(n).arrays(), src.item.n_head)[:m],
        numpy_oracle.attention(*src.problem(m).arrays(), src.item.n_head),
    )
    assert inv.prefix is bits_kept, inv
    assert bits_kept or inv.witness["prefix"].startswith(f"synthetic: the first {m} rows of {n} tokens differ")
