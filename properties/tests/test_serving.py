"""The serving families split_kv and paged_kv (rewrites/catalogue/serving.py): a paged cache gives back exactly what
was written, through any block table; its mutants are found by the search alone at their
exact first failing length (the verdicts test_rewrites.py holds claims against)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewrites.catalogue import serving
from rewrites.common import array_namespace
from rewrites.verify import Inputs, Verdict

#: Where each mutant first fails (its docstring says why); None: depends on the content
#: (two chunks must have different maxima), from 2 tokens on.
FIRST_FAILS_AT = {
    "split_kv_combined_without_maxima": None,
    "paged_kv_misordered_pages": 17,
    "paged_kv_stale_page": 17,
}
#: What its diagnosis must say, at that length: the pages swapped bring key 16 to row 0, the
#: stale entry has row 16 read position 0's key and value in place of its own.
FINDING = {
    "split_kv_combined_without_maxima": {"finding": "combined without maxima"},
    "paged_kv_misordered_pages": {"finding": "leaks the future", "first_row": 0, "ahead": 16},
    "paged_kv_stale_page": {"finding": "reads the wrong key", "key": 16, "read": 0},
}


@given(n_pages=st.integers(1, 70))
def test_block_table_is_a_shuffle(n_pages):
    table = serving.block_table(n_pages)
    assert sorted(table) == list(range(n_pages))
    assert n_pages == 1 or table != sorted(table)  # a cache read in slot order must be wrong


@given(n=st.integers(1, 80), heads=st.integers(1, 3))
def test_pages_give_back_what_was_written(n, heads):
    k = np.random.default_rng(n).normal(size=(heads, n, 4))
    xp = array_namespace(k)
    table = serving.block_table(-(-n // serving.PAGE))
    assert np.array_equal(serving.read_pages(xp, serving.paged(xp, k, table), table, n), k)
    if len(table) > 1:  # and the mutants' reads do not
        assert not np.array_equal(serving.read_pages(xp, serving.paged(xp, k, table), sorted(table), n), k)


@pytest.mark.families("split_kv", "paged_kv")
def test_serving_mutant_found_at_its_exact_first_failing_length(rewrite_case, verdicts, verifiers):
    rw, backend, dtype = rewrite_case
    if rw.name not in FIRST_FAILS_AT:
        pytest.skip(f"{rw.name} is no mutant (test_rewrites.py holds its claim)")
    if verifiers(rw.family, backend).config.profile.name != "full":
        pytest.skip(f"pytest searches real lengths where no length compiles anew; on {backend}, `verify` does")
    (r,) = [r for r in verdicts(rw, backend) if r.dtype == dtype and r.inputs is Inputs.HYPOTHESIS]
    assert r.verdict is Verdict.INEQUIVALENT, f"{rw.name} on {backend} {dtype}: {r.verdict}"
    ce, expected = r.counterexample, FIRST_FAILS_AT[rw.name]
    assert ce.first_fails_at == expected if expected else ce.first_fails_at >= 2, ce
    assert ce.shape["n_seq"] == ce.first_fails_at
    assert FINDING[rw.name].items() <= r.diagnosis[0].items(), r.diagnosis


def test_every_serving_mutant_has_a_stated_threshold():
    from rewrites.registry import builtin

    mutants = {rw.name for rw in builtin() if rw.family in ("split_kv", "paged_kv") and rw.claim == "inequivalent"}
    assert mutants == set(FIRST_FAILS_AT)
