"""Where PyTorch and JAX compute (`--device`): the CPU by default, a GPU where one is
present. Without a GPU the GPU cases skip with the reason; a CUDA-only kernel is skipped
on the CPU with its reason, never judged `error` there."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of

from oracles import backends
from oracles.problem import AttentionProblem
from rewrites import cli
from rewrites.registry import catalogue
from rewrites.verify import Config, Verdict, Verifier
from rewrites.verify.inputs import QUICK


@pytest.fixture
def on_cuda():
    """This process on cuda for the test, back on the CPU after it."""
    backends.use_device("cuda")
    try:
        yield
    finally:
        backends.use_device("cpu")


def _cuda_reason() -> str | None:
    backends.use_device("cuda")
    try:
        reasons = [backends.unavailable_reason(n) for n in ("torch", "jax")]
    finally:
        backends.use_device("cpu")
    return None if None in reasons else "; ".join(r for r in reasons if r)


def test_an_unknown_device_is_refused_in_one_line(capsys):
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose from cpu, cuda"):
        backends.use_device("tpu")
    assert cli.main(["verify", "--device", "tpu"]) == cli.USAGE
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.usefixtures("on_cuda")
def test_numpy_has_no_device_but_the_cpu():
    assert backends.unavailable_reason("numpy") == "numpy computes on the CPU only, not on cuda"
    assert "numpy" not in backends.available()


def test_the_default_device_is_the_cpu_for_every_backend():
    assert backends.device() == "cpu"
    for name in backends.available():
        be = backends.get(name)
        a = be.asarray(np.ones((2, 3)), "float32")
        assert be.device == "cpu" and "cpu" in str(device_of(a)).lower()
        assert be.to_numpy(a).dtype == np.float64


def test_a_backend_without_the_device_says_why():
    why = _cuda_reason()
    if why is None:
        pytest.skip("this machine has a cuda device")
    installed = [n for n in ("torch", "jax") if n in backends.available()]
    if not installed:
        pytest.skip("neither PyTorch nor JAX is installed")
    backends.use_device("cuda")
    try:
        for name in installed:
            reason = backends.unavailable_reason(name)
            assert reason is not None and "cuda" in reason and "\n" not in reason
            with pytest.raises(backends.BackendUnavailable, match="cuda"):
                backends.get(name)
    finally:
        backends.use_device("cpu")
    assert backends.get("numpy").device == "cpu"  # and back on the CPU, everything loads again


def test_a_cuda_only_kernel_is_skipped_on_the_cpu_with_its_reason(tmp_path, capsys):
    if "torch" not in backends.available():
        pytest.skip(backends.unavailable_reason("torch"))
    (kernel,) = catalogue(names=["torch_sdpa_efficient"])
    assert kernel.devices == ("cuda",)
    assert not kernel.runs_on("torch")
    assert kernel.unavailable() == "torch_sdpa_efficient runs on cuda only, not cpu"
    (everywhere,) = catalogue(names=["torch_sdpa_math"])
    assert everywhere.unavailable() is None and everywhere.runs_on("torch")
    argv = ["verify", "--rewrite", "torch_sdpa_efficient", "--backend", "torch", "--report", str(tmp_path / "r")]
    assert cli.main([*argv, "--no-gpt2", "--examples", "1"]) == cli.OK
    assert "skipping torch_sdpa_efficient runs on cuda only, not cpu" in capsys.readouterr().err


def test_a_rewrite_that_names_no_device_is_refused():
    (rw,) = catalogue(names=["batched_heads"])
    with pytest.raises(ValueError, match="devices"):
        type(rw)(**{**rw.__dict__, "devices": ()})
    with pytest.raises(ValueError, match="devices"):
        type(rw)(**{**rw.__dict__, "devices": ("gpu",)})


def test_verdicts_on_cuda_are_taken_there(tmp_path):
    """On a GPU, a rewrite's inputs, its own arrays and the oracle it is held against are
    on the GPU, and a correct rewrite holds its claim there."""
    why = _cuda_reason()
    if why is not None:
        pytest.skip(f"no cuda device: {why}")
    backends.use_device("cuda")
    try:
        names = [n for n in ("torch", "jax") if backends.unavailable_reason(n) is None]
        for name in names:
            be = backends.get(name)
            assert be.device == "cuda" and "cuda" in str(device_of(be.asarray(np.ones(2), "float32")))
        (rw,) = catalogue(names=["batched_heads"])
        config = Config(
            examples=5,
            report_dir=tmp_path,
            dtypes=("float64", "float32"),
            device="cuda",
            profile=QUICK,
            invariance=False,
        )
        v = Verifier(config)
        results = v.verify_one(rw, names, gpt2_inputs=False)
        assert results and all(r.verdict in (Verdict.BITWISE, Verdict.EQUIVALENT) for r in results), results
        rng = np.random.default_rng(0)
        p = AttentionProblem(
            rng.normal(size=(3, 8)), *(rng.normal(size=s) for s in ((8, 24), (24,), (8, 8), (8,))), n_head=2
        )
        for name in names:
            assert np.isfinite(v.refs.oracle(p, name, "float32")).all()
    finally:
        backends.use_device("cpu")


def test_a_plugin_declares_a_kernel_that_exists_on_cuda_only():
    from rewrites import rewrite

    @rewrite(family="core", claim="equivalent", level="core", backend="torch", devices=("cuda",))
    def cuda_kernel(q, k, v):
        """A kernel that exists on CUDA only."""
        return q

    assert cuda_kernel.devices == ("cuda",) and not cuda_kernel.runs_on("torch")
    assert cuda_kernel.unavailable() == "cuda_kernel runs on cuda only, not cpu"


def test_a_counterexample_found_on_a_gpu_says_so_and_replays_there(tmp_path, monkeypatch, capsys):
    """Found on cuda (the device pretended, so this runs on any machine): the file records it,
    the replay command names it, and a replay on the CPU says where it was found."""
    from rewrites.verify import counterexamples

    monkeypatch.setattr(counterexamples, "device", lambda: "cuda")
    (rw,) = catalogue(names=["no_causal_mask"])
    v = Verifier(Config(examples=3, report_dir=tmp_path, dtypes=("float64",), profile=QUICK, invariance=False))
    (result,) = v.verify_one(rw, ["numpy"], gpt2_inputs=False)
    ce = result.counterexample
    assert result.verdict is Verdict.INEQUIVALENT and ce.replay.endswith(" --device cuda")
    assert str(np.load(ce.file)["device"]) == "cuda"
    monkeypatch.undo()
    assert cli.main(["replay", ce.file]) == 1
    assert "found on cuda, replayed on cpu (--device)" in capsys.readouterr().err


def test_a_rewrite_whose_library_is_absent_is_skipped_with_the_reason():
    (hf,) = catalogue(names=["hf_gpt2_eager"])
    assert hf.requires == "transformers"
    absent = type(hf)(**{**hf.__dict__, "requires": "no_such_library_of_attention"})
    assert not absent.runs_on("torch")
    assert absent.unavailable() == "hf_gpt2_eager needs no_such_library_of_attention, which is not installed"
