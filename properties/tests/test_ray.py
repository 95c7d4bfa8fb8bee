"""`verify --executor ray` (rewrites/verify/on_ray.py) on a local Ray instance of 2 CPUs
started here: the same verdicts as the local pool (`--jobs 2`) for built-ins, a mutant and
rewrites that crash their worker; a unit whose actor is lost (a node going down) is run
again by Ray; each misuse is one line and exit status 2."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from oracles import gpt2
from properties.tests.test_gpt2_weights import META, tiny_tensors
from properties.tests.test_hostile import ROOT, comparable, report_results, verify_args
from properties.tests.test_plugins import fake_distribution
from rewrites import cli

ray = pytest.importorskip("ray")

DIST = "ray-test-plugin"
PLUGIN = '''
import os, signal

from rewrites import rewrite
from rewrites.common import heads_qkv, logits, project_out, softmax


def attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)


@rewrite(family="ray_test", claim="equivalent")
def crashes(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """os._exit(1) in the worker."""
    os._exit(1)


@rewrite(family="ray_test", claim="equivalent")
def kills_its_actor_once(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Right, but the first call kills the worker's parent (the Ray actor: its node lost)."""
    marker = os.environ.get("RAY_TEST_MARKER")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getppid(), signal.SIGKILL)
    return attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
'''
REWRITES = ["batched_heads", "mask_off_by_one", "crashes"]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """The plugin installed, then a local Ray instance of 2 CPUs that inherits it, its
    actors' temporary folders in a folder of their own (Ray's own stay where they were)."""
    site = tmp_path_factory.mktemp("site")
    eps = {n: f"ray_test_plugin:{n}" for n in ("crashes", "kills_its_actor_once")}
    fake_distribution(site, DIST, eps, {"ray_test_plugin.py": PLUGIN})
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
        mp.setenv("RAY_TEST_MARKER", str(site / "killed-once"))
        mp.setenv("RAY_TMPDIR", tempfile.gettempdir())
        mp.setenv("TMPDIR", str(site / "tmp"))
        (site / "tmp").mkdir()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            yield site
        finally:
            ray.shutdown()
            sys.modules.pop("ray_test_plugin", None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """test_hostile's tiny GPT-2 (2 layers, n_ctx 8)."""
    return gpt2.write(tmp_path_factory.mktemp("w") / "tiny.safetensors", tiny_tensors(), META)


def names(*rewrites: str) -> list[str]:
    return [a for n in rewrites for a in ("--rewrite", n)]


def test_ray_gives_the_pool_s_verdicts_and_isolates_a_crash(local_ray, weights, tmp_path):
    pool, on_ray = tmp_path / "pool", tmp_path / "ray"
    base = names(*REWRITES)
    before = set((local_ray / "tmp").iterdir())
    assert cli.main(_args(pool, weights, *base, "--jobs", "2")) == 1  # `crashes` contradicts its claim
    assert cli.main(_args(on_ray, weights, *base, "--executor", "ray")) == 1
    meta, results = report_results(on_ray)
    assert meta["executor"] == "ray" and "partial" not in meta
    want = sorted(json.dumps(comparable(r)) for r in report_results(pool)[1])
    assert sorted(json.dumps(comparable(r)) for r in results) == want
    crashed = [r for r in results if r.rewrite == "crashes"]
    assert crashed and all(r.verdict == "error" and "exit status 1" in r.counterexample.message for r in crashed)
    # the mutant's counterexamples came back into this report, and its replay names them
    found = [r.counterexample for r in results if r.rewrite == "mask_off_by_one"]
    assert found and all(Path(c.file).parent == on_ray / "counterexamples" and Path(c.file).is_file() for c in found)
    assert all(c.replay.endswith(c.file) for c in found)
    for c in found:
        assert Path(c.file).read_bytes() == (pool / "counterexamples" / Path(c.file).name).read_bytes()
    assert set((local_ray / "tmp").iterdir()) == before  # the actors removed their folders


def test_a_unit_whose_actor_is_lost_is_run_again(local_ray, weights, tmp_path):
    marker = local_ray / "killed-once"
    assert not marker.exists()
    assert cli.main(_args(tmp_path, weights, *names("kills_its_actor_once"), "--executor", "ray")) == 0
    assert marker.exists()  # the first try killed its actor; Ray's retry gave these verdicts
    _, results = report_results(tmp_path)
    assert results and all(r.verdict in ("bitwise", "equivalent") for r in results), results


def test_address_without_ray_is_one_line_and_exit_2(local_ray, weights, tmp_path, capsys):
    assert cli.main(_args(tmp_path, weights, *names("batched_heads"), "--address", "localhost:6379")) == 2
    assert capsys.readouterr().err.strip().endswith("argument --address: only with --executor ray")


def test_an_address_where_nothing_answers_is_one_line_and_exit_2(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever ran before
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        args = _args(tmp_path, weights, *names("batched_heads"), "--executor", "ray", "--address", address)
        assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("skipping")]
    assert len(err) == 1 and f"nothing answers at {address}" in err[0], err


def test_without_ray_installed_it_says_so(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is absent
    assert cli.main(_args(tmp_path, weights, *names("batched_heads"), "--executor", "ray")) == 2
    assert "pip install 'attention-rewrites[ray]'" in capsys.readouterr().err


# No rewrite here hangs, so the limit only has to stay out of the way. test_hostile's 20 s
# did not: in CI (2 cores, the other xdist worker busy) a restarted actor's fresh worker
# spent over 20 s importing PyTorch and running its first torch task.
TIMEOUT = 300


def _args(report: Path, weights: Path, *extra: str) -> list[str]:
    """test_hostile's verify arguments without its built-ins (these tests name their own)
    and with a limit that no legitimate task here comes near."""
    args = verify_args(report, weights)
    keep = [a for i, a in enumerate(args) if a != "--rewrite" and (i == 0 or args[i - 1] != "--rewrite")]
    at = keep.index("--timeout")
    keep[at + 1] = str(TIMEOUT)
    return keep + list(extra)
