"""The search for a failing problem: Hypothesis's `find` for synthetic problems, a sweep for
the real layers; the failure found is cut to its first failing length (cut.py). What a
search saw is its record (record.py)."""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from hypothesis import HealthCheck, Phase, find, settings, target
from hypothesis.errors import NoSuchExample

from oracles.problem import AttentionProblem
from oracles.reference import size
from rewrites.verify.cut import to_first_failing_length
from rewrites.verify.database import encode, remembered, unit_key
from rewrites.verify.judge import References
from rewrites.verify.record import Search

if TYPE_CHECKING:
    from hypothesis.database import ExampleDatabase
    from hypothesis.strategies import SearchStrategy


@functools.cache  # once per process: the patched hook stays patched
def without_local_constants() -> None:
    """Make derandomised searches depend on the seed alone. Hypothesis (6.131 on) also draws
    constants found in the *local* modules present in sys.modules, so the examples of a
    search changed with what else the process had imported: under pytest-xdist a worker
    found picoGPT's -1e10 mask leaking in float64 that a lone run never drew, and missed the
    -1e4 leak. This turns that off (a private hook, left alone if Hypothesis renames it)."""
    from hypothesis.internal.conjecture import providers

    if hasattr(providers, "_get_local_constants") and hasattr(providers, "Constants"):
        empty = providers.Constants()
        providers._get_local_constants = lambda: empty
        providers.CONSTANTS_CACHE.cache.clear()


SHRINK_EXAMPLES_PER_EXAMPLE = 4


def band_share(examples: int, i: int, bands: int) -> int:
    """The examples band i of `bands` gets of a search's `examples` (shares differ by one at most)."""
    return examples * (i + 1) // bands - examples * i // bands


class _ShrinkBudgetSpent(Exception):
    """Raised inside Hypothesis's shrinker to stop it: the smallest failure so far is kept."""


def hypothesis_search(
    bands: Sequence[SearchStrategy],
    s: Search,
    refs: References,
    examples: int,
    explicit: Sequence[AttentionProblem] = (),
    shrink: bool = True,
    database: ExampleDatabase | None = None,
    seed: int | None = None,
    shrink_up_to: int | None = None,
) -> Search:
    """Try the `explicit` problems, then search each band of strategies in turn with an
    equal share of `examples` (derandomised: every rewrite sees the same problems), steered
    towards the largest error/bound ratio, until one fails; shrink it (at most
    SHRINK_EXAMPLES_PER_EXAMPLE x `examples` more evaluations: shrinking a 2049-token
    problem can take hundreds, and the cut below makes the length exact anyway), then cut
    it to its exact first failing length. `s` is filled in. Without `shrink` the first
    failure is kept as found (and still cut). What `database` holds for this search is
    tried before anything else, and what fails is saved there (database.py). `seed`: None
    for the derandomised search (the same problems every run), else that seed's.
    `shrink_up_to`: a failure of more tokens than this is kept as found (a search over a
    fixed menu of shapes: shrinking cannot shorten it, only reseed its dense values, and on
    JAX a ring buffer run eagerly at 1025 tokens made each try 3-6 s)."""
    without_local_constants()
    key = unit_key(s.rewrite.source, s.rewrite.name, s.backend, s.dtype, s.stage.value)
    for value, problem in remembered(database, key):
        s.examples += 1
        if s.failing(problem, refs) is not None:
            s.failure = problem
            break
        database.delete(key, value)  # passes now: the rewrite was fixed (or the bound changed)
    budget = s.examples + len(explicit) + examples * (1 + SHRINK_EXAMPLES_PER_EXAMPLE)
    smallest: list[AttentionProblem] = []  # the smallest failing problem so far
    start = time.perf_counter()
    opts = settings(
        max_examples=examples,
        derandomize=seed is None,
        database=None,  # ours is tried above: Hypothesis's own would change what it draws
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.target, *([Phase.shrink] if shrink else [])],
    )

    def fails(problem: AttentionProblem) -> bool:
        if smallest and (s.examples >= budget or (shrink_up_to is not None and smallest[0].n_seq > shrink_up_to)):
            raise _ShrinkBudgetSpent
        s.examples += 1
        failed = s.failing(problem, refs) is not None
        target(math.log10(s.last_ratio) if 0 < s.last_ratio < math.inf else (300.0 if s.last_ratio else -300.0))
        if failed and (not smallest or size(problem) < size(smallest[0])):
            smallest[:] = [problem]
        return failed

    for problem in explicit if s.failure is None else ():
        s.examples += 1
        if s.failing(problem, refs) is not None:
            s.failure = problem
            break
    for i, strategy in enumerate(bands):
        if s.failure is not None:
            break
        share = band_share(examples, i, len(bands))
        try:
            seeded = None if seed is None else random.Random(seed)
            with warnings.catch_warnings():  # the repr of a batched problem's arrays: never shown here
                warnings.filterwarnings("ignore", message="Generating overly large repr")
                s.failure = find(strategy, fails, settings=settings(opts, max_examples=max(share, 1)), random=seeded)
        except NoSuchExample:
            pass
        except _ShrinkBudgetSpent:
            s.failure = smallest[0]
        except BaseExceptionGroup as e:  # stopped before shrinking began: Hypothesis reports both
            if e.subgroup(_ShrinkBudgetSpent) is None or not smallest:
                raise
            s.failure = smallest[0]
    if s.failure is not None:
        to_first_failing_length(s, refs)
        if database is not None:
            database.save(key, encode(s.failure))  # the same problem saved twice is one entry
    s.seconds = time.perf_counter() - start
    return s


def sweep(problems: Iterable[tuple[int, AttentionProblem]], s: Search, refs: References) -> Search:
    """Each (layer, problem) in turn (the real layers) until one fails; that one is cut to
    its exact first failing length."""
    start = time.perf_counter()
    for layer, p in problems:
        s.examples += 1
        if s.failing(p, refs) is not None:
            s.failure, s.layer = p, layer
            to_first_failing_length(s, refs)
            break
    s.seconds = time.perf_counter() - start
    return s
