"""Grouped-query attention at the core level: a problem with its k, v heads tied in groups is
the multi-head problem a grouped kernel computes exactly; the wrong head map (`tile` for
`repeat_interleave`) is caught and named on every backend (the claims themselves are held
in test_rewrites.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oracles import numpy_oracle
from oracles.problem import AttentionProblem
from rewrites.registry import Rewrite, kv_head_count
from rewrites.verify import Inputs


def problem(n_head: int, head_dim: int = 3, n_seq: int = 4, seed: int = 0) -> AttentionProblem:
    rng = np.random.default_rng(seed)
    e = n_head * head_dim
    return AttentionProblem(rng.normal(size=(n_seq, e)), rng.normal(size=(e, 3 * e)), rng.normal(size=3 * e),
                            rng.normal(size=(e, e)), rng.normal(size=e), n_head)  # fmt: skip


@given(n_head=st.sampled_from([1, 2, 3, 4, 6, 12]), kind=st.sampled_from(["all", "half", "one"]))
def test_tied_heads_are_what_a_grouped_kernel_computes(n_head, kind):
    p = problem(n_head)
    kv = kv_head_count(kind, n_head)
    tied = p.with_kv_heads(kv)
    g, hd, e = n_head // kv, p.head_dim, p.n_embd
    k_heads = tied.c_attn_w[:, e : 2 * e].reshape(e, n_head, hd)
    for h in range(n_head):  # each head's k (and v) columns are its group's first head's, the group's first its own
        assert np.array_equal(k_heads[:, h], p.c_attn_w[:, e : 2 * e].reshape(e, n_head, hd)[:, h // g * g])
    assert np.array_equal(tied.c_attn_w[:, :e], p.c_attn_w[:, :e])  # queries untouched
    assert tied.with_kv_heads(kv) is tied  # tying twice changes nothing
    # the grouped computation: k, v of each group's first head, repeated for the group, is the oracle's output
    q, k, v = (np.moveaxis((p.x @ tied.c_attn_w + tied.c_attn_b)[:, i * e : (i + 1) * e].reshape(-1, n_head, hd), 1, 0)
               for i in range(3))  # fmt: skip
    k, v = (np.repeat(t[::g], g, axis=0) for t in (k, v))
    z = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((p.n_seq, p.n_seq), -np.inf), 1)
    a = np.exp(z - z.max(-1, keepdims=True))
    o = np.moveaxis(a / a.sum(-1, keepdims=True) @ v, 0, 1).reshape(p.n_seq, e) @ tied.c_proj_w + tied.c_proj_b
    np.testing.assert_allclose(o, numpy_oracle.attention(*tied.arrays(), n_head), rtol=1e-12, atol=1e-12)


def test_bad_groups_are_one_line_errors():
    with pytest.raises(ValueError, match="n_kv_head=4 does not divide n_head=6"):
        problem(6).with_kv_heads(4)
    with pytest.raises(ValueError, match=r"kv_heads 'half' is not one of .* on a core-level rewrite"):
        Rewrite("x", "d", "f", lambda *a: None, kv_heads="half")
    with pytest.raises(ValueError, match="kv_heads 'two'"):
        Rewrite("x", "d", "f", lambda q, k, v: q, level="core", kv_heads="two")


@pytest.mark.families("grouped_kv")
def test_the_wrong_head_map_is_named(rewrite_case, verdicts):
    rw, backend, dtype = rewrite_case
    if rw.claim != "inequivalent":
        pytest.skip(f"{rw.name} is no mutant (test_rewrites.py holds its claim)")
    (r,) = [r for r in verdicts(rw, backend) if r.dtype == dtype and r.inputs is Inputs.HYPOTHESIS]
    finding = r.diagnosis[0]
    assert finding["finding"] == "reorders heads", r.diagnosis
    # groups of 2: k, v head 0 (heads 0-1) lands on heads 0 and n_kv, as `tile` repeats it
    n_kv = r.counterexample.shape["n_head"] // 2
    assert {"head": 0, "columns_of": [0, n_kv]} in finding["heads"], finding
