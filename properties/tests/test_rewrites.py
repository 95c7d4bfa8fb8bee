"""Every rewrite's claim against its measured verdict, one case per rewrite x backend x dtype.

Verdicts come from the same engine as `attention-rewrites verify` (rewrites/verify/),
computed once per rewrite and backend and shared by that pair's dtype cases. A
contradicted claim fails its case with the counterexample and how to replay it. Claims
are held in float64 and float32 (CLAIM_DTYPES), so only those are searched here; the
float16 and bfloat16 verdicts, reported but not held, come from `attention-rewrites verify`."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest


def test_rewrite_claim(rewrite_case, verdicts):
    rw, backend, dtype = rewrite_case
    results = [r for r in verdicts(rw, backend) if r.dtype == dtype]
    assert results, f"no verdict for {rw.name} on {backend} {dtype}"
    bad = [r for r in results if not r.claim_holds]
    if bad:
        details = "\n".join(
            f"  {r.inputs}: verdict {r.verdict} (max error/bound {r.max_error_over_bound})\n"
            f"  counterexample: {json.dumps(asdict(r.counterexample) if r.counterexample else None, indent=1)}"
            for r in bad
        )
        pytest.fail(f"{rw.name} claims {rw.claim!r} on {backend} {dtype}:\n{details}", pytrace=False)
