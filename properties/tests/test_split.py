"""A run of few tasks splits each into its verdicts and its invariances (workers.split), so
that two workers end together; what it reports is what the whole tasks report: the same
verdicts, each with its dtype's invariances (workers.merged), and where a part ends
without its share, the other's stands and says why."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from oracles import numpy_oracle
from rewrites import cli
from rewrites.registry import Rewrite, catalogue
from rewrites.verify import Config, Verifier, inputs, workers
from rewrites.verify.invariance import NAMES, Invariance
from rewrites.verify.pool import Done, Part, Task, error_results
from rewrites.verify.serve import _work
from rewrites.verify.verdicts import Inputs, Result, Verdict

REWRITE = next(rw for rw in catalogue(include_plugins=False) if rw.name == "batched_heads")
TASKS = [Task(REWRITE, b) for b in ("numpy", "jax", "torch")]
SPLIT_BELOW = workers.SPLIT_BELOW


@pytest.mark.parametrize(
    "work, jobs, invariance, parts",
    [
        (TASKS, 2, True, 6),  # one rewrite, three backends, two workers: split
        (TASKS[:1], 2, True, 2),  # one task, two workers: its verdicts beside its invariances
        (TASKS * 2, 2, True, 6),  # two tasks a worker: whole
        (TASKS, 1, True, 3),  # one worker: nothing to balance
        (TASKS, 2, False, 3),  # no invariances to measure apart
    ],
)
def test_only_a_run_of_fewer_tasks_than_two_a_worker_is_split(work, jobs, invariance, parts):
    got = workers.split(work, jobs, Config(invariance=invariance))
    assert len(got) == parts
    if parts == len(work):
        assert got == list(work)
    else:  # every task's verdicts first, in order, then its invariances
        half = len(work)
        assert [t.part for t in got] == [Part.VERDICTS] * half + [Part.INVARIANCES] * half
        assert [t.backend for t in got[:half]] == [t.backend for t in work]
        assert sorted(t.backend for t in got[half:]) == sorted(t.backend for t in work)


def _result(dtype: str) -> Result:
    return Result(rewrite=REWRITE.name, family=REWRITE.family, backend="numpy", dtype=dtype, inputs=Inputs.HYPOTHESIS,
                  claim=REWRITE.claim, verdict=Verdict.EQUIVALENT, max_abs_error=0.0, max_error_over_bound=0.1,
                  examples=3)  # fmt: skip


MEASURED = {
    "float64": dataclasses.asdict(Invariance(True, False, True, {"prefix": "synthetic: the first 100 rows differ"})),
    "float32": dataclasses.asdict(Invariance(True, True, True)),
}
SEEN = "nondeterministic: two calls on the same input differ by 0.001 (synthetic)"


def _parts(**verdicts_too) -> tuple[Done, Done]:
    verdicts = Done(Task(REWRITE, "numpy", Part.VERDICTS), [_result("float64"), _result("float32")], seconds=2.0,
                    **verdicts_too)  # fmt: skip
    measured = Done(Task(REWRITE, "numpy", Part.INVARIANCES), [], invariances=MEASURED, seconds=1.0, compilations=3)
    return verdicts, measured


def test_merged_parts_are_each_verdict_with_its_dtype_s_invariances():
    done = workers.merged(*_parts())
    assert done.task == Task(REWRITE, "numpy") and done.task.part is Part.ALL
    assert [r.invariance for r in done.results] == [MEASURED["float64"], MEASURED["float32"]]
    assert (done.seconds, done.compilations, done.failure, done.internal) == (3.0, 3, None, None)


def test_a_dtype_the_searches_saw_nondeterministic_says_so_as_measured_after_them():
    done = workers.merged(*_parts(nondeterministic={"float32": SEEN}))
    f64, f32 = (r.invariance for r in done.results)
    assert f64 == MEASURED["float64"]  # the other dtype keeps what was measured
    assert (f32["batch"], f32["prefix"], f32["deterministic"]) == (None, None, False)
    unmeasured = f"not measured: {SEEN}"
    assert f32["witness"] == {"deterministic": SEEN, "batch": unmeasured, "prefix": unmeasured}


def test_invariances_lost_with_their_worker_say_why_and_the_verdicts_stand():
    verdicts, measured = _parts()
    lost = dataclasses.replace(measured, invariances={}, failure="timeout after 5 s")
    done = workers.merged(verdicts, lost)
    assert [r.verdict for r in done.results] == [Verdict.EQUIVALENT] * 2 and done.failure is None
    for r in done.results:
        assert (r.invariance["batch"], r.invariance["prefix"], r.invariance["deterministic"]) == (None, None, None)
        assert r.invariance["witness"] == dict.fromkeys(NAMES, "not measured: timeout after 5 s")
    broken = dataclasses.replace(measured, invariances={}, internal="Traceback ...\nKeyError: 'x'\n")
    done = workers.merged(verdicts, broken)
    assert done.internal == broken.internal  # the run reports the verifier's failure
    assert done.results[0].invariance["witness"]["batch"] == "not measured: the verifier failed: KeyError: 'x'"


def test_verdicts_lost_with_their_worker_are_error_rows_as_a_whole_task_s_are():
    verdicts, measured = _parts()
    rows = error_results(verdicts.task, Config(dtypes=("float64",)), False, "killed by SIGKILL")
    done = workers.merged(dataclasses.replace(verdicts, results=rows, failure="killed by SIGKILL"), measured)
    assert done.results == rows and done.failure == "killed by SIGKILL"
    assert all(r.invariance is None for r in done.results)


def flickers(x, *weights):
    """Right on every other call, 10% off on the others: nondeterministic, and seen so by
    the searches (a failing output is run again)."""
    flickers.calls += 1
    return numpy_oracle.attention(x, *weights) * (1.0 + 0.1 * (flickers.calls % 2))


flickers.calls = 0


@pytest.mark.parametrize("fn, seen", [(flickers, {"float64", "float32"}), (numpy_oracle.attention, set())])
def test_a_verdicts_part_says_where_its_searches_saw_the_rewrite_nondeterministic(tmp_path, fn, seen):
    rw = Rewrite(f"split_{fn.__name__}", "test", "test", fn)
    config = Config(examples=2, report_dir=tmp_path, dtypes=("float64", "float32"), profile=inputs.QUICK)
    kind, results, _, _, parts = _work(Verifier(config), rw, "numpy", Part.VERDICTS, False)
    assert kind == "done" and results and all(r.invariance is None for r in results)
    assert set(parts["nondeterministic"]) == seen, parts
    assert all(m.startswith("nondeterministic: two calls") for m in parts["nondeterministic"].values())
    kind, results, _, _, parts = _work(Verifier(config), rw, "numpy", Part.INVARIANCES, False)
    assert kind == "done" and results == [] and set(parts["invariances"]) == {"float64", "float32"}


def test_a_plugin_that_did_not_load_has_no_invariances_split_or_whole(tmp_path):
    broken = Rewrite("split_broken", "test", "test", None, source="plugin broken", load_error="ImportError: no x")
    verifier = Verifier(Config(examples=2, report_dir=tmp_path, dtypes=("float64",), profile=inputs.QUICK))
    whole = verifier.verify_one(broken, ["numpy"], gpt2_inputs=False)
    assert [r.verdict for r in whole] == [Verdict.ERROR] and whole[0].invariance is None
    _, results, *_, parts = _work(verifier, broken, "numpy", Part.VERDICTS, False)
    _, _, *_, measured = _work(verifier, broken, "numpy", Part.INVARIANCES, False)
    assert measured == {"invariances": {}}
    verdicts = Done(Task(broken, "numpy", Part.VERDICTS), results, **parts)
    done = workers.merged(verdicts, Done(Task(broken, "numpy", Part.INVARIANCES), [], **measured))
    assert done.results == whole


def _verify(folder: Path, monkeypatch, split_below: int) -> list[dict]:
    monkeypatch.setattr(workers, "SPLIT_BELOW", split_below)
    argv = ["verify", "--rewrite", REWRITE.name, "--backend", "numpy", "--dtype", "float64", "--no-gpt2",
            "--examples", "2", "--jobs", "2", "--report", str(folder)]  # fmt: skip
    assert cli.main(argv) == cli.OK
    rows = json.loads((folder / "verdicts.json").read_text())["results"]
    return [{k: r[k] for k in ("backend", "dtype", "inputs", "verdict", "max_abs_error", "invariance")} for r in rows]


def test_a_split_run_reports_what_the_whole_task_reports(tmp_path, monkeypatch):
    """One task on two workers (split: verdicts beside invariances) against the same task
    whole: the same rows, invariances and their witnesses included (`batched_heads` on
    NumPy in float64 is prefix-variant: a witness to carry over)."""
    whole = _verify(tmp_path / "whole", monkeypatch, 0)
    split = _verify(tmp_path / "split", monkeypatch, SPLIT_BELOW)
    assert whole and all(r["invariance"] and r["invariance"]["witness"] for r in whole), whole
    assert split == whole


class _Interrupted:
    """A pool whose run gives these Dones, then is interrupted (Ctrl-C) while waiting."""

    def __init__(self, dones: list[Done]) -> None:
        self.dones, self.closed = dones, False

    def run(self, queue, jobs):
        yield from self.dones
        raise KeyboardInterrupt

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("first", [Part.VERDICTS, Part.INVARIANCES])
def test_an_interrupted_split_run_keeps_the_verdicts_that_finished(monkeypatch, first):
    """Ctrl-C while a split task's other part runs: its finished verdicts are reported, their
    invariances saying why they are missing; invariances alone have no rows to report."""
    verdicts, measured = _parts()
    on_torch = [dataclasses.replace(d, task=dataclasses.replace(d.task, backend="torch")) for d in (verdicts, measured)]
    pool = _Interrupted([*on_torch, verdicts if first is Part.VERDICTS else measured])
    monkeypatch.setattr(workers, "Pool", lambda *a: pool)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for done in workers.stream(Config(), [TASKS[0], TASKS[2]], False, 2):
            got.append(done)
    assert pool.closed and got[0].task == Task(REWRITE, "torch")  # both its parts done: merged as ever
    assert [r.invariance for r in got[0].results] == [MEASURED["float64"], MEASURED["float32"]]
    if first is Part.INVARIANCES:
        assert got[1:] == []
        return
    (kept,) = got[1:]
    assert kept.task == Task(REWRITE, "numpy") and kept.results and kept.failure is None
    assert [r.verdict for r in kept.results] == [r.verdict for r in verdicts.results]
    for r in kept.results:
        assert r.invariance["witness"] == dict.fromkeys(NAMES, f"not measured: {workers.INTERRUPTED}")


@pytest.mark.parametrize("held", [Part.VERDICTS, Part.INVARIANCES])
def test_a_ctrl_c_in_the_consumer_keeps_the_verdicts_the_stream_held(monkeypatch, held):
    """Ctrl-C while the caller writes a Done down, not while the stream waits: the split
    task whose verdicts the stream held is still reported (`workers.held`), with its
    invariances saying why they are missing; a held invariances part alone gives nothing."""
    verdicts, measured = _parts()
    on_torch = [dataclasses.replace(d, task=dataclasses.replace(d.task, backend="torch")) for d in (verdicts, measured)]
    pool = _Interrupted([on_torch[0], verdicts if held is Part.VERDICTS else measured, on_torch[1]])
    monkeypatch.setattr(workers, "Pool", lambda *a: pool)
    jobs = workers.stream(Config(), [TASKS[0], TASKS[2]], False, 2)
    assert next(jobs).task == Task(REWRITE, "torch")  # both its parts done; Ctrl-C lands now, in the caller
    kept = workers.held(jobs)
    assert pool.closed and workers.held(jobs) == []  # closed: nothing twice
    if held is Part.INVARIANCES:
        assert kept == []
        return
    (done,) = kept
    assert done.task == Task(REWRITE, "numpy")
    assert [r.verdict for r in done.results] == [r.verdict for r in verdicts.results]
    for r in done.results:
        assert r.invariance["witness"] == dict.fromkeys(NAMES, f"not measured: {workers.INTERRUPTED}")
