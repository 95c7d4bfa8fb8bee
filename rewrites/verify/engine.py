"""The verifier: for each rewrite and backend, the searches on both input sources, their
decisions made into Results with saved counterexamples."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oracles import backends, gpt2
from oracles.problem import AttentionProblem
from rewrites.verify import counterexamples, inputs, invariance
from rewrites.verify.database import open_database
from rewrites.verify.decide import Decision, Run, decide, witness
from rewrites.verify.judge import References
from rewrites.verify.record import Search, Stage
from rewrites.verify.search import hypothesis_search, sweep
from rewrites.verify.verdicts import Counterexample, Inputs, Result, Verdict

if TYPE_CHECKING:
    from rewrites.registry import Rewrite


@dataclass(frozen=True)
class Config:
    examples: int = 30  # Hypothesis examples per search (effort in examples, not seconds: reproducible)
    gpt2_n_seq: int | None = None  # None: the real-layer plan of inputs.py; N: every layer at N tokens
    real_layer: int | None = None  # None: the plan's layer per rewrite and backend; N: layer N for all
    gpt2_weights: str | None = None
    report_dir: Path = Path("report")
    dtypes: tuple[str, ...] = backends.DTYPES
    explicit_examples: bool = True  # try inputs.known_hard() before each synthetic search
    profile: inputs.Profile = inputs.FULL  # how far the searches go
    device: str = field(default_factory=backends.device)  # where PyTorch and JAX compute (backends.use_device)
    database: str | None = None  # the example database (database.open_database): None, a folder, module:attr
    seed: int | None = None  # None: derandomised searches, the same problems every run; else this seed's
    invariance: bool = True  # measure the bitwise invariances beside each verdict (invariance.py)

    def dtypes_on(self, backend: str) -> list[str]:
        """The dtypes a rewrite is judged in on `backend`: the config's that the backend has."""
        return [d for d in self.dtypes if d in backends.get(backend).dtypes]


@dataclass(frozen=True)
class Throughput:
    """How fast the Hypothesis searches of one rewrite x backend went."""

    rewrite: str
    backend: str
    examples: int
    seconds: float
    examples_per_s: float


@dataclass
class Verifier:
    config: Config
    progress: Callable[[str], None] = lambda m: None
    refs: References = field(default_factory=References)
    throughput: list[Throughput] = field(default_factory=list)
    _gpt2: inputs.RealLayers | None = field(default=None, init=False)
    _known_hard: dict[Stage, list[AttentionProblem]] = field(default_factory=dict, init=False)
    _written: set[Path] = field(default_factory=set, init=False)  # files saved (one search may decide several dtypes)

    def __post_init__(self) -> None:
        backends.use_device(self.config.device)  # this process computes where the config says

    def hypothesis_results(self, rw: Rewrite, backend: str) -> list[Result]:
        if not self._known_hard:
            on = self.config.explicit_examples
            most = self.config.profile.explicit_up_to
            hard = {stage: inputs.known_hard(stage is Stage.FORMULA) if on else [] for stage in Stage}
            self._known_hard = {stage: [p for p in ps if most is None or p.n_seq <= most] for stage, ps in hard.items()}

        def run(dtype: str, stage: Stage, first: Search | None) -> Search:
            profile = self.config.profile.on(backends.get(backend))
            bands = profile.bands(stage is Stage.FORMULA, dtype)
            explicit = ([first.failure] if first else []) + self._known_hard[stage]
            if rw.kv_heads != "all":  # grouped-KV kernels see problems with tied k, v heads
                bands, explicit = tuple(b.map(rw.takes) for b in bands), [rw.takes(p) for p in explicit]
            if rw.layout != "dense":  # padded or packed rewrites: the same problems with a layout
                bands = inputs.laid_out(bands, rw.layout)
                explicit = [inputs.with_layout(p, rw.layout) for p in explicit]
            # replaying float64's failure in another dtype: its bits count too (`bitwise` is about every output seen)
            hint = first.first_fails_at if first else None
            s = Search(rw, backend, dtype, stage, cut_hint=hint, bits_too=first is not None)
            # Another dtype's search for float64's formula failure (decide.py): what it finds
            # is the same fault, already shrunk and diagnosed in float64; shrinking it again
            # took most of these searches' time (the cut still makes its length exact).
            db, seed = open_database(self.config.database), self.config.seed
            return hypothesis_search(bands, s, self.refs, self.config.examples, explicit, first is None, db, seed,
                                     profile.shrink_up_to)  # fmt: skip

        return self._results(rw, backend, Inputs.HYPOTHESIS, run)

    def real_layers(self) -> inputs.RealLayers:
        if self._gpt2 is None:
            n_seq = self.real_n_seq or inputs.FULL_CONTEXT
            self._gpt2 = inputs.RealLayers(gpt2.load(self.config.gpt2_weights), n_seq, seed=0)
        return self._gpt2

    @property
    def real_n_seq(self) -> int | None:
        return self.config.gpt2_n_seq or self.config.profile.real_n_seq

    def gpt2_results(self, rw: Rewrite, backend: str, found: Iterable[Result] = ()) -> list[Result]:
        """The real-layer verdicts; `found`: the synthetic search's results, whose first
        failing lengths each dtype's cut tries first (a real layer cut at 1024 tokens would
        otherwise climb the length ladder, a rewrite run and a truth at every rung)."""
        # float64's formula sweep, bits compared: its dtype sweep would run the same layers
        # again (real inputs have no extreme magnitudes), so where it passed it stands in
        passed64: list[Search] = []
        synthetic = {r.dtype: r.counterexample.first_fails_at for r in found if r.counterexample}

        def run(dtype: str, stage: Stage, first: Search | None) -> Search:
            if stage is Stage.DTYPE and dtype == "float64" and first is None and passed64:
                return dataclasses.replace(passed64[0], stage=Stage.DTYPE, examples=0, seconds=0.0)
            n_layer, pinned = len(self.real_layers().full), self.config.real_layer
            plan = inputs.real_plan(rw.name, backend, dtype, n_layer, self.real_n_seq, pinned)
            problems = ([(first.layer, first.failure)] if first else []) + self.real_layers().problems(plan)
            # as is, unless grouped KV (heads tied) or padded or packed (a fixed layout)
            problems = [(layer, inputs.with_layout(rw.takes(p), rw.layout)) for layer, p in problems]
            hint = first.first_fails_at if first else synthetic.get(dtype)
            bits_too = stage is Stage.FORMULA and (dtype == "float64" or first is not None)
            s = sweep(problems, Search(rw, backend, dtype, stage, cut_hint=hint, bits_too=bits_too), self.refs)
            if bits_too and dtype == "float64" and s.failure is None:
                passed64.append(s)
            return s

        return self._results(rw, backend, Inputs.GPT2, run)

    def _results(
        self,
        rw: Rewrite,
        backend: str,
        inputs: Inputs,
        run: Run,
    ) -> list[Result]:
        dtypes = self.config.dtypes_on(backend)
        base = dict(rewrite=rw.name, family=rw.family, backend=backend, inputs=inputs, claim=rw.claim, source=rw.source)
        if rw.load_error:
            ce = Counterexample(message=rw.load_error)
            return [
                Result(**base, dtype=d, verdict=Verdict.ERROR, max_abs_error=None, max_error_over_bound=None,
                       examples=0, counterexample=ce)
                for d in dtypes
            ]  # fmt: skip
        decisions = decide(run, dtypes)
        w = witness(decisions, rw.claim)
        return [self._result(base, d, inputs, w) for d in decisions]

    def _result(self, base: dict, d: Decision, inputs: Inputs, w: str | None) -> Result:
        s = d.search
        ce = None
        if s.failure is not None:
            path = counterexamples.path_for(self.config.report_dir, s, inputs)
            if path not in self._written:
                counterexamples.save(path, s)
                self._written.add(path)
            ce = counterexamples.describe(path, s)
        return Result(**base, dtype=d.dtype, verdict=d.verdict, max_abs_error=s.max_abs,
                      max_error_over_bound=s.max_ratio, examples=d.examples, counterexample=ce, witness=w,
                      cut_to=d.cut_to, precision=s.effective_precision, seconds=round(d.seconds, 3),
                      diagnosis=list(s.findings) if s.failure is not None else [])  # fmt: skip

    def verify_one(
        self, rw: Rewrite, backend_names: Iterable[str], gpt2_inputs: bool = True, invariances: bool = True
    ) -> list[Result]:
        """Every verdict of one rewrite on the given backends, each with its invariances
        (unless `invariances` is False or the config turns them off)."""
        results: list[Result] = []
        for backend in (b for b in backend_names if rw.runs_on(b)):
            start = time.perf_counter()
            rs = self.hypothesis_results(rw, backend)
            seconds = time.perf_counter() - start
            examples = sum(r.examples for r in rs)
            self.throughput.append(
                Throughput(rw.name, backend, examples, round(seconds, 3), round(examples / seconds, 1))
            )
            if gpt2_inputs:
                rs += self.gpt2_results(rw, backend, rs)
            if invariances and self.config.invariance:
                found = self.invariances(rw, backend, gpt2_inputs)
                rs = [dataclasses.replace(r, invariance=found.get(r.dtype)) for r in rs]
            results += rs
            backends.get(backend).release()
        return results

    def invariances(self, rw: Rewrite, backend: str, gpt2_inputs: bool = True) -> dict[str, dict]:
        """The backend's invariances of `rw` per dtype (invariance.py), on the synthetic
        problem and, with the real layers, the rewrite's real layer; a dtype this process
        has seen the rewrite nondeterministic in (its searches) says so. Nothing for a plugin
        that did not load (its verdicts are `error`s saying why)."""
        if rw.load_error:
            return {}
        sources = [invariance.synthetic()]
        if gpt2_inputs and self.real_layers().full[0].n_seq >= invariance.PREFIX[1]:  # not with --gpt2-n-seq 16
            layers = self.real_layers().full
            layer = inputs.real_layer(rw.name, backend, len(layers), self.config.real_layer)
            sources.append(invariance.real(layers, layer))
        dtypes = self.config.dtypes_on(backend)
        return {d: dataclasses.asdict(invariance.measure(rw, backend, d, sources)) for d in dtypes}

    def verify(
        self, rewrites: Iterable[Rewrite], backend_names: Iterable[str], gpt2_inputs: bool = True, jobs: int = 1
    ) -> list[Result]:
        """Verdicts for every rewrite on every backend, in catalogue order; with jobs > 1,
        in worker processes (rewrites/verify/workers.py)."""
        from rewrites.verify import workers

        rewrites, names = list(rewrites), list(backend_names)
        done: dict[str, list[Result]] = {}
        start = time.perf_counter()

        def report(rw_name: str, rs: Sequence[Result]) -> None:
            done[rw_name] = list(rs)
            bad = sorted({r.backend for r in rs if not r.claim_holds})
            status = "ok" if not bad else f"claim contradicted on {', '.join(bad)}"
            self.progress(f"[{len(done)}/{len(rewrites)}] {rw_name}: {status} ({time.perf_counter() - start:.0f}s)")

        if jobs <= 1 or len(rewrites) <= 1:
            for rw in rewrites:
                report(rw.name, self.verify_one(rw, names, gpt2_inputs))
        else:
            for name, rs, throughput in workers.run(self.config, rewrites, names, gpt2_inputs, jobs):
                self.throughput += throughput
                report(name, rs)
        return [r for rw in rewrites for r in done.get(rw.name, [])]
