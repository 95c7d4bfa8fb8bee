"""The work units on a Ray cluster (`verify --executor ray`, the extra attention-rewrites[ray]).

Each Ray actor keeps one local pool (pool.py) of one worker process, so a rewrite that
crashes, exits or hangs is isolated inside its actor exactly as on one machine: its unit
gets the same `error` verdict and is not retried. An actor lost with its node is restarted
by Ray and its unit run again (`RETRIES`); a unit lost more often than that is an `error`
saying so. Units that compute on a GPU ask Ray for one. Counterexample files are written
on the node that found them and travel back with the verdicts, into the driver's report.
Rewrites travel by identity: every node needs the project and the plugins installed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewrites.verify.pool import Done, Pool, Task, error_results, portable, worker_threads

if TYPE_CHECKING:
    from rewrites.verify.engine import Config

#: Seconds to wait for a Ray address to answer before saying it does not.
CONNECT_TIMEOUT = 10.0
#: Times Ray restarts a lost actor and runs its unit again (a lost node, not a crashing rewrite).
RETRIES = 3
#: Seconds the actors get to stop their workers and remove their folders at the end.
CLOSE_TIMEOUT = 15.0


class RayUnavailable(RuntimeError):
    """Ray is not installed, or its cluster cannot be reached or cannot run these units."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--executor ray needs Ray: pip install 'attention-rewrites[ray]'") from None
    return ray


class Unit:
    """The actor: this node's catalogue and a pool of one worker, kept warm between units."""

    def __init__(
        self,
        config: Config,
        refs: dict,
        gpt2_inputs: bool,
        include_plugins: bool,
        timeout: float,
        threads: dict[str, str],
    ) -> None:
        from rewrites.registry import catalogue
        from rewrites.verify.serve import restored

        self.folder = Path(tempfile.mkdtemp(prefix="attention-rewrites-"))  # this node's report folder
        config = dataclasses.replace(restored(config, refs), report_dir=self.folder)
        self.args = (config, gpt2_inputs)
        self.found = {rw.identity: rw for rw in catalogue(include_plugins)}
        self.pool = Pool(config, gpt2_inputs, include_plugins, timeout, threads)

    def run(self, identity: tuple[str, str], backend: str) -> tuple:
        """("done", results, throughput, compilations, failure, internal, files) or ("missing",)."""
        rw = self.found.get(tuple(identity))
        if rw is None:
            return ("missing",)
        done = next(self.pool.run(deque([Task(rw, backend)]), 1))
        files = {}
        for r in done.results:
            path = r.counterexample and r.counterexample.file
            if path and Path(path).is_file():
                files[Path(path).name] = Path(path).read_bytes()
        return ("done", done.results, done.throughput, done.compilations, done.failure, done.internal, files)

    def close(self) -> None:
        """Stop the worker and remove this node's folders (ray.kill alone leaves them behind)."""
        self.pool.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def cluster(address: str | None = None, gpu: bool = False) -> Iterator[None]:
    """Connected to the Ray cluster at `address` (None: $RAY_ADDRESS, else a local Ray
    instance started here and shut down at the end); as is where Ray is already connected.
    One line (RayUnavailable) if Ray is missing, unreachable, or has no GPU for `gpu`."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        _reachable(address or os.environ.get("RAY_ADDRESS"))
        try:
            with warnings.catch_warnings():  # Ray starts its processes by fork + exec, which JAX warns of
                warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RayUnavailable(
                f"--executor ray: cannot start or reach Ray at {address or 'local'} ({first})"
            ) from None
    try:
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise RayUnavailable("--device cuda: the Ray cluster has no GPU")
        yield
    finally:
        if started:
            ray.shutdown()


def _reachable(address: str | None) -> None:
    """Fail in seconds where nothing listens at a host:port (Ray itself retries for minutes)."""
    host, sep, port = (address or "").removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # no address (a local instance), "auto", or a form left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise RayUnavailable(f"--executor ray: nothing answers at {address} ({e.strerror or e})") from None


def stream(
    config: Config,
    work: Sequence[Task],
    gpt2_inputs: bool,
    jobs: int | None,
    timeout: float,
    include_plugins: bool,
    address: str | None = None,
) -> Generator[Done, None, None]:
    """Each unit's Done as it finishes, from `jobs` actors (None: one per CPU of the cluster,
    or per GPU under --device cuda) on the cluster (`cluster`). Actors are stopped when the
    iteration ends, however it ends."""
    if not work:
        return
    ray = _ray()
    gpu = config.device == "cuda"
    with cluster(address, gpu):
        n = max(1, min(jobs or int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)), len(work)))
        unit = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=RETRIES, max_task_retries=RETRIES)(Unit)
        args = (*portable(config), gpt2_inputs, include_plugins, timeout, worker_threads())
        pending, running, actors = deque(work), {}, []

        def submit(actor: Any) -> None:
            task = pending.popleft()
            running[actor.run.remote(task.rewrite.identity, task.backend)] = (actor, task, time.monotonic())

        try:
            for _ in range(n):
                actors.append(unit.remote(*args))
                submit(actors[-1])
            while running:
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, task, started = running.pop(ref)
                try:
                    done = _done(task, ray.get(ref), config, gpt2_inputs)
                except ray.exceptions.RayActorError as e:  # lost more than RETRIES times, or cannot start there
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    why = f"lost on the Ray cluster after {RETRIES} retries ({type(e).__name__}: {first})"
                    done = Done(task, error_results(task, config, gpt2_inputs, why), failure=why)
                    ray.kill(actor)
                    actors[actors.index(actor)] = actor = unit.remote(*args)
                yield dataclasses.replace(done, seconds=round(time.monotonic() - started, 3))
                if pending:
                    submit(actor)
        finally:
            _stop(ray, actors)


def _stop(ray: Any, actors: list) -> None:
    """Each actor asked to tidy up (a few seconds at most, whatever state it is in), then killed."""
    closing = [actor.close.remote() for actor in actors]
    with contextlib.suppress(Exception):  # a busy or lost actor is killed as it is
        ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT)
    for actor in actors:
        ray.kill(actor)


def _done(task: Task, reply: tuple, config: Config, gpt2_inputs: bool) -> Done:
    """The driver's Done from an actor's reply: counterexample files written into the
    driver's report folder, and the results pointing there."""
    if reply[0] == "missing":
        why = "not in the catalogue on its Ray node (install the project and the plugins on every node)"
        return Done(task, error_results(task, config, gpt2_inputs, why), failure=why)
    _, results, throughput, compilations, failure, internal, files = reply
    folder = config.report_dir / "counterexamples"
    for name, data in files.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return Done(task, [_moved(r, folder) for r in results], throughput, compilations, failure, internal)


def _moved(r: Any, folder: Path) -> Any:
    ce = r.counterexample
    if ce is None or not ce.file:
        return r
    old, new = ce.file, str(folder / Path(ce.file).name)
    replay = ce.replay.replace(old, new) if ce.replay else ce.replay
    return dataclasses.replace(r, counterexample=dataclasses.replace(ce, file=new, replay=replay))
