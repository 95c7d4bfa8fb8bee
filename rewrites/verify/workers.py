"""Worker processes: rewrites shared out to a pool, each worker with its own Verifier.

Workers find the catalogue and plugins themselves, so rewrites travel by name; a worker
reports its verdicts, its throughput and its compilations."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING

from oracles import backends

if TYPE_CHECKING:
    from rewrites.registry import Rewrite
    from rewrites.verify.engine import Config, Throughput, Verifier
    from rewrites.verify.verdicts import Result

_WORKER: Verifier | None = None  # this worker process's verifier
COMPILATIONS = [0]  # compilations reported by workers, for the run's totals


def run(
    config: Config, rewrites: Sequence[Rewrite], names: list[str], gpt2_inputs: bool, jobs: int
) -> Iterator[tuple[str, list[Result], list[Throughput]]]:
    """(rewrite name, its results, its throughput) as each worker finishes one."""
    ctx = multiprocessing.get_context("spawn")  # JAX and PyTorch threads do not survive fork
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start, initargs=(config,)) as pool:
        futures = {pool.submit(_work, rw.name, names, gpt2_inputs): rw.name for rw in rewrites}
        for future in as_completed(futures):
            rs, throughput, compiles = future.result()
            COMPILATIONS[0] += compiles
            yield futures[future], rs, throughput


def compilations(names: Sequence[str]) -> int:
    """Compilations so far in this process, on the given backends."""
    return sum(backends.get(n).compilations() for n in names)


def _start(config: Config) -> None:
    global _WORKER
    from rewrites.verify.engine import Verifier

    _WORKER = Verifier(config)


def _work(name: str, names: list[str], gpt2_inputs: bool) -> tuple[list[Result], list[Throughput], int]:
    from rewrites.registry import catalogue

    before, n = compilations(names), len(_WORKER.throughput)
    results = _WORKER.verify_one(catalogue(names=[name])[0], names, gpt2_inputs)
    return results, _WORKER.throughput[n:], compilations(names) - before
