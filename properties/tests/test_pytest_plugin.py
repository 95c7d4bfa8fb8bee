"""pytest where the rewrite lives: in a fresh folder with a plugin package installed,
`pytest --attention-rewrites` passes a correct rewrite's cases and fails a wrong one's
with the verdict and its counterexample; `assert_rewrite` does the same from Python."""

from __future__ import annotations

import pytest

from properties.tests.test_plugins import fake_distribution, install_core_plugins
from rewrites.pytest_plugin import RewriteClaimFailed, assert_rewrite


@pytest.fixture
def plugin_site(tmp_path):
    """A site folder holding the README's core-level plugin and the same kernel without its mask."""
    install_core_plugins(tmp_path / "site")
    return tmp_path / "site"


def test_pytest_attention_rewrites_in_a_plugin_authors_folder(pytester, plugin_site, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))
    result = pytester.runpytest_subprocess(
        "--attention-rewrites", "--backend", "numpy", "--examples", "5", "--no-gpt2", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2, failed=2)  # 2 rewrites x float64, float32; no built-ins
    out = result.stdout.str()
    failed = {line.split()[1].lstrip(":") for line in out.splitlines() if line.startswith("FAILED")}
    assert failed == {"my_core_no_mask[numpy-float64]", "my_core_no_mask[numpy-float32]"}
    assert "claimed equivalent, verdict inequivalent" in out
    assert "replay: attention-rewrites replay" in out and "smallest counterexample:" in out


CRASHES = """
import os

from rewrites import rewrite


@rewrite(family="crash_test", claim="equivalent")
def exits_its_process(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    \"\"\"os._exit(1): no exception, no clean-up, as a native crash leaves it.\"\"\"
    os._exit(1)
"""


def test_a_plugin_rewrite_that_kills_its_process_fails_its_tests_not_the_session(pytester, plugin_site, monkeypatch):
    """Each rewrite runs in `verify`'s worker pool: a rewrite that ends its process fails
    its own tests with how it ended, and the session goes on to judge the others."""
    fake_distribution(plugin_site, "crashes", {"exits_its_process": "crashes_plugin:exits_its_process"},
                      {"crashes_plugin.py": CRASHES})  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))
    result = pytester.runpytest_subprocess(
        "--attention-rewrites", "--backend", "numpy", "--examples", "5", "--no-gpt2", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2, failed=4)  # my_core_attention passes; no mask and the crash fail
    out = result.stdout.str()
    failed = {line.split()[1].lstrip(":") for line in out.splitlines() if line.startswith("FAILED")}
    assert {"exits_its_process[numpy-float64]", "exits_its_process[numpy-float32]"} <= failed, failed
    assert "claimed equivalent, verdict error" in out and "exit status 1" in out


def test_pytest_without_the_flag_collects_no_rewrites(pytester, plugin_site, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def _core(masked: bool):
    """A core-level kernel fn(q, k, v), causal or not."""
    import math

    from rewrites.common import array_namespace, causal

    def fn(q, k, v):
        xp = array_namespace(q)
        z = q @ xp.matrix_transpose(k) / math.sqrt(q.shape[-1])
        if masked:
            z = xp.where(causal(xp, q.shape[-2], k.shape[-2]), z, -math.inf)
        e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
        return (e / xp.sum(e, axis=-1, keepdims=True)) @ v

    fn.__name__ = "causal_core" if masked else "core_without_mask"  # the rewrite's name
    return fn


def test_assert_rewrite_from_python(tmp_path):
    results = assert_rewrite(_core(masked=True), level="core", examples=5, report_dir=tmp_path, real_layers=False)
    assert results and all(r.claim_holds for r in results)
    with pytest.raises(RewriteClaimFailed, match="claimed equivalent, verdict inequivalent"):
        assert_rewrite(_core(masked=False), level="core", examples=5, report_dir=tmp_path, real_layers=False)
