"""The pool of worker processes (spawned: JAX and PyTorch threads do not survive fork),
one task at a time each. A worker that dies is replaced and its task gets `error` verdicts
saying how it ended ("exit status 1", "killed by SIGSEGV") and its last words: the last
line it wrote that is not a stack frame (a library's abort message, e.g. XLA's "Check
failed: ..."). A worker writes to a file of its own, which the parent copies to its
stderr as it grows, so nothing is lost and a dead worker's last lines can still be read.
One that runs past the time limit is killed ("timeout after 600 s"). The worker's side
is serve.py."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from rewrites.verify.serve import READY, Part, serve
from rewrites.verify.verdicts import Counterexample, Inputs, Result, Verdict

if TYPE_CHECKING:
    from rewrites.registry import Rewrite
    from rewrites.verify.engine import Config, Throughput

#: Seconds a new worker may take to import everything and get ready; not the task's time.
STARTUP_LIMIT = 300.0
#: New workers that die before they are ready, in a row, before the pool gives up.
STARTUP_FAILURES = 3
#: Seconds between copies of the workers' output to the parent's stderr.
ECHO_EVERY = 1.0
#: The thread counts of a worker's BLAS and OpenMP (PyTorch): one, unless the user sets them.
#: Unset, every worker starts one thread per core: two workers on 2 cores ran 4 busy threads,
#: and five rewrites took 180 s instead of 125 s. And BLAS sums in another order with another
#: thread count (`batched_heads` in NumPy float32 is `bitwise` with two, `equivalent` with
#: one), so with one thread a worker the verdicts are the same for any --jobs, on any
#: machine, and under Ray; the parallelism is the workers'.
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_threads() -> dict[str, str]:
    """A worker's thread settings (THREADS): the user's own where set, else one."""
    return {var: os.environ.get(var, "1") for var in THREADS}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` while a worker is spawned (it inherits the environment)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def verifier_failed(trace: str) -> str:
    """Why a task that the verifier itself broke on has no verdicts: its traceback's last line."""
    return f"the verifier failed: {trace.strip().splitlines()[-1]}"


class PoolFailed(RuntimeError):
    """Workers cannot be started: the tool itself cannot run (exit status 3)."""


@dataclass(frozen=True)
class Task:
    """One unit of work: a rewrite on one backend (or a part of that)."""

    rewrite: Rewrite
    backend: str
    part: Part = Part.ALL


@dataclass
class Done:
    """A finished task: its verdicts, or `error` verdicts made here saying why there are none."""

    task: Task
    results: list[Result]
    throughput: list[Throughput] = field(default_factory=list)
    compilations: int = 0
    failure: str | None = None  # how the task ended without verdicts of its own (timeout, exit status...)
    internal: str | None = None  # the verifier itself raised: its traceback (a bug in this tool)
    seconds: float = 0.0  # from the task handed out to its result back (set by the executor)
    invariances: dict[str, dict] = field(default_factory=dict)  # Part.INVARIANCES: per dtype
    nondeterministic: dict[str, str] = field(default_factory=dict)  # Part.VERDICTS: dtypes seen so, and how


def error_results(task: Task, config: Config, gpt2_inputs: bool, message: str) -> list[Result]:
    """The rows verify_one would have made, every one an `error` with `message`, so that a
    report stays complete when a task could not give its own."""
    rw, backend = task.rewrite, task.backend
    dtypes = config.dtypes_on(backend)
    sources = [Inputs.HYPOTHESIS, *([Inputs.GPT2] if gpt2_inputs else [])]
    ce = Counterexample(message=f"{rw.name} on {backend}: {message}")
    return [
        Result(rewrite=rw.name, family=rw.family, backend=backend, dtype=d, inputs=s, claim=rw.claim,
               verdict=Verdict.ERROR, max_abs_error=None, max_error_over_bound=None, examples=0,
               counterexample=ce, source=rw.source)
        for s in sources for d in dtypes
    ]  # fmt: skip


def ended(exitcode: int | None) -> str:
    """How a process ended, in words."""
    if exitcode is None:
        return "stopped"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


class Worker:
    """One worker process, the task it runs and when that task must end, and the file its
    stdout and stderr go to (copied to the parent's stderr as it grows)."""

    def __init__(self, ctx: Any, args: tuple, folder: str, threads: dict[str, str]) -> None:
        fd, self.log = tempfile.mkstemp(prefix="worker-", suffix=".log", dir=folder)
        os.close(fd)
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, self.log, *args), daemon=True,
                                   name="attention-rewrites worker")  # fmt: skip
        with _environment(threads):
            self.process.start()
        child.close()
        self.ready, self.task, self.started = False, None, 0.0  # started: when the current task was handed out
        self.deadline = time.monotonic() + STARTUP_LIMIT
        self.echoed = self.task_start = 0  # bytes of the log copied out; where the current task's begin

    def start(self, task: Task, timeout: float) -> None:
        self.echo()
        self.started = time.monotonic()
        self.task, self.deadline, self.task_start = task, self.started + timeout, self.echoed
        self.conn.send((task.rewrite.identity, task.backend, task.part.value))

    def echo(self) -> None:
        """Copy what the worker wrote since the last call to this process's stderr."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.echoed)
                new = f.read()
        except OSError:
            return
        if new:
            self.echoed += len(new)
            sys.stderr.write(new.decode(errors="replace"))
            sys.stderr.flush()

    def last_words(self) -> str | None:
        """The last line the current task wrote that is not part of a stack trace."""
        self.echo()
        try:
            with open(self.log, "rb") as f:
                f.seek(self.task_start)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        frame = lambda line: line[:1].isspace() or line.startswith("***")  # "    @ 0x...", "*** Check failure ..."
        said = [line.strip() for line in lines if line.strip() and not frame(line)]
        return said[-1][:300] if said else None

    def receive(self) -> Any:
        """What the worker sent, or None if it died first (even mid-message)."""
        try:
            return self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):
            return None

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def close(self) -> None:
        """Stop an idle worker politely, a busy one at once; what it wrote is copied out."""
        try:
            if self.process.is_alive() and self.ready and self.task is None:
                self.conn.send(None)
                self.process.join(10)
        except OSError:
            pass
        self.kill()
        self.conn.close()
        self.echo()
        try:
            os.unlink(self.log)
        except OSError:
            pass


class Pool:
    def __init__(
        self,
        config: Config,
        gpt2_inputs: bool,
        include_plugins: bool,
        timeout: float,
        threads: dict[str, str] | None = None,  # the workers' THREADS (default: worker_threads() here)
    ) -> None:
        self.config, self.gpt2_inputs, self.timeout = config, gpt2_inputs, timeout
        self.threads = worker_threads() if threads is None else threads
        self.args = (*portable(config), gpt2_inputs, include_plugins)
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        self.failed_starts = 0
        self.logs = tempfile.TemporaryDirectory(prefix="attention-rewrites-workers-")

    def run(self, pending: deque[Task], jobs: int) -> Iterator[Done]:
        """Each pending task's Done as it finishes, on `jobs` workers; workers still alive
        from an earlier run (idle, caches warm) are used again."""
        while len(self.workers) < jobs:
            self.workers.append(Worker(self.ctx, self.args, self.logs.name, self.threads))
        while pending or any(w.task for w in self.workers):
            for w in self.workers:
                if w.ready and w.task is None and pending:
                    w.start(pending.popleft(), self.timeout)
            self._wait()
            for w in list(self.workers):
                w.echo()
                done, replace = self._check(w)
                if replace:
                    w.close()
                    self.workers.remove(w)
                    if pending:
                        self.workers.append(Worker(self.ctx, self.args, self.logs.name, self.threads))
                if done is not None:
                    yield dataclasses.replace(done, seconds=round(time.monotonic() - w.started, 3))

    def _wait(self) -> None:
        """Until a worker says something or ends, or the nearest deadline."""
        soonest = min(w.deadline for w in self.workers) - time.monotonic()
        limit = min(ECHO_EVERY, max(0.0, soonest))  # wake to copy the workers' output out
        wait([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers], limit)

    def _check(self, w: Worker) -> tuple[Done | None, bool]:
        """(the worker's finished task, if any; whether the worker must be replaced)."""
        message = w.receive()
        if message == READY:
            w.ready, w.deadline, self.failed_starts = True, float("inf"), 0
            return None, False
        if message is not None:
            task, w.task, w.deadline = w.task, None, float("inf")
            return self._done(task, message), False
        if w.process.is_alive() and time.monotonic() < w.deadline:
            return None, False
        why = ended(w.process.exitcode) if not w.process.is_alive() else None
        if why is not None and w.task is not None and (words := w.last_words()):
            why += f"; its last words: {words}"
        if w.task is not None:
            return self._failed(w.task, why or f"timeout after {self.timeout:g} s"), True
        if not w.ready:  # died or stuck while starting: not a rewrite's doing
            self.failed_starts += 1
            if self.failed_starts >= STARTUP_FAILURES:
                raise PoolFailed(f"worker processes fail to start ({why or 'not ready in time'})")
        return None, True

    def _done(self, task: Task, message: tuple) -> Done:
        kind, *rest = message
        if kind == "done":
            results, throughput, compiles, parts = rest
            return Done(task, results, throughput, compiles, **parts)
        if kind == "internal":
            (trace,) = rest
            why = verifier_failed(trace)
            return Done(task, error_results(task, self.config, self.gpt2_inputs, why), internal=trace)
        return self._failed(task, rest[0])

    def _failed(self, task: Task, why: str) -> Done:
        return Done(task, error_results(task, self.config, self.gpt2_inputs, why), failure=why)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []
        self.logs.cleanup()


def portable(config: Config) -> tuple[Config, dict[str, tuple[str, str]]]:
    """The config as it can travel to a spawned worker: a field that does not pickle (a
    profile of Hypothesis strategies) goes as the module-level name it is defined under."""
    refs: dict[str, tuple[str, str]] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            pickle.dumps(value)
        except Exception:
            module = importlib.import_module(type(value).__module__)
            name = next((k for k, v in vars(module).items() if v is value), None)
            if name is None:
                raise PoolFailed(f"Config.{f.name} cannot be sent to worker processes") from None
            refs[f.name] = (module.__name__, name)
    return dataclasses.replace(config, **dict.fromkeys(refs)), refs
