"""A verification run that no rewrite can break and that loses nothing.

A package of hostile plugins (built here, as `pip install` would leave it) runs in one
`verify` beside correct built-ins and mutants, with `--jobs 1` and `--jobs 2`: every
hostile rewrite gets its one-line `error` verdict, every other verdict is exactly what it
is without the package, and the report is complete. An interrupted run keeps its
verdicts; each bad argument or file is one line and exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oracles import backends, gpt2
from properties.tests.test_gpt2_weights import META, tiny_tensors
from properties.tests.test_plugins import fake_distribution
from rewrites import cli, registry
from rewrites.report import JSONL, read_jsonl
from rewrites.verify import Result
from rewrites.verify.pool import THREADS

ROOT = Path(__file__).resolve().parents[2]
DIST = "hostile-plugin"
EVIL = '''
import ctypes, os, sys, time

import numpy as np

from rewrites import Rewrite, rewrite
from rewrites.common import heads_qkv, logits, project_out, softmax


def attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)
    return project_out(xp, softmax(xp, logits(xp, q, k)) @ v, c_proj_w, c_proj_b)


def hostile(fn):
    return rewrite(family="hostile", claim="equivalent")(fn)


@hostile
def zeroes_x(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """The right answer, then x[...] = 0."""
    out = attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    x[...] = 0
    return out


@hostile
def doubles_c_attn_w(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """The right answer, then c_attn_w *= 2."""
    out = attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    c_attn_w *= 2
    return out


@hostile
def in_place_mul(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """The right answer, then the backend's in-place multiply: torch mul_, NumPy out=."""
    out = attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    if hasattr(c_proj_b, "mul_"):
        c_proj_b.mul_(2)
    else:
        np.multiply(c_proj_b, 2, out=c_proj_b)
    return out


@hostile
def hangs(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Never returns."""
    time.sleep(10**6)


@hostile
def exits_3(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """sys.exit(3)."""
    sys.exit(3)


@hostile
def os_exit_1(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Says why on stderr, as a library's abort does (then a stack frame), and os._exit(1):
    no clean-up, no exception."""
    print("HOSTILE LAST WORDS: Check failed: x != y", file=sys.stderr)
    print("*** Check failure stack trace: ***\\n    @ 0x0 f()", file=sys.stderr)
    os._exit(1)


@hostile
def segfaults(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Reads address 0."""
    return ctypes.string_at(0)


@hostile
def numpy_for_torch(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Returns a NumPy array whatever the inputs (right for NumPy)."""
    return np.asarray(attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head))


CALLS = [0]


@hostile
def noisy(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """The right answer, plus 1e-3 on every fourth call."""
    CALLS[0] += 1
    out = attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)
    return out + 1e-3 if CALLS[0] % 4 == 0 else out


@hostile
def raises_keyboard_interrupt(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Raises KeyboardInterrupt: the rewrite's, not the user's Ctrl-C."""
    raise KeyboardInterrupt


@hostile
def torch_for_numpy(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Computes NumPy inputs in PyTorch and returns its tensor (right for PyTorch)."""
    import torch

    if isinstance(x, np.ndarray):
        args = [torch.from_numpy(np.array(a)) for a in (x, c_attn_w, c_attn_b, c_proj_w, c_proj_b)]
        return attention(*args, n_head)
    return attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)


@hostile
def prints_to_stdout(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Right, but prints into the tables' stream."""
    print("HOSTILE STDOUT", flush=True)
    return attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head)


def wrong(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    return attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head) * 2


batched_heads = Rewrite("batched_heads", "Takes a built-in's name.", "hostile", wrong, claim="equivalent")
twins = [
    Rewrite("twin", "The first of two of one name, right.", "hostile", attention, claim="equivalent"),
    Rewrite("twin", "The second, wrong.", "hostile", wrong, claim="equivalent"),
]
path_name = Rewrite("../../escaped", "A name that is a path.", "hostile", wrong, claim="equivalent")
'''
HOSTILE = [
    "zeroes_x", "doubles_c_attn_w", "in_place_mul", "hangs", "exits_3", "os_exit_1", "segfaults",
    "numpy_for_torch", "noisy", "raises_keyboard_interrupt", "torch_for_numpy", "prints_to_stdout",
    "batched_heads", "twins", "path_name",
]  # fmt: skip
#: What each hostile rewrite's `error` says, per backend; None: it is right on that backend.
EXPECTED = {
    "zeroes_x": "modified its input x",
    "doubles_c_attn_w": "modified its input c_attn_w",
    "in_place_mul": "modified its input c_proj_b",
    "hangs": "timeout after",
    "exits_3": "called sys.exit(3)",
    "os_exit_1": "exit status 1; its last words: HOSTILE LAST WORDS: Check failed: x != y",
    "segfaults": "killed by SIGSEGV",
    "numpy_for_torch": {"numpy": None, "torch": "returned a numpy.ndarray for torch inputs"},
    "noisy": "nondeterministic: two calls on the same input differ by 0.001",
    "raises_keyboard_interrupt": "raised KeyboardInterrupt",
    "torch_for_numpy": {
        "numpy": "returned a torch.Tensor for numpy inputs" if "torch" in backends.available() else "raised",
        "torch": None,
    },
    "prints_to_stdout": None,
    f"{DIST}:batched_heads": "name 'batched_heads' is already taken by built-in",
    "twin": None,
    f"{DIST}:twin": f"name 'twin' is already taken by plugin {DIST} (the same plugin)",
    f"{DIST}:.._.._escaped": "name '../../escaped' is not a valid rewrite name",
    "exits_on_import": "failed to load: SystemExit: 4",
}
BUILT_INS = ["batched_heads", "log_sum_exp", "mask_off_by_one", "no_max_subtraction"]
BACKENDS = [b for b in ("numpy", "torch") if b in backends.available()]
#: Seconds a task may take: `hangs` waits this long per backend. Each legitimate task here
#: took a few, until `verify`'s explicit examples gained a 4097-token problem (2026-12-08):
#: in a fresh worker its first run faults in about a GB, and `log_sum_exp` on PyTorch passed
#: 20 s in CI's clean clone on this VM.
TIMEOUT = 60


def install_hostile(site: Path) -> None:
    eps = {name: f"hostile_plugin.evil:{name}" for name in HOSTILE}
    fake_distribution(
        site,
        DIST,
        {**eps, "exits_on_import": "hostile_plugin.exits:anything"},
        {
            "hostile_plugin/__init__.py": "",
            "hostile_plugin/evil.py": EVIL,
            "hostile_plugin/exits.py": "import sys\nsys.exit(4)\n",
        },
    )


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    """The hostile package on sys.path (and PYTHONPATH, for subprocesses) for this module."""
    site = tmp_path_factory.mktemp("site")
    install_hostile(site)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
        yield site
    for mod in [m for m in sys.modules if m.startswith("hostile_plugin")]:
        del sys.modules[mod]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with n_ctx 8: real-layer inputs (shared, cached problems) in seconds."""
    return gpt2.write(tmp_path_factory.mktemp("w") / "tiny.safetensors", tiny_tensors(), META)


def verify_args(report: Path, weights: Path, *extra: str) -> list[str]:
    args = ["verify", "--report", str(report), "--examples", "5", "--gpt2-weights", str(weights)]
    args += ["--gpt2-n-seq", "8", "--dtype", "float64", "--dtype", "float32", "--timeout", str(TIMEOUT)]
    args += ["--no-invariance"]  # seconds a unit at GPT-2's width; test_invariance.py checks them through the CLI
    for b in BACKENDS:
        args += ["--backend", b]
    for name in BUILT_INS:
        args += ["--rewrite", name]
    return args + list(extra)


def comparable(r) -> dict:
    """A result without the paths that name its report folder, and without its timing."""
    d = r.to_json()
    d.pop("seconds")
    if d["counterexample"]:
        d["counterexample"] = {k: v for k, v in d["counterexample"].items() if k not in ("file", "replay")}
    return d


def report_results(folder: Path) -> tuple[dict, list]:
    data = json.loads((folder / "verdicts.json").read_text())
    return data["meta"], [Result.from_json(d) for d in data["results"]]


@pytest.fixture(scope="module")
def baseline(tiny_weights, tmp_path_factory):
    """The built-ins' verdicts with no plugin installed."""
    folder = tmp_path_factory.mktemp("baseline")
    assert cli.main(verify_args(folder, tiny_weights, "--no-plugins", "--jobs", "2")) in (0, 1)
    return report_results(folder)[1]


def hostile_names() -> list[str]:
    return [n for n in registry.catalogue() if n.source == f"plugin {DIST}"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_hostile_plugins_cannot_break_the_run(hostile_site, tiny_weights, baseline, tmp_path, capfd, jobs):
    names = [r.name for r in hostile_names()]
    assert set(names) == set(EXPECTED), set(names) ^ set(EXPECTED)
    extra = [a for n in names for a in ("--rewrite", n)]
    start = time.perf_counter()
    code = cli.main(verify_args(tmp_path, tiny_weights, "--jobs", str(jobs), *extra))
    seconds = time.perf_counter() - start
    out, err = capfd.readouterr()
    assert code == 1, err  # the hostile ones claimed `equivalent` and are errors
    meta, results = report_results(tmp_path)
    assert "partial" not in meta
    # complete: every rewrite x backend x dtype x input source, in the report and the stream
    dtypes = {b: [d for d in ("float64", "float32") if d in backends.get(b).dtypes] for b in BACKENDS}
    sources = ("hypothesis", "gpt2")
    want = {(n, b, d, i) for n in BUILT_INS + names for b in BACKENDS for d in dtypes[b] for i in sources}
    assert {(r.rewrite, r.backend, r.dtype, r.inputs) for r in results} == want
    assert len(results) == len(want)
    assert sorted(map(json.dumps, map(comparable, read_jsonl(tmp_path / JSONL)))) == sorted(
        map(json.dumps, map(comparable, results))
    )
    # every other verdict exactly as without the package
    by = {(r.rewrite, r.backend, r.dtype, r.inputs): r for r in results}
    for r in baseline:
        assert comparable(by[(r.rewrite, r.backend, r.dtype, r.inputs)]) == comparable(r), r.rewrite
    # every hostile rewrite its one-line error where it misbehaves, its real verdict where it does not
    for r in results:
        if r.source != f"plugin {DIST}":
            continue
        expected = EXPECTED[r.rewrite]
        expected = expected.get(r.backend) if isinstance(expected, dict) else expected
        if expected is None:
            assert r.verdict in ("bitwise", "equivalent"), (r.rewrite, r.backend, r.verdict, r.counterexample)
        else:
            assert r.verdict == "error", (r.rewrite, r.backend, r.verdict)
            message = r.counterexample.message
            assert expected in message and "\n" not in message, (r.rewrite, r.backend, message)
    assert "HOSTILE STDOUT" not in out  # the tables' stream is the tables'
    assert "HOSTILE STDOUT" in err and "HOSTILE LAST WORDS" in err  # a worker's output is copied, not lost
    assert "Traceback" not in err
    assert not (tmp_path.parent / "escaped").exists() and not list(tmp_path.parent.parent.glob("escaped*"))
    print(f"--jobs {jobs}: {seconds:.0f} s")


THREADS_PLUGIN = """
import os

from rewrites import rewrite


@rewrite(family="threads_test", claim="equivalent")
def tells_its_threads(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    \"\"\"Raises with the worker's BLAS and OpenMP thread settings as its message.\"\"\"
    raise RuntimeError(" ".join(os.environ.get(v, "unset") for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")))
"""


@pytest.mark.parametrize("user", [None, "3"])
def test_each_worker_computes_on_one_thread_unless_the_user_says(user, tiny_weights, tmp_path, monkeypatch):
    """One BLAS and OpenMP thread a worker (unset, each would start one per core, and a
    bitwise verdict would depend on the machine); the user's own setting wins; the
    parent's environment is left as it was."""
    fake_distribution(tmp_path, "threads-plugin", {"tells_its_threads": "threads_plugin:tells_its_threads"},
                      {"threads_plugin.py": THREADS_PLUGIN})  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    for var in THREADS:
        monkeypatch.delenv(var, raising=False) if user is None else monkeypatch.setenv(var, user)
    before = dict(os.environ)
    args = ["verify", "--report", str(tmp_path / "r"), "--examples", "2", "--no-gpt2", "--no-invariance",
            "--dtype", "float64", "--backend", "numpy", "--backend", BACKENDS[-1], "--jobs", "2"]  # fmt: skip
    try:
        assert cli.main([*args, "--rewrite", "tells_its_threads", "--rewrite", "batched_heads"]) == 1
    finally:
        sys.modules.pop("threads_plugin", None)
    messages = {r.counterexample.message for r in report_results(tmp_path / "r")[1] if r.rewrite == "tells_its_threads"}
    want = "1 1" if user is None else "3 3"
    assert messages and all(m.endswith(f"RuntimeError: {want}") for m in messages), messages
    assert dict(os.environ) == before


# --- an interrupted or killed run keeps its verdicts ----------------------------------------


def start_run(report: Path, weights: Path) -> subprocess.Popen:
    """`verify` in its own session (as a terminal's foreground job): two quick rewrites, then
    one that hangs, so the run is mid-task when it is interrupted."""
    args = [sys.executable, "-m", "rewrites", "verify", "--report", str(report), "--examples", "3", "--jobs", "1"]
    args += ["--backend", "numpy", "--dtype", "float64", "--gpt2-weights", str(weights), "--gpt2-n-seq", "8"]
    args += ["--rewrite", "batched_heads", "--rewrite", "log_sum_exp", "--rewrite", "hangs", "--timeout", "600"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip


def _default_sigint() -> None:
    """A terminal's job takes Ctrl-C; a pytest-xdist worker ignores SIGINT, and an ignored
    signal stays ignored across exec (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_verdicts(report: Path, proc: subprocess.Popen, n: int, limit: float = 300) -> None:
    """Until the run's verdicts.jsonl holds `n` verdicts."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if (report / JSONL).exists() and len(read_jsonl(report / JSONL)) >= n:
            return
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {n} verdicts in time: {proc.communicate()}")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def gone(pid: int, limit: float = 20) -> bool:
    """The process has exited (a zombie that nobody reaps counts as gone)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc for the worker processes")
def test_ctrl_c_keeps_every_verdict_and_says_so_in_one_line(hostile_site, tiny_weights, tmp_path):
    proc = start_run(tmp_path, tiny_weights)
    wait_for_verdicts(tmp_path, proc, 4)  # two rewrites x (hypothesis, gpt2); `hangs` is running
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.INTERRUPTED, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: 2 of 3 rewrite x backend runs done")
    kept = read_jsonl(tmp_path / JSONL)
    assert {(r.rewrite, r.inputs) for r in kept} == {
        (n, i) for n in ("batched_heads", "log_sum_exp") for i in ("hypothesis", "gpt2")
    }
    meta, results = report_results(tmp_path)
    assert meta["partial"].startswith("interrupted, 2 of 3") and len(results) == len(kept)
    assert "PARTIAL REPORT" in (tmp_path / "verdicts.md").read_text()
    assert workers and all(gone(w) for w in workers)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc for the worker processes")
def test_a_killed_run_keeps_every_verdict_and_its_workers_go(hostile_site, tiny_weights, tmp_path):
    proc = start_run(tmp_path, tiny_weights)
    wait_for_verdicts(tmp_path, proc, 4)
    workers = children(proc.pid)
    proc.kill()  # SIGKILL: no clean-up at all
    proc.communicate(timeout=60)
    assert {r.rewrite for r in read_jsonl(tmp_path / JSONL)} == {"batched_heads", "log_sum_exp"}
    meta, _ = report_results(tmp_path)
    assert meta["partial"].startswith("running, 2 of 3")  # the report on disk says it is partial
    assert workers and all(gone(w) for w in workers)  # orphaned workers notice and exit


# --- bad arguments and files: one line, exit status 2, before any work ----------------------


@pytest.fixture
def bad_inputs(tmp_path, tiny_weights) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("not a counterexample\n")
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    bare = tmp_path / "bare.npz"
    rng = np.random.default_rng(0)
    from oracles.problem import AttentionProblem

    AttentionProblem(rng.normal(size=(2, 4)), rng.normal(size=(4, 12)), rng.normal(size=12),
                     rng.normal(size=(4, 4)), rng.normal(size=4), 2).save(bare)  # fmt: skip
    (tmp_path / "folder").mkdir()
    return {"text": text, "npy": npy, "bare": bare, "folder": tmp_path / "folder", "weights": tiny_weights}


BAD = {
    "examples 0": (["verify", "--examples", "0"], "--examples"),
    "examples -1": (["verify", "--examples", "-1"], "--examples"),
    "examples many": (["verify", "--examples", "many"], "--examples"),
    "jobs 0": (["verify", "--jobs", "0"], "--jobs"),
    "timeout 0": (["verify", "--timeout", "0"], "--timeout"),
    "timeout nan": (["verify", "--timeout", "nan"], "--timeout"),
    "gpt2-n-seq 0": (["verify", "--gpt2-n-seq", "0"], "--gpt2-n-seq"),
    "gpt2-n-seq past the context": (["verify", "--gpt2-weights", "{weights}", "--gpt2-n-seq", "9"], "--gpt2-n-seq"),
    "missing weights": (["verify", "--gpt2-weights", "{tmp}/none.safetensors"], "--gpt2-weights"),
    "weights that are text": (["verify", "--gpt2-weights", "{text}"], "--gpt2-weights"),
    "report is a file": (["verify", "--report", "{text}"], "--report"),
    "report under a file": (["verify", "--report", "{text}/sub"], "--report"),
    "unknown rewrite": (["verify", "--rewrite", "no_such_rewrite"], "no_such_rewrite"),
    "unknown backend": (["verify", "--backend", "cuda"], "--backend"),
    "no such dtype": (["verify", "--backend", "numpy", "--dtype", "bfloat16"], "--dtype"),
    "oracles n-seq 0": (["oracles", "--n-seq", "0"], "--n-seq"),
    "replay missing": (["replay", "{tmp}/nothing.npz"], "no such file"),
    "replay folder": (["replay", "{folder}"], "is a folder"),
    "replay text": (["replay", "{text}"], "is not a counterexample file"),
    "replay npy": (["replay", "{npy}"], "is not a counterexample file"),
    "replay without metadata": (["replay", "{bare}"], "records no rewrite, backend, dtype"),
    "no command": ([], "command"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_argument_or_file_is_one_line_and_exit_2(case, bad_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(gpt2.ENV_VAR, raising=False)
    argv, named = BAD[case]
    places = {k: str(v) for k, v in bad_inputs.items()} | {"tmp": str(tmp_path)}
    argv = [a.format(**places) for a in argv]
    if argv[:1] == ["verify"] and "--report" not in argv:
        argv += ["--report", str(tmp_path / "report")]
    assert cli.main(argv) == cli.USAGE
    out, err = capsys.readouterr()
    assert out == "" and len(said(err)) == 1 and named in err, err
    assert not (tmp_path / "report" / JSONL).exists()  # no work was done


def test_weights_named_by_the_environment_must_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(gpt2.ENV_VAR, str(tmp_path / "gone.safetensors"))
    assert cli.main(["verify", "--report", str(tmp_path / "r")]) == cli.USAGE
    err = capsys.readouterr().err
    assert len(said(err)) == 1 and "gone.safetensors" in err


def said(err: str) -> list[str]:
    """stderr's lines but the notes on backends that are not installed (tox -e numpy)."""
    return [line for line in err.strip().splitlines() if not line.startswith("skipping ")]


# --- a fresh machine without weights; the tool's own failure ---------------------------------


def test_without_weights_the_rest_runs_and_one_line_says_what_did_not(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(gpt2.ENV_VAR, raising=False)
    nowhere = tmp_path / "nowhere" / "gpt2"
    monkeypatch.setattr(gpt2, "candidates", lambda: [nowhere, nowhere])
    with pytest.raises(gpt2.WeightsError) as e:
        gpt2.locate()
    assert str(e.value).count(str(nowhere)) == 1  # each place named once
    argv = ["verify", "--report", str(tmp_path / "r"), "--backend", "numpy", "--rewrite", "batched_heads"]
    assert cli.main([*argv, "--examples", "3", "--dtype", "float64", "--jobs", "1"]) == cli.OK
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "not run" in line]
    assert len(said) == 1 and "GPT-2 weights not found" in said[0] and "--gpt2-weights" in said[0], err
    assert err.index(said[0]) < err.index("verifying 1 rewrites"), err  # before the work, not after it
    meta, results = report_results(tmp_path / "r")
    assert meta["gpt2_layers"].startswith("not run: GPT-2 weights not found")
    assert {r.inputs for r in results} == {"hypothesis"}
    assert "Real GPT-2 layer verdicts: not run" in (tmp_path / "r" / "verdicts.md").read_text()


def test_a_failure_of_the_tool_itself_is_exit_3_with_a_partial_report(tmp_path, capsys, monkeypatch):
    from rewrites.verify import workers

    def broken(*args, **kwargs):
        raise RuntimeError("the pool is broken")

    monkeypatch.setattr(workers, "stream", broken)
    argv = ["verify", "--report", str(tmp_path), "--backend", "numpy", "--rewrite", "batched_heads", "--no-gpt2"]
    assert cli.main(argv) == cli.FAILED
    assert "the pool is broken" in capsys.readouterr().err
    meta, _ = report_results(tmp_path)
    assert meta["partial"].startswith("stopped by a failure of this tool")


def test_list_ends_quietly_when_its_reader_stops_and_speaks_json():
    """`attention-rewrites list | head -1` exits 0 with no traceback; `list --json` parses."""
    import fcntl

    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the table: the writer must block
    proc = subprocess.Popen([sys.executable, "-m", "rewrites", "list", "--no-plugins"], cwd=ROOT,
                            stdout=write, stderr=subprocess.PIPE)  # fmt: skip
    os.close(write)
    assert os.read(read, 10)  # the reader takes the start, then goes away
    os.close(read)
    err = proc.stderr.read().decode()
    assert proc.wait(60) == cli.OK and "Traceback" not in err and "BrokenPipe" not in err, err
    out = subprocess.run([sys.executable, "-m", "rewrites", "list", "--json", "--no-plugins"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["batched_heads"]["backends"] == "all" and entries["torch_sdpa_math"]["backends"] == ["torch"]
    assert entries["jax_dot_product_attention"]["level"] == "core"
