"""Padded batches and packed documents (oracles/problem.py's layouts): the truth computes
each real position as its own sequence alone and a padding position as c_proj's bias;
every oracle agrees within the bound; the padding and packing mutants are caught with a
diagnosis that names the row and what it attends, and correct outputs are not flagged."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracles
from oracles.problem import AttentionProblem
from properties.checks import matches_truth, oracle_runner
from properties.strategies import attention_problems, packed_problems, padded_problems
from rewrites.verify import Inputs, Verdict
from rewrites.verify.inputs import with_layout
from rewrites.verify.probes import layout_fault

LAYOUTS = st.one_of(padded_problems(attention_problems()), packed_problems(attention_problems()))

#: What each mutant's diagnosis must say (the first failing verdict's finding).
SAYS = {
    "padding_keys_attended": "attends padding",
    "padding_rows_nan": "comes out NaN",
    "padding_off_by_one": "attends padding: one key before its sequence",
    "packing_without_boundaries": "attends document",
    "packing_boundary_off_by_one": "one key before its sequence",
    "jax_dot_product_attention_padding_mask": "is padding and attends",
}


def _alone(problem: AttentionProblem, row: tuple, positions: np.ndarray) -> np.ndarray:
    """The truth of the positions of one document, computed as a problem of its own."""
    return oracles.ground_truth(AttentionProblem(problem.x[row][positions], *problem.arrays()[1:],
                                                 n_head=problem.n_head)).out  # fmt: skip


@given(problem=LAYOUTS)
def test_the_truth_is_each_document_alone_and_the_bias_on_padding(problem):
    truth = oracles.ground_truth(problem)
    assert np.isfinite(truth.out).all() and np.isfinite(truth.bound("float32")).all()
    for row in np.ndindex(problem.x.shape[:-2]):
        seg = problem.segments[row]
        for d in set(seg[seg >= 0].tolist()):
            at = np.flatnonzero(seg == d)
            np.testing.assert_allclose(truth.out[row][at], _alone(problem, row, at), rtol=1e-12, atol=1e-12)
        padding = truth.out[row][seg < 0]
        assert np.array_equal(padding, np.broadcast_to(problem.c_proj_b, padding.shape))  # exactly: 0 @ W + b


@given(problem=LAYOUTS)
def test_oracle_matches_truth_on_padded_and_packed_problems(backend, dtype, problem):
    matches_truth(oracle_runner(backend, dtype), problem, backend, dtype)


def test_conventions_and_one_line_errors():
    p = AttentionProblem(np.zeros((2, 5, 4)), np.zeros((4, 12)), np.zeros(12), np.zeros((4, 4)), np.zeros(4), 2)
    left = p.padded([3, 0], "left")
    assert left.attention_mask().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert p.packed([1, 0, 2]).cu_seqlens().tolist() == [0, 1, 1, 3]  # two padding positions follow
    assert p.cu_seqlens().tolist() == [0, 5] and p.attention_mask().all()  # no layout: one document
    with pytest.raises(ValueError, match="no cu_seqlens"):
        left.cu_seqlens()
    with pytest.raises(ValueError, match="padding: 2 length"):
        p.padded([6, 1], "left")
    with pytest.raises(ValueError, match="do not fit"):
        p.packed([4, 2])
    with pytest.raises(ValueError, match="segments has shape"):
        AttentionProblem(*p.arrays(), n_head=2, segments=np.zeros(5, int))


def test_a_layout_survives_a_file_and_a_prefix(tmp_path):
    p = with_layout(_dense(9), "packed")
    back = AttentionProblem.load(p.save(tmp_path / "p.npz"))
    assert np.array_equal(back.segments, p.segments) and back.prefix(4).segments.tolist() == p.segments[:4].tolist()
    assert with_layout(_dense(12), "padded").attention_mask().sum(-1).tolist() == [8, 9]  # two thirds, three quarters


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_diagnosis_flags_no_correct_output(layout):
    p = with_layout(_dense(20), layout)
    truth = oracles.ground_truth(p)
    assert layout_fault(p, truth, "float64", truth.out.copy()) == []


def test_the_diagnosis_names_nan_padding_rows_and_attended_documents():
    p = with_layout(_dense(20), "packed")  # documents [1, 7, 11], one padding position
    truth = oracles.ground_truth(p)
    nan = truth.out.copy()
    nan[-1] = np.nan
    assert "position 19 is padding and comes out NaN" in layout_fault(p, truth, "float64", nan)[0]["text"]
    plain = oracles.ground_truth(AttentionProblem(*p.arrays(), n_head=p.n_head)).out  # no boundaries
    plain[-1] = p.c_proj_b
    (f,) = layout_fault(p, truth, "float64", plain)
    assert f["text"].startswith("position 1 (document 1) attends document 0"), f


@pytest.mark.layouts("padded", "packed")
def test_each_layout_mutant_is_caught_with_what_it_attends(rewrite_case, verdicts):
    rw, backend, dtype = rewrite_case
    if rw.name not in SAYS:
        pytest.skip(f"{rw.name}: no layout mutant (test_rewrites.py holds its claim)")
    for r in (r for r in verdicts(rw, backend) if r.dtype == dtype):
        assert r.verdict is Verdict.INEQUIVALENT, f"{rw.name} on {backend} {dtype} ({r.inputs.value}): {r.verdict}"
        if dtype == "float64" and r.inputs is Inputs.HYPOTHESIS:  # the diagnosed verdict
            assert any(SAYS[rw.name] in f["text"] for f in r.diagnosis), r.diagnosis


def test_every_layout_mutant_says_what_it_attends():
    from rewrites.registry import builtin

    mutants = {rw.name for rw in builtin() if rw.layout != "dense" and rw.claim == "inequivalent"}
    assert mutants == set(SAYS)


def _dense(n: int) -> AttentionProblem:
    rng = np.random.default_rng(n)
    e = 8
    w = lambda *s: rng.normal(size=s) / np.sqrt(e)
    return AttentionProblem(rng.normal(size=(n, e)), w(e, 3 * e), w(3 * e), w(e, e), w(e), 2)
