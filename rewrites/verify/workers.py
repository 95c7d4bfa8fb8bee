"""Worker processes: every rewrite x backend runs where a crash, `exit`, a signal or a hang
cannot take the run down with it (the pool: pool.py; a worker's side: serve.py). Results
come back as each task finishes, so the caller can write them down before the next one
arrives; every task gives one Done, verdicts or `error` verdicts saying why there are none."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from rewrites.verify import invariance
from rewrites.verify.pool import Done, Part, Pool, Task, verifier_failed

if TYPE_CHECKING:
    from rewrites.registry import Rewrite
    from rewrites.verify.engine import Config, Throughput
    from rewrites.verify.verdicts import Result

__all__ = ["DEFAULT_TIMEOUT", "Done", "Task", "held", "run", "split", "stream", "tasks"]

#: Seconds one rewrite x backend may take (`--timeout`). ring_buffer_overflow_1000 on PyTorch
#: (a loop per token to 2049 tokens) took 499 s beside one other worker and passed 600 s in
#: the whole catalogue's run, where it was judged `error`: a limit for hangs, not for slow work.
DEFAULT_TIMEOUT = 1200.0
COMPILATIONS = [0]  # compilations reported by workers through `run`, for the run's totals


def tasks(rewrites: Iterable[Rewrite], backend_names: Sequence[str]) -> list[Task]:
    """Every rewrite on every backend it exists for, in catalogue order."""
    return [Task(rw, b) for rw in rewrites for b in backend_names if rw.runs_on(b)]


#: Fewer tasks than this many a worker, and each is split in two (`split`).
SPLIT_BELOW = 2


def split(work: Sequence[Task], jobs: int, config: Config) -> list[Task]:
    """The tasks to hand out. Where there are fewer than SPLIT_BELOW a worker, each task's
    verdicts and its invariances are two tasks (the verdicts first, in order, then the
    invariances, the last task's first), so the workers end together: one rewrite on three
    backends is three tasks for two workers, and one worker ran two in a row (`verify
    --rewrite batched_heads`, 43.8 s, of which the invariances 2.6-7.3 s a backend).
    `stream` gives one Done per task all the same (`merged`)."""
    if jobs <= 1 or len(work) >= SPLIT_BELOW * jobs or not config.invariance:
        return list(work)
    parts = lambda part, tasks: [dataclasses.replace(t, part=part) for t in tasks]
    return parts(Part.VERDICTS, work) + parts(Part.INVARIANCES, reversed(work))


def merged(verdicts: Done, measured: Done) -> Done:
    """One task's Done from its two parts, as one task would have given it: each verdict
    with its dtype's invariances (those of a dtype its searches saw nondeterministic say
    so, as they do measured after them). Where the invariances' part ended without them,
    each says why; where the verdicts' part did, its `error` rows stand alone, as they do."""
    task = dataclasses.replace(verdicts.task, part=Part.ALL)
    why = measured.failure or (measured.internal and verifier_failed(measured.internal))
    lost = invariance.Invariance(None, None, None, dict.fromkeys(invariance.NAMES, f"not measured: {why}"))

    def of(dtype: str) -> dict | None:
        if dtype in verdicts.nondeterministic:
            return dataclasses.asdict(invariance.nondeterministic(verdicts.nondeterministic[dtype]))
        return dataclasses.asdict(lost) if why else measured.invariances.get(dtype)

    results = verdicts.results
    if not (verdicts.failure or verdicts.internal):
        results = [dataclasses.replace(r, invariance=of(r.dtype)) for r in results]
    internal = "".join(d.internal for d in (verdicts, measured) if d.internal) or None
    return Done(task, results, verdicts.throughput, verdicts.compilations + measured.compilations,
                verdicts.failure, internal, verdicts.seconds + measured.seconds)  # fmt: skip


#: Why a split task's invariances are missing when the run stopped before they were measured.
INTERRUPTED = "the run was interrupted"


def stream(
    config: Config,
    work: Sequence[Task],
    gpt2_inputs: bool,
    jobs: int,
    timeout: float = DEFAULT_TIMEOUT,
    include_plugins: bool = True,
) -> Generator[Done, None, None]:
    """Each task's Done as it finishes, in whatever order they finish; every task gives one
    (a split task once both its parts are done: `split`; on Ctrl-C, one whose verdicts are
    done, with its invariances not measured). Workers are stopped when the iteration ends,
    however it ends (Ctrl-C included)."""
    if not work:
        return
    parts = split(work, max(1, jobs), config)
    pool = Pool(config, gpt2_inputs, include_plugins, timeout)
    halves: dict[tuple, Done] = {}  # a split task's part that finished first
    try:
        for done in pool.run(deque(parts), max(1, min(jobs, len(parts)))):
            if done.task.part is Part.ALL:
                yield done
                continue
            other = halves.pop((done.task.rewrite.identity, done.task.backend), None)
            if other is None:
                halves[(done.task.rewrite.identity, done.task.backend)] = done
            else:
                yield merged(*sorted((done, other), key=lambda d: d.task.part is Part.INVARIANCES))
    except KeyboardInterrupt:  # verdicts that finished are kept, their invariances not measured
        for done in [d for d in halves.values() if d.task.part is Part.VERDICTS]:
            yield merged(done, Done(dataclasses.replace(done.task, part=Part.INVARIANCES), [], failure=INTERRUPTED))
        raise
    finally:
        pool.close()


def held(jobs: Generator[Done, None, None]) -> list[Done]:
    """What a stream still holds when Ctrl-C lands in its consumer (writing a Done down)
    rather than in the stream: the interrupt is thrown into it, so that it gives what it
    gives on a Ctrl-C of its own (`stream`: the split tasks whose verdicts finished), and
    it is closed. A stream that is over, or holds nothing, gives []."""
    got: list[Done] = []
    try:
        got.append(jobs.throw(KeyboardInterrupt))
        got.extend(jobs)
    except (KeyboardInterrupt, StopIteration):
        pass
    finally:
        jobs.close()
    return got


def run(
    config: Config,
    rewrites: Sequence[Rewrite],
    names: list[str],
    gpt2_inputs: bool,
    jobs: int,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[tuple[str, list[Result], list[Throughput]]]:
    """(rewrite name, its results, its throughput) once all its backends are done, for
    engine.Verifier.verify; the command line uses `stream`."""
    parts: dict[tuple[str, str], dict[str, Done]] = {}
    for done in stream(config, tasks(rewrites, names), gpt2_inputs, jobs, timeout):
        COMPILATIONS[0] += done.compilations
        got = parts.setdefault(done.task.rewrite.identity, {})
        got[done.task.backend] = done
        if len(got) == sum(done.task.rewrite.runs_on(b) for b in names):
            rs = [r for b in names if b in got for r in got[b].results]
            yield done.task.rewrite.name, rs, [t for b in names if b in got for t in got[b].throughput]
