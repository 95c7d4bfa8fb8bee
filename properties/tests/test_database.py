"""Counterexamples are never forgotten: what one run finds is saved in an example database
and tried first by the next (rewrites/verify/database.py), while an empty database leaves
the run exactly as it was and a fixed rewrite with stale entries gets the full search."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewrites import cli
from rewrites.registry import catalogue
from rewrites.verify import Config, Verdict, Verifier
from rewrites.verify.inputs import QUICK

ROOT = Path(__file__).resolve().parents[2]
MUTANT = "value_bias_dropped"  # found by the generated search, not at its first example

#: One run in its own process: the float64 and float32 verdicts of NAME on NumPy.
RUN = """
import json, sys
from pathlib import Path
from rewrites.registry import catalogue
from rewrites.verify import Config, Verifier
from rewrites.verify.inputs import QUICK
db, report, name = sys.argv[1:]
(rw,) = catalogue(names=[name])
config = Config(examples=30, report_dir=Path(report), dtypes=("float64",), profile=QUICK,
                explicit_examples=False, database=db, invariance=False)
for r in Verifier(config).verify_one(rw, ["numpy"], gpt2_inputs=False):
    ce = r.counterexample
    print(json.dumps({"verdict": r.verdict, "examples": r.examples, "to_find": ce and ce.examples_to_find}))
"""


def _run(db: Path, report: Path, name: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(db), str(report), name], cwd=ROOT, capture_output=True, text=True, check=True
    )
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    return json.loads(line)


def _config(tmp_path: Path, database: str | None) -> Config:
    return Config(examples=30, report_dir=tmp_path / "report", dtypes=("float64",), profile=QUICK,
                  explicit_examples=False, database=database, invariance=False)  # fmt: skip


def test_a_counterexample_saved_by_one_process_is_found_first_by_the_next(tmp_path):
    db = tmp_path / "examples"
    first = _run(db, tmp_path / "r1", MUTANT)
    assert first["verdict"] == "inequivalent" and first["to_find"] > 1
    assert any(db.rglob("*")), "the failing example was not saved"
    second = _run(db, tmp_path / "r2", MUTANT)
    assert second["verdict"] == "inequivalent" and second["to_find"] == 1


def test_an_empty_database_gives_the_same_verdicts_as_none(tmp_path):
    rewrites = catalogue(names=[MUTANT, "batched_heads", "mask_off_by_one"])
    strip = lambda rs: [dataclasses.replace(r, seconds=None, counterexample=None) for r in rs]
    without = [r for rw in rewrites for r in Verifier(_config(tmp_path / "a", None)).verify_one(rw, ["numpy"], False)]
    empty = str(tmp_path / "empty")
    with_db = [r for rw in rewrites for r in Verifier(_config(tmp_path / "b", empty)).verify_one(rw, ["numpy"], False)]
    assert strip(without) == strip(with_db)
    shapes = lambda rs: [r.counterexample and (r.counterexample.shape, r.counterexample.examples_to_find) for r in rs]
    assert shapes(without) == shapes(with_db)


def test_a_fixed_rewrite_with_stale_entries_still_gets_the_full_search(tmp_path):
    db = tmp_path / "examples"
    assert _run(db, tmp_path / "r1", MUTANT)["verdict"] == "inequivalent"
    (mutant,) = catalogue(names=[MUTANT])
    (correct,) = catalogue(names=["batched_heads"])
    fixed = dataclasses.replace(mutant, fn=correct.fn, claim=Verdict.EQUIVALENT)  # same name, same entries' key
    (clean,) = Verifier(_config(tmp_path / "a", None)).verify_one(fixed, ["numpy"], gpt2_inputs=False)
    (stale,) = Verifier(_config(tmp_path / "b", str(db))).verify_one(fixed, ["numpy"], gpt2_inputs=False)
    assert clean.verdict.holds_equivalence and stale.verdict == clean.verdict
    assert stale.examples > clean.examples  # the stale entries replayed, and every generated example besides
    (again,) = Verifier(_config(tmp_path / "c", str(db))).verify_one(fixed, ["numpy"], gpt2_inputs=False)
    assert again.examples == clean.examples  # dropped: nothing is replayed any more


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--database", "{file}"], "is a file, not a folder"),
        (["--database", "no_such_module_of_ours:db"], "cannot load db from no_such_module_of_ours"),
        (["--database", "json:dumps"], "is not a Hypothesis ExampleDatabase"),
        (["--explore"], "--explore: needs --budget"),
        (["--explore", "--budget", "1m", "--database", "none"], "needs a database to feed"),
        (["--budget", "1m"], "--budget: only with --explore"),
        (["--explore", "--budget", "soon"], "is not a duration"),
    ],
)
def test_bad_database_and_exploration_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "f").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "f")) for a in argv]
    base = ["verify", "--rewrite", MUTANT, "--backend", "numpy", "--report", str(tmp_path / "r")]
    assert cli.main([*base, *argv]) == cli.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_verify_keeps_its_examples_beside_the_report_and_explores_with_new_seeds(tmp_path, capsys):
    base = ["verify", "--rewrite", MUTANT, "--backend", "numpy", "--no-gpt2", "--examples", "2", "--dtype", "float64"]
    assert cli.main([*base, "--report", str(tmp_path / "off"), "--database", "none"]) == cli.OK
    assert not (tmp_path / "off" / "examples").exists()
    assert cli.main([*base, "--report", str(tmp_path / "r"), "--explore", "--seed", "7", "--budget", "1s"]) == cli.OK
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "r" / "verdicts.json").read_text())["meta"]  # the last round's
    assert "exploring with seed 7" in err and f"explored seeds 7 to {meta['seed']}" in err  # 1 s: one round or more
    assert meta["database"] == str(tmp_path / "r" / "examples")
