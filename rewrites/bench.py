"""Benchmarks (never timed tests): the O(N) claim on the real GPT-2 layer weights.

For each installed backend and n_seq, float32, real layer 0: the full sublayer (the
backend's oracle), the last-token-only sublayer, and one KV-cache decoding step at that
position; the score matmul alone for the full and the last-token forms; the growth
exponents fitted on log-log; GFLOP/s of the full sublayer against this machine's measured
float32 matmul peak. Medians of repeated runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

import oracles
from oracles import backends, gpt2
from rewrites.catalogue.last_token import last_token_absorbed, last_token_only
from rewrites.stack import attend_cached

N_SEQ = (64, 128, 256, 512, 1024)


def median_time(
    fn: Callable[[], object], sync: Callable[[object], object], min_total: float = 0.3, min_runs: int = 5
) -> float:
    """Median seconds of fn() over at least `min_runs` runs and `min_total` seconds, after a warm-up."""
    sync(fn())
    times: list[float] = []
    while len(times) < min_runs or (sum(times) < min_total and len(times) < 200):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(backend: str, size: int = 2048) -> float:
    """Measured float32 GFLOP/s of a square matmul: the machine's practical limit."""
    be = backends.get(backend)
    rng = np.random.default_rng(0)
    a, b = (be.asarray(rng.normal(size=(size, size)), "float32") for _ in range(2))
    mm = be.compile(lambda a, b: a @ b)
    return 2 * size**3 / median_time(lambda: mm(a, b), be.synchronize, min_total=1.0) / 1e9


def sublayer_flops(n: int, e: int) -> float:
    """FLOPs of the plain computation: qkv, full n x n scores and weights @ v, c_proj."""
    return 2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e


def fit_exponent(ns, ts) -> float:
    """Slope of log(time) against log(n), least squares."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def bench_backend(backend: str, layer: gpt2.AttentionLayer, x: np.ndarray, progress) -> dict:
    be = backends.get(backend)
    sync = be.synchronize
    w = [be.asarray(a, "float32") for a in (layer.c_attn_w, layer.c_attn_b, layer.c_proj_w, layer.c_proj_b)]
    full = be.compile(oracles.oracle(backend).attention, (5,))
    last = be.compile(last_token_only.fn, (5,))
    absorbed = be.compile(last_token_absorbed.fn, (5,))
    h = layer.n_head
    hd = x.shape[-1] // h
    # one decoding step at the last slot of a full cache, exactly as `stack.decode` runs it
    step = be.compile(lambda x_t, k, v, *ws: attend_cached(be.namespace, x_t, k.shape[-2] - 1, k, v, *ws, h)[0])
    scores = be.compile(lambda q, k: q @ be.namespace.matrix_transpose(k))
    rows = []
    for n in N_SEQ:
        xs = be.asarray(x[:n], "float32")
        rng = np.random.default_rng(n)
        k_cache, v_cache = (be.asarray(rng.normal(size=(h, n, hd)), "float32") for _ in range(2))
        q_all, k_all = (be.asarray(rng.normal(size=(h, n, hd)), "float32") for _ in range(2))
        q_last = be.asarray(rng.normal(size=(h, 1, hd)), "float32")
        row = {
            "n_seq": n,
            "full_s": median_time(partial(full, xs, *w, h), sync),
            "last_token_s": median_time(partial(last, xs, *w, h), sync),
            "last_absorbed_s": median_time(partial(absorbed, xs, *w, h), sync),
            "kv_step_s": median_time(partial(step, xs[-1:], k_cache, v_cache, *w), sync),
            "scores_full_s": median_time(partial(scores, q_all, k_all), sync),
            "scores_last_s": median_time(partial(scores, q_last, k_all), sync),
        }
        row["full_gflops"] = sublayer_flops(n, x.shape[-1]) / row["full_s"] / 1e9
        rows.append(row)
        progress(f"bench {backend} n_seq={n}: full {row['full_s'] * 1e3:.2f} ms, "
                 f"last {row['last_token_s'] * 1e3:.2f} ms, absorbed {row['last_absorbed_s'] * 1e3:.2f} ms, "
                 f"kv step {row['kv_step_s'] * 1e3:.3f} ms")  # fmt: skip
    ns = [r["n_seq"] for r in rows]
    fits = {k: fit_exponent(ns, [r[k] for r in rows]) for k in rows[0] if k.endswith("_s")}
    peak = matmul_peak(backend)
    top = rows[-1]
    return {
        "rows": rows,
        "exponents": fits,
        "matmul_peak_gflops": peak,
        "full_fraction_of_peak_at_max_n": top["full_gflops"] / peak,
        "last_token_speedup_at_max_n": top["full_s"] / top["last_token_s"],
        "last_absorbed_speedup_at_max_n": top["full_s"] / top["last_absorbed_s"],
        "kv_step_speedup_at_max_n": top["full_s"] / top["kv_step_s"],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"full_s": "-", "last_token_s": "--", "last_absorbed_s": "-.", "kv_step_s": ":"}
    for backend, res in results.items():
        ns = [r["n_seq"] for r in res["rows"]]
        for key, ls in styles.items():
            ts = [r[key] * 1e3 for r in res["rows"]]
            ax.loglog(ns, ts, ls, marker="o", label=f"{backend} {key[:-2]} (slope {res['exponents'][key]:.2f})")
    ax.set_xlabel("n_seq")
    ax.set_ylabel("median time (ms)")
    ax.set_title("GPT-2 attention sublayer (real layer 0, float32)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """The CPU model (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(report_dir: Path, backend_names: list[str], weights_path: str | None, progress, ranking: bool = True) -> dict:
    weights = gpt2.load(weights_path)
    layer = weights.layer(0)
    x = gpt2.synthetic_stream(weights, max(N_SEQ), seed=0)
    h = layer.block_input(x).x
    results = {}
    for b in backend_names:
        results[b] = bench_backend(b, layer, h, progress)
        if ranking:
            results[b]["ranking"] = rank(b, layer, h, report_dir, results[b]["matmul_peak_gflops"], progress)
    report_dir.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    (report_dir / "bench.json").write_text(json.dumps({"meta": meta, "backends": results}, indent=1))
    plot(results, report_dir / "bench.png")
    return results


def summary(results: dict) -> str:
    lines = []
    for backend, r in results.items():
        e = r["exponents"]
        lines.append(
            f"{backend}: at n_seq {N_SEQ[-1]} last-token {r['last_token_speedup_at_max_n']:.1f}x faster than full, "
            f"absorbed last-token {r['last_absorbed_speedup_at_max_n']:.0f}x, "
            f"KV step {r['kv_step_speedup_at_max_n']:.0f}x cheaper; exponents full {e['full_s']:.2f}, "
            f"last {e['last_token_s']:.2f}, absorbed {e['last_absorbed_s']:.2f}, scores full {e['scores_full_s']:.2f}, "
            f"scores last {e['scores_last_s']:.2f}; "
            f"full sublayer {r['rows'][-1]['full_gflops']:.1f} GFLOP/s = "
            f"{100 * r['full_fraction_of_peak_at_max_n']:.0f}% of the {r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak"
        )
    for backend, r in results.items():
        if "ranking" in r:
            lines += ["", ranking_table(backend, r["ranking"])]
    return "\n".join(lines)


def ranking_table(backend: str, ranking: dict) -> str:
    """Markdown: the rewrites fastest first, against the oracle, at n_seq RANK_N."""
    from rewrites.report import markdown_table

    rows = []
    for r in ranking["rows"]:
        t = r["seconds"]
        rows.append([
            r["rewrite"], r["output"], {"verified": "yes", UNVERIFIED: "no verdict"}.get(r["status"], r["status"]),
            "-" if t is None else f"{t * 1e3:.2f}",
            "-" if t is None else f"{r['speedup_vs_oracle']:.2f}x",
            f"{r['gflops']:.0f} ({100 * r['fraction_of_peak']:.0f}%)" if "gflops" in r else "-",
            r["note"],
        ])  # fmt: skip
    title = (f"{backend}: equivalent rewrites by speed, real layer 0, float32, n_seq {ranking['n_seq']} "
             f"(oracle {ranking['oracle_s'] * 1e3:.2f} ms)")  # fmt: skip
    header = ["rewrite", "output", "verified", "ms", "vs oracle", "GFLOP/s (% of peak)", "note"]
    return title + "\n" + markdown_table(header, rows)


# --- the equivalent rewrites ranked by speed -------------------------------------------------

RANK_N = N_SEQ[-1]
UNVERIFIED = "unverified (not in verdicts.json: run `attention-rewrites verify` first)"
BUDGET_S = 5.0  # a rewrite predicted to need longer than this for one call at RANK_N is not timed there


def verified_status(report_dir: Path) -> dict[tuple[str, str], str]:
    """(rewrite, backend) -> "verified" when every float32 verdict of the last `verify` run
    (report_dir/verdicts.json) is bitwise or equivalent, else the first other verdict."""
    from rewrites.verify import Result

    path = report_dir / "verdicts.json"
    if not path.exists():
        return {}
    status: dict[tuple[str, str], str] = {}
    for r in map(Result.from_json, json.loads(path.read_text())["results"]):
        if r.dtype != "float32":
            continue
        key = (r.rewrite, r.backend)
        if status.get(key, "verified") == "verified":
            status[key] = "verified" if r.verdict.holds_equivalence else r.verdict.value
    return status


def _time_rewrite(fn: Callable, be, sync, x: np.ndarray, w: list, h: int) -> tuple[float | None, str]:
    """Median seconds of one call at RANK_N, climbing n_seq 16 -> 64 -> 256 -> RANK_N and
    giving up where the next rung would pass BUDGET_S: a call's time times 16 (a quadratic
    Python loop), or its first call's (JAX: compilation, which grows with an unrolled loop) times 4."""
    for n in (16, 64, 256, RANK_N):
        xs = be.asarray(x[:n], "float32")
        start = time.perf_counter()
        sync(fn(xs, *w, h))
        first = time.perf_counter() - start
        start = time.perf_counter()
        sync(fn(xs, *w, h))
        again = time.perf_counter() - start
        if n < RANK_N and (16 * again > BUDGET_S or 4 * first > BUDGET_S):
            return None, f"not timed at n_seq {RANK_N}: a call took {again:.2f}s ({first:.2f}s the first) at n_seq {n}"
    return median_time(partial(fn, xs, *w, h), sync, min_runs=3 if again > 1 else 5), ""


def rank(backend: str, layer: gpt2.AttentionLayer, x: np.ndarray, report_dir: Path, peak: float, progress) -> dict:
    """Every rewrite claimed or verified equivalent, timed on the real layer at n_seq RANK_N
    against `backend`'s oracle; fastest first. Full-output rewrites also get GFLOP/s
    (counting the plain computation's FLOPs) as a fraction of the measured matmul peak."""
    from rewrites.registry import catalogue

    be = backends.get(backend)
    sync = be.synchronize
    w = [be.asarray(a, "float32") for a in (layer.c_attn_w, layer.c_attn_b, layer.c_proj_w, layer.c_proj_b)]
    h, status = layer.n_head, verified_status(report_dir)
    oracle = be.compile(oracles.oracle(backend).attention, (5,))
    oracle_s = median_time(partial(oracle, be.asarray(x[:RANK_N], "float32"), *w, h), sync)
    flops = sublayer_flops(RANK_N, x.shape[-1])
    rows = []
    for rw in catalogue():
        st = status.get((rw.name, backend), UNVERIFIED)
        if rw.fn is None or rw.claim not in ("bitwise", "equivalent", None) or st not in ("verified", UNVERIFIED):
            continue  # mutants, and rewrites whose float32 verdict contradicts equivalence
        seconds, note = _time_rewrite(be.compile(rw.implementation(backend), (5,)), be, sync, x, w, h)
        row = {"rewrite": rw.name, "output": rw.output, "status": st, "seconds": seconds, "note": note}
        if seconds is not None:
            row["speedup_vs_oracle"] = oracle_s / seconds
            if rw.output == "full":
                row["gflops"] = flops / seconds / 1e9
                row["fraction_of_peak"] = row["gflops"] / peak
        rows.append(row)
        progress(f"rank {backend} {rw.name}: " + (f"{seconds * 1e3:.2f} ms" if seconds is not None else note))
    be.release()
    rows.sort(key=lambda r: math.inf if r["seconds"] is None else r["seconds"])
    return {"oracle_s": oracle_s, "n_seq": RANK_N, "rows": rows}
