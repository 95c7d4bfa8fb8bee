"""Benchmarks (never timed tests): the O(N) claim on the real GPT-2 layer weights.

For each installed backend and n_seq, float32, real layer 0: the full sublayer (the
backend's oracle), the last-token-only sublayer, and one KV-cache decoding step at that
position; the score matmul alone for the full and the last-token forms; the growth
exponents fitted on log-log; GFLOP/s of the full sublayer against this machine's measured
float32 matmul peak. Medians of repeated runs.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

import oracles
from oracles import backends, gpt2
from rewrites.catalogue.kv_cache import decode_step
from rewrites.catalogue.last_token import last_token_only

N_SEQ = (64, 128, 256, 512, 1024)


def median_time(fn: Callable[[], object], sync: Callable[[object], object], min_total: float = 0.3) -> float:
    """Median seconds of fn() over at least 5 runs and `min_total` seconds, after a warm-up."""
    sync(fn())
    times: list[float] = []
    while len(times) < 5 or (sum(times) < min_total and len(times) < 200):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _sync(backend: str) -> Callable[[object], object]:
    if backend == "jax":
        return lambda out: out.block_until_ready()
    return lambda out: out


def _maybe_jit(backend: str, fn: Callable, static: tuple[int, ...] = ()) -> Callable:
    if backend == "jax":
        import jax

        return jax.jit(fn, static_argnums=static)
    return fn


def matmul_peak(backend: str, size: int = 2048) -> float:
    """Measured float32 GFLOP/s of a square matmul: the machine's practical limit."""
    be = backends.get(backend)
    rng = np.random.default_rng(0)
    a, b = (be.asarray(rng.normal(size=(size, size)), "float32") for _ in range(2))
    mm = _maybe_jit(backend, lambda a, b: a @ b)
    return 2 * size**3 / median_time(lambda: mm(a, b), _sync(backend), min_total=1.0) / 1e9


def sublayer_flops(n: int, e: int) -> float:
    """FLOPs of the plain computation: qkv, full n x n scores and weights @ v, c_proj."""
    return 2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e


def fit_exponent(ns, ts) -> float:
    """Slope of log(time) against log(n), least squares."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def bench_backend(backend: str, layer: gpt2.AttentionLayer, x: np.ndarray, progress) -> dict:
    be, sync = backends.get(backend), _sync(backend)
    xp = be.namespace
    w = [be.asarray(a, "float32") for a in (layer.c_attn_w, layer.c_attn_b, layer.c_proj_w, layer.c_proj_b)]
    full = _maybe_jit(backend, oracles.oracle(backend).attention, (5,))
    last = _maybe_jit(backend, last_token_only.fn, (5,))
    h = layer.n_head
    hd = x.shape[-1] // h

    def step(x_t, k, v, *ws):
        cache = {"k": k, "v": v}
        return decode_step(xp, x_t, cache, *ws, h)

    step = _maybe_jit(backend, step)
    scores_full = _maybe_jit(backend, lambda q, k: q @ xp.matrix_transpose(k))
    rows = []
    for n in N_SEQ:
        xs = be.asarray(x[:n], "float32")
        rng = np.random.default_rng(n)
        k_cache, v_cache = (be.asarray(rng.normal(size=(h, n - 1, hd)), "float32") for _ in range(2))
        q_all, k_all = (be.asarray(rng.normal(size=(h, n, hd)), "float32") for _ in range(2))
        q_last = be.asarray(rng.normal(size=(h, 1, hd)), "float32")
        row = {
            "n_seq": n,
            "full_s": median_time(partial(full, xs, *w, h), sync),
            "last_token_s": median_time(partial(last, xs, *w, h), sync),
            "kv_step_s": median_time(partial(step, xs[-1:], k_cache, v_cache, *w), sync),
            "scores_full_s": median_time(partial(scores_full, q_all, k_all), sync),
            "scores_last_s": median_time(partial(scores_full, q_last, k_all), sync),
        }
        row["full_gflops"] = sublayer_flops(n, x.shape[-1]) / row["full_s"] / 1e9
        rows.append(row)
        progress(f"bench {backend} n_seq={n}: full {row['full_s'] * 1e3:.2f} ms, "
                 f"last {row['last_token_s'] * 1e3:.2f} ms, kv step {row['kv_step_s'] * 1e3:.3f} ms")  # fmt: skip
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
        "kv_step_speedup_at_max_n": top["full_s"] / top["kv_step_s"],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"full_s": "-", "last_token_s": "--", "kv_step_s": ":"}
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


def run(report_dir: Path, backend_names: list[str], weights_path: str | None, progress) -> dict:
    weights = gpt2.load(weights_path)
    layer = weights.layer(0)
    x = gpt2.synthetic_stream(weights, max(N_SEQ), seed=0)
    h = oracles.truth.layer_norm(x, layer.ln_g, layer.ln_b, layer.eps)
    results = {b: bench_backend(b, layer, h, progress) for b in backend_names}
    report_dir.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    (report_dir / "bench.json").write_text(json.dumps({"meta": meta, "backends": results}, indent=1))
    plot(results, report_dir / "bench.png")
    return results


def summary(results: dict) -> str:
    lines = []
    for backend, r in results.items():
        e = r["exponents"]
        lines.append(
            f"{backend}: last-token {r['last_token_speedup_at_max_n']:.1f}x faster than full at n_seq {N_SEQ[-1]}, "
            f"KV step {r['kv_step_speedup_at_max_n']:.0f}x cheaper; exponents full {e['full_s']:.2f}, "
            f"last {e['last_token_s']:.2f}, scores full {e['scores_full_s']:.2f}, "
            f"scores last {e['scores_last_s']:.2f}; "
            f"full sublayer {r['rows'][-1]['full_gflops']:.1f} GFLOP/s = "
            f"{100 * r['full_fraction_of_peak_at_max_n']:.0f}% of the {r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak"
        )
    return "\n".join(lines)
