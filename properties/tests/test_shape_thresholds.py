"""Faults past a head count, a head_dim, a batch size or the searches' longest length: the
thresholds of kernels that choose a path by shape (16, 32 or 64 heads, head_dim above 128,
16, 32 or 64 batch items) and of 4096-token windows (Mistral's). `verify` tries shapes past
each before its searches (inputs.known_hard: 65 heads, head_dim 256, a batch of 5 x 13
items, 4097 tokens; its searches draw 33 heads, head_dim 128, 3 x 11 items and 2049 tokens
at most), so such a fault is found whatever the search draws; before, with 12 heads,
head_dim 128, 15 items and 2049 tokens at most, each of these was `equivalent` on NumPy in
float64 and float32. Both sides: the right formula stays unflagged, on those shapes too."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rewrites.common import causal, heads_qkv, logits, project_out, softmax
from rewrites.registry import rewrite
from rewrites.verify import Config, Verdict, Verifier, inputs


def shape_faulted(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, heads=None, factor=None, batch=None,
                  window=None):  # fmt: skip
    """Attention, wrong past the given head count, head_dim, batch size or window (None: never)."""
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    z = logits(xp, q, k)  # [..., H, n, n]
    if window is not None:  # query i sees keys i - window + 1 .. i, as sliding_window_300 does
        n = z.shape[-1]
        z = xp.where(causal(xp, n, n, offset=-window), -math.inf, z)
    if heads is not None and n_head >= heads:  # the last head attends with head 0's logits
        z = xp.concat([z[..., : n_head - 1, :, :], z[..., :1, :, :]], axis=-3)
    if factor is not None and q.shape[-1] > factor:  # scaled by 1/sqrt(factor) (a head_dim cap)
        z = z * math.sqrt(q.shape[-1] / factor)
    o = softmax(xp, z) @ v  # [..., H, n, hd]
    if batch is not None and math.prod(o.shape[:-3]) >= batch:  # the last item gets the first's output
        flat = np.reshape(np.asarray(o), (-1, *o.shape[-3:])).copy()
        flat[-1] = flat[0]
        o = xp.asarray(np.reshape(flat, o.shape))
    return project_out(xp, o, c_proj_w, c_proj_b)


FAULTS = {
    "from_16_heads": (dict(heads=16), lambda s: s["n_head"] >= 16),
    "from_32_heads": (dict(heads=32), lambda s: s["n_head"] >= 32),
    "from_64_heads": (dict(heads=64), lambda s: s["n_head"] >= 64),
    "past_head_dim_128": (dict(factor=128), lambda s: s["head_dim"] > 128),
    "from_16_items": (dict(batch=16), lambda s: math.prod(s["batch"]) >= 16),
    "from_32_items": (dict(batch=32), lambda s: math.prod(s["batch"]) >= 32),
    "from_64_items": (dict(batch=64), lambda s: math.prod(s["batch"]) >= 64),
    "window_4096": (dict(window=4096), lambda s: s["n_seq"] > 4096),
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    """name, fault -> its float64 and float32 Results on NumPy: `verify`'s explicit examples,
    then pytest's quick searches."""
    quick = dataclasses.replace(inputs.QUICK, explicit_up_to=None)  # `verify`'s explicit examples, all of them
    config = Config(examples=4, report_dir=tmp_path_factory.mktemp("report"), dtypes=("float64", "float32"),
                    profile=quick, invariance=False)  # fmt: skip
    verifier = Verifier(config)

    def run(name: str, **fault):
        fn = lambda *a: shape_faulted(*a, **fault)
        fn.__name__ = name
        rw = rewrite(family="test", claim="equivalent", name=name)(fn)
        return verifier.verify_one(rw, ["numpy"], gpt2_inputs=False)

    return run


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_past_a_shape_threshold_is_found(verdicts, name):
    fault, crosses = FAULTS[name]
    for r in verdicts(name, **fault):
        assert r.verdict is Verdict.INEQUIVALENT, r
        assert crosses(r.counterexample.shape), r.counterexample.shape
        if "window" in fault:  # the exact first failing length, cut from the explicit example
            assert r.counterexample.first_fails_at == fault["window"] + 1 == inputs.LONGEST_KNOWN_HARD


def test_the_right_formula_is_not_flagged_on_those_shapes(verdicts):
    assert {r.verdict for r in verdicts("right")} <= {Verdict.BITWISE, Verdict.EQUIVALENT}
