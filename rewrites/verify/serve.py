"""A worker process's side of the pool (pool.py): get ready, then run one task at a time,
`Verifier.verify_one(rw, [backend])` for the rewrite found by its identity (rewrites travel
by identity; a worker finds the catalogue and plugins itself), and send back what came of
it. A worker keeps its Verifier between tasks, so caches and the real layers are built
once per worker. It ignores Ctrl-C (the parent handles it), writes what rewrites print to
its log file, which the parent copies to its stderr (stdout is the tables'), and exits
when the parent dies."""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from enum import Enum
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from oracles import backends, heap

if TYPE_CHECKING:
    from rewrites.registry import Rewrite
    from rewrites.verify.engine import Config, Verifier

READY = "ready"  # what a worker sends once it can take tasks


class Part(Enum):
    """What of a rewrite on a backend one task computes (workers.split)."""

    ALL = "all"  # its verdicts, each with its invariances
    VERDICTS = "verdicts"  # its verdicts alone
    INVARIANCES = "invariances"  # its invariances per dtype alone (Done.invariances)


def compilations(names: Sequence[str]) -> int:
    """Compilations so far in this process, on the given backends."""
    return sum(backends.get(n).compilations() for n in names)


def restored(config: Config, refs: dict[str, tuple[str, str]]) -> Config:
    """pool.portable's inverse, in the worker."""
    return dataclasses.replace(config, **{k: getattr(importlib.import_module(m), n) for k, (m, n) in refs.items()})


def serve(conn: Connection, log: str, config: Config, refs: dict, gpt2_inputs: bool, include_plugins: bool) -> None:
    """A worker's life: get ready, then run tasks until told to stop or the parent goes.
    Its stdout and stderr, Python's and C's alike, go to `log` (the parent copies it out)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    for stream in (sys.stdout, sys.stderr):  # a rewrite's prints stay out of the tables
        try:
            stream.flush()
            os.dup2(fd, stream.fileno())
        except (AttributeError, OSError, ValueError):  # no real stdio (embedded): replaced below
            pass
    os.close(fd)
    sys.stdout = sys.stderr = open(log, "a", buffering=1, errors="replace")  # line by line: a crash loses none
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    from rewrites.registry import catalogue
    from rewrites.verify.engine import Verifier

    heap.retain_freed_memory()  # a worker judges at 1024 tokens, unit after unit: oracles/heap.py
    verifier = Verifier(restored(config, refs))
    found = {rw.identity: rw for rw in catalogue(include_plugins)}
    conn.send(READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        identity, backend, part = task
        rw = found.get(tuple(identity))
        if rw is None:
            conn.send(("failed", "not found in the worker's catalogue (did a plugin change since the run began?)"))
        else:
            conn.send(_work(verifier, rw, backend, Part(part), gpt2_inputs))


def _exit_with_parent() -> None:
    """Orphaned workers go too: a killed run must not leave them computing."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)


def _work(verifier: Verifier, rw: Rewrite, backend: str, part: Part, gpt2_inputs: bool) -> tuple:
    """One task: ("done", results, throughput, compilations, parts) with `parts` Done's
    fields of a Part, ("failed", why) when the rewrite made the verifier stop, or
    ("internal", traceback) when the verifier broke."""
    from hypothesis.errors import Flaky

    from rewrites.verify.execute import NONDETERMINISM

    before, n = compilations([backend]), len(verifier.throughput)
    parts: dict = {}
    try:
        if part is Part.INVARIANCES:
            results, parts["invariances"] = [], verifier.invariances(rw, backend, gpt2_inputs)
        else:
            results = verifier.verify_one(rw, [backend], gpt2_inputs, invariances=part is Part.ALL)
            if part is Part.VERDICTS:  # what the invariances, measured elsewhere, must say too
                seen = {d: NONDETERMINISM.known(rw, backend, d) for d in {r.dtype for r in results}}
                parts["nondeterministic"] = {d: m for d, m in seen.items() if m is not None}
    except Flaky as e:
        why = f"nondeterministic: Hypothesis saw an input fail, then pass when run again ({type(e).__name__})"
        return ("failed", why)
    except Exception:
        return ("internal", traceback.format_exc())
    except BaseException as e:  # KeyboardInterrupt and the like: the rewrite raised them (SIGINT is ignored here)
        first = (str(e).strip().splitlines() or [""])[0]
        return ("failed", f"raised {type(e).__name__}" + (f": {first}" if first else ""))
    return ("done", results, verifier.throughput[n:], compilations([backend]) - before, parts)
