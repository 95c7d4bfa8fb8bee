"""A failure cut to its exact first failing length: its first L tokens fail, its first
L - 1 pass (causal attention makes a prefix a problem of its own), then said what it is."""

from __future__ import annotations

import numpy as np

from properties.strategies import LENGTH_LADDER
from rewrites.verify import diagnose
from rewrites.verify.judge import References
from rewrites.verify.probes import rows_beyond
from rewrites.verify.record import Search


def to_first_failing_length(s: Search, refs: References) -> None:
    """Cut the failure to a prefix (causal attention makes a prefix a problem of its own)
    of length L that fails while its prefix of L - 1 passes. A fault need not grow with
    length (floor division drops a partial tile at 65 tokens, not at 1024), so the rungs of
    LENGTH_LADDER below the failure's first failing row are tried first, shortest first,
    and the first that fails is bisected down from the rung below it: the cut lands at the
    first threshold the ladder crosses, not at whichever one a bisection of the whole
    length meets. Where no rung fails, the prefix ending at that first failing row is tried
    next (a causal rewrite fails there and passes one token shorter: two runs, not a
    bisection of a 1024-token real layer). A length found before (`s.cut_hint`: another
    dtype's cut, or the synthetic search's first failing length) is tried first: where its
    prefix fails and one token less passes, that is the cut. Invariant: prefix `lo` passes
    (0 tokens trivially), `hi` fails."""
    fails = lambda n: s.failing(s.failure.prefix(n), refs) is not None
    lo, hi = 0, s.failure.n_seq
    hint = s.cut_hint
    if hint is not None and 1 < hint <= hi and (hint == hi or fails(hint)) and not fails(hint - 1):
        lo, hi = hint - 1, hint  # the exact length found before holds here too
    else:
        row = _first_failing_row(s, refs)
        top = hi if row is None else row + 1
        for rung in LENGTH_LADDER:
            if rung >= top:
                break
            if fails(rung):
                hi = rung
                break
            lo = rung
        if top < hi and fails(top):
            hi = top
            if top - 1 > lo:
                lo, hi = (lo, top - 1) if fails(top - 1) else (top - 1, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid
    s.failure, s.first_fails_at = s.failure.prefix(hi), hi
    s.message = s.failing(s.failure, refs) or ""
    if not s.error:
        diagnose.explain(s)


def _first_failing_row(s: Search, refs: References) -> int | None:
    """The first row of the failure's output beyond the bound, from the output kept when it
    failed (None for a last-row rewrite, or a failure cut by Backend.tokens)."""
    out = next((o for p, o in reversed(s.kept) if p is s.failure), None)
    if out is None or s.rewrite.output != "full":
        return None
    ref = refs.truth(s.failure, s.backend, s.dtype)
    rows = np.flatnonzero(rows_beyond(out, ref.out, ref.tolerance).reshape(-1, out.shape[-2]).any(axis=0))
    return int(rows[0]) if rows.size else None
