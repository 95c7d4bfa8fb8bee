"""Length-dependent faults are found at their exact first failing length, by the search alone.

The verdicts are the ones test_rewrites.py holds claims against (the same cached searches),
searched with the full profile (lengths to 2049, real layers at 1024) and no explicit
examples. Each length mutant's counterexample must be cut to the length where it first
fails: its first L tokens fail and its first L - 1 pass (bisection over prefixes)."""

from __future__ import annotations

import pytest

from rewrites.verify import Inputs, Verdict

#: Where each mutant is designed to start failing (its docstring says why); None: depends on
#: the content (a rescale is missed only once a later tile raises a row's max), past 64.
FIRST_FAILS_AT = {
    "sliding_window_300": 301,
    "top_k_32": 33,
    "tiles_64_tail_dropped": 65,
    "online_softmax_64_no_rescale": None,
    "chunked_prefill_100_off_by_one": 101,
    "ring_buffer_overflow_1000": 1001,
}

#: The key the first failing row goes without (its position is the first failing length - 1):
#: the window loses key 0, the partial tile its own key, top-k its lowest-scoring key (any),
#: the chunk boundary the previous chunk's last key, the ring buffer the overwritten key 0.
#: A missed rescale drops no key: it gets the length threshold alone.
DROPS_KEY = {
    "sliding_window_300": 0,
    "top_k_32": None,
    "tiles_64_tail_dropped": 64,
    "chunked_prefill_100_off_by_one": 99,
    "ring_buffer_overflow_1000": 0,
}


@pytest.mark.families("length_mutant")
def test_length_mutant_found_at_its_exact_first_failing_length(rewrite_case, verdicts, verifiers):
    rw, backend, dtype = rewrite_case
    if verifiers(rw.family, backend).config.profile.name != "full":
        pytest.skip(f"pytest searches real lengths where no length compiles anew; on {backend}, `verify` does")
    (r,) = [r for r in verdicts(rw, backend) if r.dtype == dtype and r.inputs is Inputs.HYPOTHESIS]
    expected = FIRST_FAILS_AT[rw.name]
    if r.cut_to is not None and r.cut_to < (expected or 65):
        pytest.skip(f"{backend} runs this loop on its first {r.cut_to} tokens only (Backend.tokens)")
    assert r.verdict is Verdict.INEQUIVALENT, f"{rw.name} on {backend} {dtype}: {r.verdict}"
    ce = r.counterexample
    if expected is None:
        assert ce.first_fails_at > 64, ce
    else:
        assert ce.first_fails_at == expected, ce
    assert ce.shape["n_seq"] == ce.first_fails_at  # the saved problem is the cut one
    assert {"finding": "length threshold", "first_fails_at": ce.first_fails_at}.items() <= r.diagnosis[-1].items()
    if rw.name in DROPS_KEY:
        drop = r.diagnosis[0]
        assert drop["finding"] == "drops a key" and drop["position"][-1] == ce.first_fails_at - 1, r.diagnosis
        assert DROPS_KEY[rw.name] in (None, drop["key"]), drop
    else:
        assert len(r.diagnosis) == 1, r.diagnosis
    assert ce.examples_to_find is not None


def test_every_length_mutant_has_a_stated_threshold():
    from rewrites.registry import builtin

    assert {rw.name for rw in builtin() if rw.family == "length_mutant"} == set(FIRST_FAILS_AT)


def test_a_backend_that_compiles_per_shape_searches_a_handful_of_shapes_and_still_finds_length_faults(tmp_path):
    """JAX compiles a rewrite once per shape and dtype, so `verify` draws its problems from
    a fixed menu (inputs.FEW_SHORT, FEW_LONG) instead of ~30 shapes a search: a correct
    rewrite and the oracle it is compared with bit for bit compile no more programs each
    than the menus hold shapes (drawn freely, these 32 examples compiled 44 programs), and
    a length fault is still found by the search alone, at its exact first failing length."""
    from oracles import backends
    from rewrites.registry import builtin
    from rewrites.verify import Config, Verifier, inputs

    compiling = [b for b in backends.available() if backends.get(b).compiles]
    if not compiling:
        pytest.skip("no installed backend compiles per shape")
    config = Config(examples=16, dtypes=("float64",), explicit_examples=False, invariance=False, report_dir=tmp_path)
    catalogue = {rw.name: rw for rw in builtin()}
    menus = len(inputs.FEW_SHORT) + len(inputs.FEW_LONG)
    for name in compiling:
        be = backends.get(name)
        before = be.compilations()
        (r,) = Verifier(config).hypothesis_results(catalogue["batched_heads"], name)
        assert r.verdict in (Verdict.BITWISE, Verdict.EQUIVALENT) and r.examples > menus, r
        assert be.compilations() - before <= 2 * menus
        (r,) = Verifier(config).hypothesis_results(catalogue["tiles_64_tail_dropped"], name)
        assert r.verdict is Verdict.INEQUIVALENT and r.counterexample.first_fails_at == 65, r
        be.release()
