"""The GPT-2 loader: real values, both file layouts, and one clear line for every bad file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from oracles import gpt2
from oracles.gpt2 import WeightsError

TINY = gpt2.GPT2Config(n_layer=2, n_head=2, n_embd=4, n_ctx=8)


def tiny_tensors(c: gpt2.GPT2Config = TINY, complete: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    names = dict(gpt2._required(c))
    if complete:
        names |= {k: (v if v[0] != -1 else (50, c.n_embd)) for k, v in gpt2._mlp_names(c).items()}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in names.items()}


META = {"n_layer": "2", "n_head": "2", "n_embd": "4", "n_ctx": "8", "layer_norm_epsilon": "1e-5"}


def test_real_weights_spot_values(gpt2_weights):
    """The values the shared README quotes."""
    c = gpt2_weights.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_ctx, c.eps) == (12, 12, 768, 1024, 1e-5)
    np.testing.assert_allclose(gpt2_weights["h.0.attn.c_attn.weight"][0, :3], [-0.47385, -0.26137, -0.09780], atol=1e-5)
    np.testing.assert_allclose(gpt2_weights["h.0.attn.c_attn.bias"][:3], [0.48034, -0.52543, -0.42926], atol=1e-5)
    np.testing.assert_allclose(gpt2_weights["wpe.weight"][0, :3], [-0.01882, -0.19742, 0.00403], atol=1e-5)
    assert not gpt2_weights.is_complete
    assert len(gpt2_weights.layers()) == 12


def test_complete_checkpoint_with_transformer_prefix(tmp_path):
    tensors = tiny_tensors(complete=True)
    path = gpt2.write(tmp_path / "model.safetensors", {f"transformer.{k}": v for k, v in tensors.items()}, META)
    w = gpt2.read(tmp_path)  # a folder is searched for model.safetensors
    assert w.path == path and w.is_complete
    assert w.config == TINY
    np.testing.assert_array_equal(w.layer(1).c_attn_w, tensors["h.1.attn.c_attn.weight"])


def test_metadata_config_and_float16_bfloat16_decoding(tmp_path):
    tensors = {k: v.astype(np.float16) for k, v in tiny_tensors().items()}
    w = gpt2.read(gpt2.write(tmp_path / "w.safetensors", tensors, META))
    assert w.config == TINY
    np.testing.assert_array_equal(w["wpe.weight"], tensors["wpe.weight"])


def test_locate_prefers_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(gpt2.ENV_VAR, str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(WeightsError, match=r"nowhere\.safetensors: GPT-2 weights file does not exist"):
        gpt2.load()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _corrupt(tmp_path, mutate) -> str:
    tensors = tiny_tensors()
    mutate(tensors)
    path = gpt2.write(tmp_path / "bad.safetensors", tensors, META)
    return str(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError) as e:
        gpt2.read(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in _one_line(e) and "does not exist" in str(e.value)


@pytest.mark.parametrize("keep", [0, 5, 200, -10], ids=["empty", "in-length", "in-header", "in-data"])
def test_truncated_file(tmp_path, keep):
    good = gpt2.write(tmp_path / "good.safetensors", tiny_tensors(), META).read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good[: keep if keep >= 0 else len(good) + keep])
    with pytest.raises(WeightsError) as e:
        gpt2.read(bad)
    assert "truncated.safetensors" in _one_line(e) and "truncated" in str(e.value)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"hello")
    with pytest.raises(WeightsError, match=r"notes\.safetensors: not a safetensors file"):
        gpt2.read(bad)


def test_wrong_shape(tmp_path):
    path = _corrupt(tmp_path, lambda t: t.update({"h.1.attn.c_proj.weight": np.zeros((4, 3), np.float32)}))
    with pytest.raises(WeightsError) as e:
        gpt2.read(path)
    assert _one_line(e) == f"{path}: tensor 'h.1.attn.c_proj.weight' has shape [4, 3], expected [4, 4]"


def test_missing_tensor(tmp_path):
    path = _corrupt(tmp_path, lambda t: t.pop("h.0.ln_1.bias"))
    with pytest.raises(WeightsError) as e:
        gpt2.read(path)
    assert _one_line(e).startswith(f"{path}: missing tensor 'h.0.ln_1.bias'")


def test_wrong_dtype(tmp_path):
    path = tmp_path / "ints.safetensors"
    gpt2.write(path, tiny_tensors(), META)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["h.0.attn.c_attn.bias"]["dtype"] = "I32"
    new = json.dumps(header).encode().ljust(n)
    path.write_bytes(raw[:8] + new + raw[8 + n :])
    with pytest.raises(WeightsError) as e:
        gpt2.read(path)
    assert "'h.0.attn.c_attn.bias' has dtype I32" in _one_line(e) and str(path) in str(e.value)


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    from rewrites.cli import main

    path = _corrupt(tmp_path, lambda t: t.pop("wpe.weight"))
    assert main(["oracles", "--gpt2-weights", path, "--n-seq", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: missing tensor 'wpe.weight' (14 tensors found; is this GPT-2?)"
