"""The verdict engine: one measured verdict per rewrite x backend x dtype x input source.

One job per module, in the order a verdict is made:

- `verdicts`: the vocabulary (Verdict, Inputs, Counterexample, Result) and the claim rule;
- `execute`: running a rewrite on one problem, its inputs guarded and its output checked;
- `judge`: an output against the float64 truth's bound and the backend's oracle bits;
- `record`: a search's typed record and the failure test of one example;
- `search`: the search for a failing problem (Hypothesis, or a sweep of the real layers);
- `cut`: a failure cut to its exact first failing length, then diagnosed;
- `diagnose`: what a failure is, from `probes` (its behaviour) and `precision` (a scale
  factor, or the right formula at a lower precision: `imprecise`);
- `decide`: the decision procedure, from searches to a verdict per dtype (its doc says the rule);
- `counterexamples`: saving failures as replayable files and reading them back;
- `engine`: the Verifier that puts these together for a catalogue;
- `workers`: the same in worker processes (`pool` the parent's side, `serve` a worker's).
"""

from rewrites.verify.counterexamples import load_counterexample
from rewrites.verify.engine import Config, Throughput, Verifier
from rewrites.verify.execute import RewriteFailed, run_rewrite
from rewrites.verify.search import without_local_constants
from rewrites.verify.verdicts import CLAIM_DTYPES, CLAIMS, LEGEND, Counterexample, Inputs, Result, Verdict

__all__ = [
    "CLAIMS",
    "CLAIM_DTYPES",
    "LEGEND",
    "Config",
    "Counterexample",
    "Inputs",
    "Result",
    "RewriteFailed",
    "Throughput",
    "Verdict",
    "Verifier",
    "load_counterexample",
    "run_rewrite",
    "without_local_constants",
]
