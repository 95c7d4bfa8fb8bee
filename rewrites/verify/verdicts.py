"""The verdict vocabulary: what a search concludes, what a rewrite claims, and the rule
that says whether a verdict contradicts a claim."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum


class Verdict(StrEnum):
    """What the verifier concludes for one rewrite x backend x dtype x input source, best first."""

    BITWISE = "bitwise"  # every output equalled the backend's own oracle bit for bit
    EQUIVALENT = "equivalent"  # every output within the derived bound of the float64 truth
    IMPRECISE = "imprecise"  # right formula computed at a lower precision than its dtype (Result.precision)
    UNSTABLE = "unstable"  # right formula, but fails on inputs a correct dtype computation holds
    INEQUIVALENT = "inequivalent"  # fails on moderate float64 inputs: the formula is wrong
    ERROR = "error"  # raised, returned a wrong shape or dtype, or NaN on benign inputs

    @property
    def symbol(self) -> str:
        """One letter for the tables."""
        return _SYMBOLS[self]

    @property
    def holds_equivalence(self) -> bool:
        return self in (Verdict.BITWISE, Verdict.EQUIVALENT)


_SYMBOLS = {
    Verdict.BITWISE: "B",
    Verdict.EQUIVALENT: "E",
    Verdict.IMPRECISE: "P",
    Verdict.UNSTABLE: "U",
    Verdict.INEQUIVALENT: "I",
    Verdict.ERROR: "X",
}

#: What a rewrite may claim: any verdict but `error`.
CLAIMS: tuple[Verdict, ...] = tuple(v for v in Verdict if v is not Verdict.ERROR)
LEGEND = (
    ", ".join(f"{v.symbol} {v.value}" for v in Verdict).replace("E equivalent", "E equivalent within the derived bound")
    + "; ! marks a verdict that contradicts the rewrite's claim; <=N: a loop per token or tile run on"
    " each problem's first N tokens only (JAX: eager steps compile per shape, an unrolled loop for minutes)"
)
#: dtypes in which a claim is held against the verdict; float16/bfloat16 are reported only.
CLAIM_DTYPES = ("float64", "float32")


class Inputs(StrEnum):
    """Where the problems of a search come from."""

    HYPOTHESIS = "hypothesis"  # synthetic problems drawn and shrunk by Hypothesis
    GPT2 = "gpt2"  # the real GPT-2 attention layers


@dataclass(frozen=True)
class Counterexample:
    """The smallest failing problem a search found, and how to replay it."""

    message: str
    file: str | None = None
    problem: str | None = None
    shape: dict | None = None
    examples_to_find: int | None = None
    first_fails_at: int | None = None  # n_seq: the problem's first n tokens fail, its first n - 1 pass
    replay: str | None = None


@dataclass(frozen=True)
class Result:
    """One verdict: rewrite x backend x dtype x input source."""

    rewrite: str
    family: str
    backend: str
    dtype: str
    inputs: Inputs
    claim: Verdict | None
    verdict: Verdict
    max_abs_error: float | None
    max_error_over_bound: float | None
    examples: int
    counterexample: Counterexample | None = None
    source: str = "built-in"
    witness: str | None = None  # for an `unstable` or `imprecise` claim: a claim dtype where the search found it
    precision: str | None = None  # `imprecise`: the lower precision whose bound held on every failing example
    cut_to: int | None = None  # the backend ran a per-token loop on each problem's first cut_to tokens only
    diagnosis: list[dict] = field(default_factory=list)  # findings on the counterexample (diagnose.py)
    seconds: float | None = None  # this dtype's own searches took (float64's formula search: float64's)
    invariance: dict | None = None  # bitwise batch, prefix, deterministic and their witnesses (invariance.py)

    @property
    def claim_holds(self) -> bool:
        return claim_holds(self.claim, self.verdict, self.inputs, self.dtype, self.witness, self.cut_to)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("inputs", "claim", "verdict"):  # plain strings: pytest-xdist's channel sends no enums
            d[k] = None if d[k] is None else d[k].value
        for k in ("max_abs_error", "max_error_over_bound"):  # JSON has no inf/nan
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = str(d[k])
        # plain Python values only (a NumPy float in a diagnosis is a float to json, not to
        # pytest-xdist's channel, which refused one at the end of a NumPy-only run)
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict) -> Result:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        num = {k: None if d[k] is None else float(d[k]) for k in ("max_abs_error", "max_error_over_bound")}
        ce = d.get("counterexample")
        typed = {
            "inputs": Inputs(d["inputs"]),
            "claim": None if d["claim"] is None else Verdict(d["claim"]),
            "verdict": Verdict(d["verdict"]),
            "counterexample": None if ce is None else Counterexample(**ce),
        }
        return cls(**{**d, **num, **typed})


def claim_holds(
    claim: Verdict | None,
    verdict: Verdict,
    inputs: Inputs,
    dtype: str,
    witness: str | None = None,
    cut_to: int | None = None,
) -> bool:
    """Whether `verdict` is consistent with `claim` (False: the claim is contradicted).

    `bitwise` and `equivalent` are universal claims: any failure contradicts them.
    `unstable` and `inequivalent` claim that a counterexample exists, which the Hypothesis
    search must find; real GPT-2 inputs may well be benign for them. An instability may show
    in one dtype only (a leak at logits that only float64 can hold), and so may a loss of
    precision (float32 arithmetic is exact enough for float32 inputs): for `unstable` and
    `imprecise` it is enough that the search found it in one of the CLAIM_DTYPES
    (`witness`) if the others at least stay within the bound. Only CLAIM_DTYPES are held
    to the claim; an `error` never holds one.
    Problems cut to their first `cut_to` tokens (Backend.tokens) cannot contradict a
    claim that a counterexample exists: it may need more tokens; they still contradict a
    universal claim."""
    if claim is None or dtype not in CLAIM_DTYPES:
        return True
    if verdict is Verdict.ERROR:
        return False
    if claim is Verdict.BITWISE:
        return verdict is Verdict.BITWISE
    if claim is Verdict.EQUIVALENT:
        return verdict.holds_equivalence
    if inputs is Inputs.GPT2 or (cut_to is not None and verdict.holds_equivalence):
        return True
    if claim in (Verdict.UNSTABLE, Verdict.IMPRECISE) and witness is not None:
        return verdict.holds_equivalence or verdict is claim
    return verdict is claim
