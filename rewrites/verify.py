"""The verdict engine: one measured verdict per rewrite x backend x dtype x inputs.

For each rewrite and backend, Hypothesis searches (derandomised, so every rewrite sees
the same examples and a run is reproducible):

1. float64, moderate inputs: any output beyond the derived bound of the float64 truth
   makes the rewrite `inequivalent` (in every dtype). An exception, a wrong shape or dtype,
   or NaN on these benign inputs is an `error`.
2. each dtype, moderate and extreme inputs (large logits, tiny values), skipping inputs
   no correct computation in that dtype can hold: an output that overflows, is NaN or
   leaves the bound makes it `unstable`.
3. otherwise `bitwise` if every output equalled the same backend's oracle bit for bit,
   else `equivalent`.

The same three steps run on the 12 real GPT-2 layers (inputs "gpt2"). Failures are shrunk
by Hypothesis and saved as replayable counterexamples.
"""

from __future__ import annotations

import functools
import hashlib
import math
import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample

import oracles
from oracles import backends, gpt2
from oracles.problem import AttentionProblem
from oracles.truth import Truth, layer_norm
from properties.checks import excess, representable, truth_for
from properties.strategies import EXTREME, LARGE_LOGITS, attention_problems
from rewrites.registry import Rewrite

VERDICTS = ("bitwise", "equivalent", "unstable", "inequivalent", "error")
#: dtypes in which a claim is held against the verdict; float16/bfloat16 are reported only.
CLAIM_DTYPES = ("float64", "float32")

# Few distinct shapes, so JAX compiles each primitive for a handful of shapes shared by all
# rewrites; they still cover what the mutants need (two heads, head_dim > 1, a partial tile).
SHAPES = dict(max_seq=(1, 2, 3, 5), max_head=(1, 2), max_head_dim=(1, 3), batches=((), (2,)))
MODERATE_PROBLEMS = attention_problems(**SHAPES)
EXTREME_PROBLEMS = attention_problems(**SHAPES, x_scales=EXTREME, w_scales=EXTREME, logit_scales=LARGE_LOGITS)


class RewriteFailed(Exception):
    """The rewrite raised, or returned something that is not a valid output."""


@dataclass
class Config:
    examples: int = 30  # Hypothesis examples per search
    gpt2_n_seq: int = 16  # tokens in each real-layer input
    gpt2_weights: str | None = None
    report_dir: Path = Path("report")
    dtypes: tuple[str, ...] = backends.DTYPES


@dataclass
class Result:
    rewrite: str
    family: str
    backend: str
    dtype: str
    inputs: str  # "hypothesis" | "gpt2"
    claim: str | None
    verdict: str
    max_abs_error: float | None
    max_error_over_bound: float | None
    examples: int
    counterexample: dict | None = None
    source: str = "built-in"
    witness: str | None = None  # for an `unstable` claim: a claim dtype where the search found it

    @property
    def claim_holds(self) -> bool:
        return claim_holds(self.claim, self.verdict, self.inputs, self.dtype, self.witness)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("max_abs_error", "max_error_over_bound"):  # JSON has no inf/nan
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> Result:
        num = {k: None if d[k] is None else float(d[k]) for k in ("max_abs_error", "max_error_over_bound")}
        return cls(**{**d, **num})


def claim_holds(claim: str | None, verdict: str, inputs: str, dtype: str, witness: str | None = None) -> bool:
    """Does this verdict contradict the claim? `bitwise` and `equivalent` are universal
    claims (any failure contradicts them); `unstable` and `inequivalent` claim that a
    counterexample exists, which the Hypothesis search must find; real GPT-2 inputs may
    well be benign for them. An instability may show in one dtype only (a leak at logits
    that only float64 can hold): it is enough that the search found it in one of the
    CLAIM_DTYPES (`witness`), if the other dtypes at least stay within the bound. Only
    CLAIM_DTYPES are held to the claim."""
    if claim is None or dtype not in CLAIM_DTYPES:
        return True
    if verdict == "error":
        return False
    if claim == "bitwise":
        return verdict == "bitwise"
    if claim == "equivalent":
        return verdict in ("bitwise", "equivalent")
    if inputs == "gpt2":
        return True
    if claim == "unstable" and witness is not None:
        return verdict in ("bitwise", "equivalent", "unstable")
    return verdict == claim


# --- running one rewrite on one problem -------------------------------------------------


_KEYS: weakref.WeakKeyDictionary[AttentionProblem, str] = weakref.WeakKeyDictionary()


def _key(problem: AttentionProblem) -> str:
    """A content hash, computed once per problem object (a real layer is ~14 MB)."""
    if problem not in _KEYS:
        h = hashlib.sha1(repr((problem.n_head, problem.x.shape)).encode())
        for a in problem.arrays():
            h.update(a.tobytes())
        _KEYS[problem] = h.hexdigest()
    return _KEYS[problem]


class Cache:
    """Oracle outputs (and, through properties.checks, truths), shared by all rewrites (they see the same examples)."""

    def __init__(self, limit: int = 20000) -> None:
        self.limit, self.items = limit, {}

    def get(self, key: tuple, make: Callable):
        if key not in self.items:
            if len(self.items) >= self.limit:
                self.items.pop(next(iter(self.items)))
            self.items[key] = make()
        return self.items[key]

    def truth(self, problem: AttentionProblem, backend: str, dtype: str) -> Truth:
        return truth_for(problem, backend, dtype)  # the project's one truth cache

    def oracle(self, problem: AttentionProblem, backend: str, dtype: str) -> np.ndarray:
        return self.get(("oracle", _key(problem), backend, dtype), lambda: oracles.run(backend, problem, dtype))


@functools.cache
def _jitted(fn: Callable) -> Callable:
    """JAX: one compilation per rewrite and shape, instead of one per primitive and shape
    in eager mode (loops such as a KV cache create a new shape at every step)."""
    import jax

    return jax.jit(fn, static_argnums=5)


def run_rewrite(rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem) -> np.ndarray:
    """The rewrite's float64 output, or RewriteFailed naming what went wrong."""
    be = backends.get(backend)
    impl = rw.implementation(backend)
    if impl is None:
        raise RewriteFailed(rw.load_error or f"{rw.name} has no implementation for {backend}")
    if backend == "jax":
        impl = _jitted(impl)
    try:
        out = impl(*oracles.as_backend(problem, backend, dtype), problem.n_head)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise RewriteFailed(f"raised {type(e).__name__}: {first_line}") from e
    want = (*problem.x.shape[:-2], 1 if rw.output == "last" else problem.n_seq, problem.n_embd)
    shape, got_dtype = tuple(getattr(out, "shape", ())), str(getattr(out, "dtype", type(out).__name__))
    if shape != want:
        raise RewriteFailed(f"returned shape {list(shape)}, expected {list(want)} ({rw.output} output)")
    if got_dtype.rsplit(".", 1)[-1] != dtype:
        raise RewriteFailed(f"returned {got_dtype} for {dtype} inputs")
    return be.to_numpy(out)


@dataclass
class Outcome:
    ratio: float  # max |error| / bound
    abs_error: float
    bitwise: bool
    nonfinite: bool


def outcome(rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem, cache: Cache, bitwise: bool) -> Outcome:
    out = run_rewrite(rw, backend, dtype, problem)
    truth = cache.truth(problem, backend, dtype)
    sl = np.s_[..., -1:, :] if rw.output == "last" else np.s_[...]
    expected, tol = truth.out[sl], truth.tolerance(dtype)[sl]
    ratio = excess(out, expected, tol)
    finite = bool(np.isfinite(out).all())
    abs_err = float(np.abs(out - expected).max()) if finite else math.inf
    same = bitwise and np.array_equal(out, cache.oracle(problem, backend, dtype)[sl])
    return Outcome(ratio, abs_err, same, not finite)


# --- Hypothesis searches --------------------------------------------------------------------


@dataclass
class Search:
    """What one search saw: the shrunk failing problem (if any) and the tallies."""

    failure: AttentionProblem | None = None
    message: str = ""
    error: str | None = None
    examples: int = 0  # examples evaluated in all
    to_find: int | None = None  # examples it took to find the first failure
    max_ratio: float = 0.0
    max_abs: float = 0.0
    bitwise: bool = True
    stats: dict = field(default_factory=dict)


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


def search(strategy, failing: Callable[[AttentionProblem], str | None], examples: int, s: Search) -> Search:
    """Look for a problem where `failing` returns a message; shrink it; count into `s`."""
    without_local_constants()

    def condition(problem: AttentionProblem) -> bool:
        s.examples += 1
        msg = failing(problem)
        if msg is not None and s.to_find is None:
            s.to_find = s.examples
        return msg is not None

    opts = settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    try:
        s.failure = find(strategy, condition, settings=opts)
        s.message = failing(s.failure) or ""
    except NoSuchExample:
        pass
    return s


def _scan(rw: Rewrite, backend: str, dtype: str, cache: Cache, s: Search, stage: str):
    """The failure test of a stage, recording tallies into `s`."""

    @np.errstate(all="ignore")  # overflow and NaN are what is being looked for here
    def failing(problem: AttentionProblem) -> str | None:
        truth = cache.truth(problem, backend, dtype)
        if stage == "dtype" and not representable(truth, dtype):
            return None  # no correct computation in this dtype exists: not evidence
        try:
            o = outcome(rw, backend, dtype, problem, cache, s.bitwise and stage == "dtype")
        except RewriteFailed as e:
            s.error = s.error or str(e)
            return f"error: {e}"
        s.bitwise &= o.bitwise
        s.max_ratio, s.max_abs = max(s.max_ratio, o.ratio), max(s.max_abs, o.abs_error)
        if stage == "float64" and o.nonfinite:
            s.error = s.error or "returned NaN or inf on moderate float64 inputs"
            return f"error: {s.error}"
        if o.ratio > 1:
            what = "non-finite output" if o.nonfinite else f"error {o.abs_error:.3g} is {o.ratio:.3g}x the bound"
            return f"{what} in {dtype}"
        return None

    return failing


# --- verdicts ---------------------------------------------------------------------------------


class Verifier:
    def __init__(self, config: Config, progress: Callable[[str], None] = lambda m: None) -> None:
        self.config, self.progress, self.cache = config, progress, Cache()
        self._gpt2: list[AttentionProblem] | None = None
        self._written: set[Path] = set()
        self.throughput: list[dict] = []  # Hypothesis examples per second, per rewrite and backend
        self.worker_compilations = 0  # JAX compilations in worker processes
        count_jax_compilations()

    def _verdicts(
        self,
        rw: Rewrite,
        backend: str,
        inputs: str,
        in_float64: Callable[[], Search],
        in_dtype: Callable[[str], Search],
    ) -> list[Result]:
        """Steps 1-3 of the module doc for one input source: a float64 failure makes the
        rewrite inequivalent in every dtype; else each dtype's own search decides."""
        dtypes = [d for d in self.config.dtypes if d in backends.get(backend).dtypes]
        base = dict(rewrite=rw.name, family=rw.family, backend=backend, inputs=inputs, claim=rw.claim, source=rw.source)
        if rw.load_error:
            return [
                Result(**base, dtype=d, verdict="error", max_abs_error=None, max_error_over_bound=None, examples=0,
                       counterexample={"message": rw.load_error})
                for d in dtypes
            ]  # fmt: skip
        s64 = in_float64()
        results = []
        for dtype in dtypes:
            s = s64 if s64.failure is not None else in_dtype(dtype)
            if s.failure is None:
                verdict, ce = ("bitwise" if s.bitwise else "equivalent"), None
            else:
                verdict = "error" if s.error else ("inequivalent" if s is s64 else "unstable")
                ce = self._counterexample(rw, backend, s64.stats["dtype"] if s is s64 else dtype, s, inputs)
            examples = s.examples + (0 if s is s64 else s64.examples)
            results.append(Result(**base, dtype=dtype, verdict=verdict, max_abs_error=s.max_abs,
                                  max_error_over_bound=s.max_ratio, examples=examples, counterexample=ce))  # fmt: skip
        witness = next((r.dtype for r in results if r.verdict == "unstable" and r.dtype in CLAIM_DTYPES), None)
        for r in results:
            r.witness = witness
        return results

    def hypothesis_results(self, rw: Rewrite, backend: str) -> list[Result]:
        def run(strategy, dtype: str, stage: str) -> Search:
            s = Search(stats={"dtype": dtype})
            return search(strategy, _scan(rw, backend, dtype, self.cache, s, stage), self.config.examples, s)

        return self._verdicts(rw, backend, "hypothesis", lambda: run(MODERATE_PROBLEMS, "float64", "float64"),
                              lambda dtype: run(EXTREME_PROBLEMS, dtype, "dtype"))  # fmt: skip

    def _counterexample(self, rw: Rewrite, backend: str, dtype: str, s: Search, inputs: str) -> dict:
        p = s.failure
        path = self.config.report_dir / "counterexamples" / f"{rw.name}-{backend}-{dtype}-{inputs}.npz"
        if path not in self._written:  # one float64 failure stands for every dtype
            meta = dict(rewrite=rw.name, backend=backend, dtype=dtype, output=rw.output)
            if inputs == "gpt2":  # a real layer: its weights are GPT-2's, so only x and the layer are saved
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, x=p.x, n_head=p.n_head, label=p.label, gpt2_layer=s.stats["layer"], **meta)
            else:
                p.save(path, **meta)
            self._written.add(path)
        return {
            "file": str(path),
            "problem": p.describe(),
            "shape": {"batch": list(p.x.shape[:-2]), "n_seq": p.n_seq, "n_head": p.n_head, "head_dim": p.head_dim},
            "message": s.message,
            "examples_to_find": s.to_find,
            "replay": f"attention-rewrites replay {path}",
        }

    # real GPT-2 inputs
    def gpt2_problems(self) -> list[AttentionProblem]:
        if self._gpt2 is None:
            w = gpt2.load(self.config.gpt2_weights)
            x = gpt2.synthetic_stream(w, self.config.gpt2_n_seq, seed=0)
            streams = gpt2.attention_path(w, x, w.config.n_layer - 1)
            self._gpt2 = [
                layer.problem(layer_norm(stream, layer.ln_g, layer.ln_b, layer.eps))
                for layer, stream in zip(w.layers(), streams, strict=True)
            ]
        return self._gpt2

    def gpt2_results(self, rw: Rewrite, backend: str) -> list[Result]:
        def sweep(dtype: str, stage: str) -> Search:
            s = Search(stats={"dtype": dtype})
            failing = _scan(rw, backend, dtype, self.cache, s, stage)
            for i, p in enumerate(self.gpt2_problems()):
                s.examples += 1
                msg = failing(p)
                if msg is not None and s.failure is None:
                    s.failure, s.message, s.to_find, s.stats["layer"] = p, msg, i + 1, np.int64(i)
            return s

        return self._verdicts(rw, backend, "gpt2", lambda: sweep("float64", "float64"), lambda d: sweep(d, "dtype"))

    def verify_one(self, rw: Rewrite, backend_names: Iterable[str], gpt2_inputs: bool = True) -> list[Result]:
        results: list[Result] = []
        for backend in backend_names:
            start = time.perf_counter()
            rs = self.hypothesis_results(rw, backend)
            seconds = time.perf_counter() - start
            examples = sum(r.examples for r in rs)
            self.throughput.append(
                {
                    "rewrite": rw.name,
                    "backend": backend,
                    "examples": examples,
                    "seconds": round(seconds, 3),
                    "examples_per_s": round(examples / seconds, 1),
                }
            )
            results += rs
            if gpt2_inputs:
                results += self.gpt2_results(rw, backend)
        release_jax_executables()
        return results

    def verify(
        self, rewrites: Iterable[Rewrite], backend_names: Iterable[str], gpt2_inputs: bool = True, jobs: int = 1
    ) -> list[Result]:
        """Verdicts for every rewrite on every backend, in catalogue order. With jobs > 1,
        rewrites are shared out to worker processes (each finds the catalogue and plugins
        itself, so rewrites travel by name)."""
        rewrites, names = list(rewrites), list(backend_names)
        done: dict[str, list[Result]] = {}
        start = time.perf_counter()

        def report(rw_name: str, rs: list[Result]) -> None:
            done[rw_name] = rs
            bad = sorted({r.backend for r in rs if not r.claim_holds})
            status = "ok" if not bad else f"claim contradicted on {', '.join(bad)}"
            self.progress(f"[{len(done)}/{len(rewrites)}] {rw_name}: {status} ({time.perf_counter() - start:.0f}s)")

        if jobs <= 1 or len(rewrites) <= 1:
            for rw in rewrites:
                report(rw.name, self.verify_one(rw, names, gpt2_inputs))
        else:
            ctx = multiprocessing.get_context("spawn")  # JAX and PyTorch threads do not survive fork
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start_worker, initargs=(self.config,)) as pool:
                futures = {pool.submit(_work, rw.name, names, gpt2_inputs): rw.name for rw in rewrites}
                for future in as_completed(futures):
                    rs, throughput, compiles = future.result()
                    self.throughput += throughput
                    self.worker_compilations += compiles
                    report(futures[future], rs)
        return [r for rw in rewrites for r in done[rw.name]]


_WORKER: Verifier | None = None


def _start_worker(config: Config) -> None:
    global _WORKER
    _WORKER = Verifier(config)


def _work(name: str, backend_names: list[str], gpt2_inputs: bool) -> tuple[list[Result], list[dict], int]:
    from rewrites.registry import catalogue

    before, n = JAX_COMPILATIONS[0], len(_WORKER.throughput)
    results = _WORKER.verify_one(catalogue(names=[name])[0], backend_names, gpt2_inputs)
    return results, _WORKER.throughput[n:], JAX_COMPILATIONS[0] - before


JAX_COMPILATIONS = [0]  # XLA compilations seen in this process


def release_jax_executables() -> None:
    """Drop JAX's compiled executables. Each maps code pages: about 2,000 new mappings per
    rewrite, and one process verifying the whole catalogue passed Linux's default limit of
    65,530 (vm.max_map_count) and crashed inside XLA. The outputs stay in `Cache`."""
    import sys

    if "jax" in sys.modules:
        import jax

        _jitted.cache_clear()
        jax.clear_caches()


@functools.cache
def count_jax_compilations() -> None:
    """Count every XLA compilation JAX triggers in this process (once JAX is importable)."""
    if backends.unavailable_reason("jax"):
        return
    import jax.monitoring

    def listen(event: str, _duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            JAX_COMPILATIONS[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)


def load_counterexample(path: str | Path, weights: str | None = None) -> tuple[AttentionProblem, dict]:
    """A saved counterexample: the problem (real weights reloaded for GPT-2 ones) and its metadata."""
    with np.load(path) as f:
        meta = {k: f[k].item() for k in ("rewrite", "backend", "dtype", "output", "gpt2_layer") if k in f}
        x = np.asarray(f["x"], np.float64) if "gpt2_layer" in f else None
    if x is None:
        return AttentionProblem.load(path), meta
    return gpt2.load(weights).layer(int(meta["gpt2_layer"])).problem(x), meta
