"""The command line: `attention-rewrites {oracles,verify,list,replay}` (also `python -m rewrites`)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from oracles import backends, gpt2


def progress(msg: str) -> None:
    """One line of progress on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def cmd_oracles(args: argparse.Namespace) -> int:
    """Agreement of each oracle with the float64 truth on the real GPT-2 layers."""
    import oracles
    from oracles.truth import layer_norm

    weights = gpt2.load(args.gpt2_weights)
    names = args.backend or backends.available()
    dtypes = args.dtype or ["float32"]
    streams = gpt2.attention_path(
        weights, gpt2.synthetic_stream(weights, args.n_seq, seed=0), weights.config.n_layer - 1
    )
    rows = []
    for i, layer in enumerate(weights.layers()):
        start = time.perf_counter()
        problem = layer.problem(layer_norm(streams[i], layer.ln_g, layer.ln_b, layer.eps))
        truth = oracles.ground_truth(problem)  # weights are float32, h rounds per dtype below
        for name in names:
            for dtype in dtypes:
                if dtype not in backends.get(name).dtypes:
                    continue
                t = truth if dtype in ("float64",) else oracles.ground_truth(oracles.rounded(problem, name, dtype))
                err = np.abs(oracles.run(name, problem, dtype) - t.out)
                tol = t.tolerance(dtype)
                rows.append([i, name, dtype, f"{err.max():.3g}", f"{tol.max():.3g}", f"{np.max(err / tol):.2g}"])
        progress(f"layer {i + 1}/{weights.config.n_layer} done ({time.perf_counter() - start:.1f}s)")
    print(f"Oracles vs float64 truth, real GPT-2 layers ({weights.path}), n_seq={args.n_seq}")
    print(_table(["layer", "backend", "dtype", "max |error|", "max bound", "max error/bound"], rows))
    worst = max(float(r[-1]) for r in rows)
    print(f"\nworst error/bound: {worst:.2g} ({'all within the derived bound' if worst <= 1 else 'BOUND EXCEEDED'})")
    return 0 if worst <= 1 else 1


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (gpt2.WeightsError, backends.BackendUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
