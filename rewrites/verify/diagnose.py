"""What is wrong with a failure, said as findings (dicts with a "finding" and a "text"),
each listed only when its check fires (probes.py holds the checks):

- a formula failure (`explain`, after the cut): a future leak, mixed batch items or heads,
  (padded or packed problems) a row attending padding or another document, or NaN,
  rows not summing to 1, a missing or extra bias, a token not seeing itself, a wrong last
  row, a key dropped or read from another position, split-KV chunks combined without their
  maxima, a length threshold, attention at another scale, or else the right formula at a
  lower precision (`imprecise`, precision.py), or "no known fault";
- an `unstable` failure (`instability`): an overflow from a logit magnitude, a future
  that leaks back in at large logits, or an underflow of the rewrite's own at tiny ones.
Failures of more than 64 tokens only get the cheap probes (a shrunk counterexample has few).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from oracles.problem import AttentionProblem
from oracles.reference import truth_for
from rewrites.verify import probes
from rewrites.verify.execute import RewriteFailed, output_rows, reach, run_rewrite
from rewrites.verify.precision import describe_factor, evidence_problem, scale_factor, scaled
from rewrites.verify.record import Search, Stage

_MAX_POSITIONS = 64  # positions perturbed one at a time (a shrunk counterexample has few)
#: Tokens, at least, of the evidence for `imprecise` on the failure's own batch and heads
#: (precision.evidence_problem): a wrong head map from 16 heads, on 33 heads of 1, was 0.94
#: times float16's bound over 8 tokens (one head of 33 wrong: a small part of each output),
#: 6.0 times over 16 and 5.2 times over 32.
OWN_EVIDENCE_SEQ = 32


def explain(s: Search) -> None:
    """What the cut failure is: s.findings, s.scale, s.precision, the message."""
    run, out = s.kept[-1]  # the cut failure as it ran, and its output: no second run
    if s.stage is Stage.DTYPE:
        s.findings = instability(s.rewrite, s.backend, s.dtype, run, out)
        s.message += "".join(f"; {f['text']}" for f in s.findings)
        return
    s.findings = findings(s.rewrite, s.backend, s.dtype, run, out)
    rows = output_rows(s.rewrite)  # a padded problem's failure starts at its first real row: no threshold
    threshold = length_threshold(s.first_fails_at, run, out, s.backend, s.dtype, rows) if run.segments is None else []
    if threshold and threshold[0]["earlier_rows_pass"]:  # a formula's threshold: a window, a tile, a cache
        s.findings, threshold = s.findings + threshold, []
    if not s.findings and s.precision is not None:
        for p, o in s.kept:  # evidence for `imprecise`: the failures kept (precision.Precision)
            s.precision.add(o, p, s.backend, rows)
        if s.precision.effective:  # and dense problems where a formula error cannot pass for rounding
            own = evidence_problem(run.x.shape[:-2], max(run.n_seq, OWN_EVIDENCE_SEQ), run.n_head, run.head_dim)
            for evidence, informative in ((evidence_problem(), True), (own, False)):  # own: its heads' faults show
                dense = reach(s.rewrite, s.backend, s.dtype, s.rewrite.takes(evidence))
                try:
                    dense_out = run_rewrite(s.rewrite, s.backend, s.dtype, dense)
                except RewriteFailed:
                    dense_out = np.full(dense.x.shape, np.nan)  # no output: no evidence of a precision
                s.precision.confirm(dense_out, dense, s.backend, rows, informative)
                if not s.precision.alive:  # every candidate ruled out: the next problem cannot change that
                    break
    # A real layer's failure is fitted only when it might otherwise be called imprecise:
    # the synthetic search's small shrunk failures name the factor (and cost milliseconds).
    if s.layer is None or (s.precision is not None and s.precision.effective):
        fit = scale_factor(s.kept, s.backend, s.dtype, rows)
        if fit is not None:
            s.scale, on = fit
            c = describe_factor(s.scale)
            text = f"it is attention with the logits scaled by {c} (n_head={on.n_head}, head_dim={on.head_dim})"
            s.findings.append({"finding": "scale", "factor": s.scale, "text": text})
    if threshold and not s.effective_precision:  # the whole output goes wrong at a length: a formula's too
        s.findings += threshold
    if not s.findings and s.effective_precision:
        s.message += f"; within the {s.effective_precision} bound on every failing example"
    elif not s.findings:
        undecided = s.precision.undecided if s.precision is not None else None
        s.findings = [undecided or unexplained(run)]
    s.message += "".join(f"; {f['text']}" for f in s.findings)


def findings(rw: Any, backend: str, dtype: str, problem: AttentionProblem, base: np.ndarray) -> list[dict]:
    """What is wrong with a formula failure, each finding checked on `problem` (`base` is the
    rewrite's output on it, already computed), listed only when its check fires:
    - the output is a known wrong formula within the bound: a bias dropped, a token not
      seeing itself; for a last-row rewrite, another position's row or query;
    - re-running the rewrite with one input changed: a key ahead changing a row (it leaks the
      future, and how far), one batch item changing another, one head's values reaching
      another head's columns, rows of attention weights not summing to 1;
    - batch items wrong inside the batch and right alone, and the smallest batch that fails;
    - else the first wrong row attends without one of its keys or reads another position's
      key in one's place (at any length), or its key chunks were combined without their maxima.
    A rewrite that fails on these runs is not probed further; past _MAX_POSITIONS tokens only
    the first wrong row's dropped key is tried."""
    if problem.segments is not None:  # padded or packed: which row attends what (one row each: any length)
        return probes.layout_fault(problem, truth_for(problem, backend, dtype), dtype, base)
    if problem.n_seq > _MAX_POSITIONS:  # too long to perturb position by position; one row's keys are cheap
        full = rw.output == "full"
        return probes.wrong_keys(problem, truth_for(problem, backend, dtype), dtype, base) if full else []
    truth = truth_for(problem, backend, dtype)
    if rw.output != "full":
        return probes.wrong_last_row(problem, truth, dtype, base)
    found = probes.known_variant(problem, truth, dtype, base)
    try:
        found += probes.future_leak(rw, backend, dtype, problem)
        found += probes.batch_mixing(rw, backend, dtype, problem)
        found += probes.batch_items(rw, backend, dtype, problem, base)
        found += probes.heads_mixed(rw, backend, dtype, problem)
        if not found:
            found += probes.rows_do_not_sum_to_one(rw, backend, dtype, problem)
    except RewriteFailed:
        pass
    if not found:  # which keys the first wrong row attends, or how its key chunks were combined
        found += probes.wrong_keys(problem, truth, dtype, base) or probes.split_without_maxima(
            problem, truth, dtype, base
        )
    return found


def instability(rw: Any, backend: str, dtype: str, problem: AttentionProblem, out: np.ndarray) -> list[dict]:
    """What an `unstable` failure (extreme inputs in `dtype`) is: an overflow (the first
    non-finite row), a future that leaks back in (a finite mask swamped), each with the
    logit magnitude it takes, or an underflow of the rewrite's own (probes.underflow)."""
    bad = ~np.isfinite(out).reshape(-1, out.shape[-1]).all(axis=-1)
    try:
        if bad.any():
            row = int(np.flatnonzero(bad)[0] % out.shape[-2])
            start = _overflow_starts(rw, backend, dtype, problem)
            text = f"overflow or 0/0: a non-finite output from row {row}, from |logits| of about {start:.3g} on"
            return [{"finding": "non-finite", "row": row, "logits": start, "text": text}]
        probed = rw.output == "full" and problem.n_seq <= _MAX_POSITIONS  # the leak probe perturbs each position
        leak = probes.future_leak(rw, backend, dtype, problem) if probed else []
        if not leak:
            return probes.underflow(rw, backend, dtype, problem)
    except RewriteFailed:
        return []
    mag = _logits(problem, backend, dtype)
    for f in leak:
        f["logits"], f["text"] = mag, f"{f['text']}, at logits of about {mag:.0e}"
    return leak


def _logits(problem: AttentionProblem, backend: str, dtype: str) -> float:
    """The largest |logit| of `problem` as `backend` rounds it to `dtype`."""
    z = truth_for(problem, backend, dtype).z
    return float(np.abs(z[np.isfinite(z)]).max(initial=0.0))


def _overflow_starts(rw: Any, backend: str, dtype: str, problem: AttentionProblem, steps: int = 24) -> float:
    """The largest |logit| at which the output turns non-finite (exp overflowing, or every
    exp of a row underflowing to 0/0): the logits scaled by c <= 1
    (q scaled), bisected over log2 c in [-32, 0] to 2^-19 (a relative 1e-6)."""
    finite = lambda log2c: bool(np.isfinite(run_rewrite(rw, backend, dtype, scaled(problem, 2.0**log2c))).all())
    lo, hi = -32.0, 0.0  # lo: finite (tiny logits), hi: not
    if not finite(lo):
        return 2.0**lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if finite(mid) else (lo, mid)
    return _logits(scaled(problem, 2.0**hi), backend, dtype)


def unexplained(problem: AttentionProblem) -> dict:
    """A formula failure that no check explains: said so, rather than naming a wrong fault."""
    if problem.n_seq > _MAX_POSITIONS:
        n, most = problem.n_seq, _MAX_POSITIONS
        text = f"no known fault in its first wrong row's keys; it has {n} tokens, the other probes stop at {most}"
    else:
        text = (
            "no single known fault (a scale, a mask, a bias, heads, batch items, row sums, keys, precision) explains it"
        )
    return {"finding": "no known fault", "text": text}


#: A failure whose shorter prefixes all pass, first failing past this many tokens, has a
#: length threshold. Arithmetic at a lower precision fails at any length (a float32 softmax
#: on float64 inputs from 2 tokens on), so such a failure is never `imprecise`.
LENGTH_THRESHOLD = 16


def length_threshold(
    first_fails_at: int | None, problem: AttentionProblem, out: np.ndarray, backend: str, dtype: str, rows: tuple
) -> list[dict]:
    """The finding of a failure that starts at an exact length beyond LENGTH_THRESHOLD, with
    its error/bound by position (`out` is the rewrite's output on `problem`, cut there) and
    whether the rows before the last pass. They do where a formula changes at that length
    (a window, a tile, a cache: the last row is the first to see the change). Where they
    fail too, the whole output changed with the length: a formula switched by length, or a
    rounding that a kernel chosen by shape changes (measured: JAX's TF32 on a GPU, whose
    row 0 of a 37-token problem was 37x the float32 bound where 36 tokens passed), which
    `explain` leaves to the precision evidence to tell apart."""
    if first_fails_at is None or first_fails_at <= LENGTH_THRESHOLD:
        return []
    truth = truth_for(problem, backend, dtype)
    with np.errstate(all="ignore"):
        diff = np.abs(out - truth.out[rows])  # [..., n_seq | 1, n_embd]
        ratio = np.where(
            np.isnan(diff),
            np.inf,
            np.divide(diff, truth.tolerance(dtype)[rows], where=diff > 0, out=np.zeros_like(diff)),
        )
    by_row = ratio.max(axis=-1).reshape(-1, ratio.shape[-2]).max(axis=0)  # [n_seq | 1]
    n = first_fails_at
    text = f"a length threshold: fails at n_seq {n}, its first {n - 1} tokens pass"
    earlier = bool((by_row[:-1] <= 1).all())
    text += "" if earlier else " (every row from 0 fails at that length)"
    return [{"finding": "length threshold", "first_fails_at": n, "error_by_row": [float(f"{r:.3g}") for r in by_row],
             "earlier_rows_pass": earlier, "text": text}]  # fmt: skip
