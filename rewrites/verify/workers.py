"""Worker processes: every rewrite x backend runs where a crash, `exit`, a signal or a hang
cannot take the run down with it (the pool: pool.py; a worker's side: serve.py). Results
come back as each task finishes, so the caller can write them down before the next one
arrives; every task gives one Done, verdicts or `error` verdicts saying why there are none."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from rewrites.verify.pool import Done, Pool, Task

if TYPE_CHECKING:
    from rewrites.registry import Rewrite
    from rewrites.verify.engine import Config, Throughput
    from rewrites.verify.verdicts import Result

__all__ = ["DEFAULT_TIMEOUT", "Done", "Task", "run", "stream", "tasks"]

#: Seconds one rewrite x backend may take (`--timeout`). ring_buffer_overflow_1000 on PyTorch
#: (a loop per token to 2049 tokens) took 499 s beside one other worker and passed 600 s in
#: the whole catalogue's run, where it was judged `error`: a limit for hangs, not for slow work.
DEFAULT_TIMEOUT = 1200.0
COMPILATIONS = [0]  # compilations reported by workers through `run`, for the run's totals


def tasks(rewrites: Iterable[Rewrite], backend_names: Sequence[str]) -> list[Task]:
    """Every rewrite on every backend it exists for, in catalogue order."""
    return [Task(rw, b) for rw in rewrites for b in backend_names if rw.runs_on(b)]


def stream(
    config: Config,
    work: Sequence[Task],
    gpt2_inputs: bool,
    jobs: int,
    timeout: float = DEFAULT_TIMEOUT,
    include_plugins: bool = True,
) -> Iterator[Done]:
    """Each task's Done as it finishes, in whatever order they finish; every task gives one.
    Workers are stopped when the iteration ends, however it ends (Ctrl-C included)."""
    if not work:
        return
    pool = Pool(config, gpt2_inputs, include_plugins, timeout)
    try:
        yield from pool.run(deque(work), max(1, min(jobs, len(work))))
    finally:
        pool.close()


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
