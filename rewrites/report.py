"""Verdict tables for the terminal, and the report folder: verdicts.json, verdicts.md, index.html."""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from rewrites.verify import LEGEND, Inputs, Result, Verdict


def _columns(results: Sequence[Result]) -> list[tuple[str, str]]:
    cols = []
    for r in results:
        if (r.backend, r.dtype) not in cols:
            cols.append((r.backend, r.dtype))
    return cols


def matrix(results: Sequence[Result], inputs: Inputs) -> tuple[list[str], list[list[str]]]:
    """Rows: rewrites; columns: backend/dtype; cells: verdict symbol (+ ! if contradicted)."""
    rs = [r for r in results if r.inputs == inputs]
    cols = _columns(rs)
    cells = {(r.rewrite, r.backend, r.dtype): r for r in rs}
    rows, seen = [], []
    for r in rs:
        if r.rewrite in seen:
            continue
        seen.append(r.rewrite)
        row = [r.rewrite, r.family, r.claim or "-"]
        for b, d in cols:
            c = cells.get((r.rewrite, b, d))
            row.append("" if c is None else c.verdict.symbol + ("" if c.claim_holds else "!"))
        rows.append(row)
    header = ["rewrite", "family", "claim"] + [
        f"{b[:5]} {d.replace('float', 'f').replace('bf', 'bf')}" for b, d in cols
    ]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def contradictions(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if not r.claim_holds]


def summary(results: Sequence[Result]) -> str:
    parts = []
    for inputs, title in ((Inputs.HYPOTHESIS, "Hypothesis inputs"), (Inputs.GPT2, "real GPT-2 layers (12)")):
        header, rows = matrix(results, inputs)
        if rows:
            parts.append(f"Verdicts on {title}\n{markdown_table(header, rows)}")
    bad = contradictions(results)
    lines = [
        f"  {r.rewrite} {r.backend} {r.dtype} ({r.inputs}): claimed {r.claim}, got {r.verdict}"
        + (f"; {r.counterexample.message}" if r.counterexample else "")
        for r in bad
    ]
    parts.append(LEGEND)
    parts.append(f"{len(bad)} contradicted claim(s)" + (":\n" + "\n".join(lines) if lines else ""))
    return "\n\n".join(parts)


def mutant_table(results: Sequence[Result]) -> str:
    """For each rewrite claiming a counterexample: its shrunk size and how many examples it
    took, in float32, or in the dtype that witnessed an instability float32 cannot show."""
    rows = []
    for r in results:
        if r.inputs is not Inputs.HYPOTHESIS or r.claim not in (Verdict.INEQUIVALENT, Verdict.UNSTABLE):
            continue
        if r.dtype != (r.witness if r.claim is Verdict.UNSTABLE and r.witness else "float32"):
            continue
        ce = r.counterexample
        shape = (ce.shape if ce else None) or {}
        rows.append(
            [
                r.rewrite,
                r.backend,
                f"{r.verdict} ({r.dtype})",
                (ce.examples_to_find if ce else None) or "-",
                shape.get("n_seq", "-"),
                shape.get("n_head", "-"),
                shape.get("head_dim", "-"),
                shape.get("batch", "-"),
            ]
        )
    header = ["rewrite", "backend", "verdict (dtype)", "examples to find", "n_seq", "n_head", "head_dim", "batch"]
    return markdown_table(header, rows)


def throughput_summary(meta: dict) -> str:
    """Median Hypothesis examples per second per backend, and the JAX compilations of the run."""
    by: dict[str, list[float]] = {}
    for t in meta.get("throughput", []):
        by.setdefault(t["backend"], []).append(t["examples_per_s"])  # JSON dicts of verify.Throughput
    rates = ", ".join(f"{b} {statistics.median(v):.0f}" for b, v in by.items())
    compiles = meta.get("compilations")
    return f"verification throughput (median examples/s per rewrite): {rates}; compilations (JAX): {compiles}"


def write(results: Sequence[Result], directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "verdicts.json").write_text(
        json.dumps({"meta": meta, "results": [r.to_json() for r in results]}, indent=1)
    )
    md = (
        f"# Verdicts\n\n{summary(results)}\n\n{throughput_summary(meta)}\n\n"
        f"## Counterexamples found\n\n{mutant_table(results)}\n"
    )
    (directory / "verdicts.md").write_text(md)
    index = directory / "index.html"
    kept = index.read_text().split(BENCH_MARK) if index.exists() else []
    page = _html(results, meta)
    if len(kept) == 3:  # a benchmark section from `attention-rewrites bench` stays
        page = page.replace("</body>", BENCH_MARK + kept[1] + BENCH_MARK + "</body>")
    index.write_text(page)


def _html(results: Sequence[Result], meta: dict) -> str:
    colours = {"B": "#b7e1cd", "E": "#d9ead3", "U": "#fce8b2", "I": "#f4c7c3", "X": "#c9c9c9"}
    body = [f"<h1>attention-rewrites verdicts</h1><p>{html.escape(json.dumps(meta))}</p><p>{LEGEND}</p>"]
    for inputs in Inputs:
        header, rows = matrix(results, inputs)
        if not rows:
            continue
        body.append(f"<h2>{inputs} inputs</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header))
        for row in rows:
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in row[:3])
            tds += "".join(
                f'<td style="background:{colours.get(c[:1], "#fff")}">{html.escape(c)}</td>' for c in row[3:]
            )
            body.append(f"<tr>{tds}</tr>")
        body.append("</table>")
    body.append("<h2>Counterexamples</h2><ul>")
    for r in results:
        if r.counterexample and r.dtype == "float32":
            ce = r.counterexample
            body.append(
                f"<li><b>{html.escape(r.rewrite)}</b> {r.backend} ({r.inputs}): "
                f"{html.escape(ce.message)} <code>{html.escape(ce.replay or '')}</code></li>"
            )
    body.append("</ul>")
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font:12px monospace}"
    head = f"<!doctype html><html><head><meta charset=utf-8><style>{style}</style></head>"
    return f"{head}<body>{''.join(body)}</body></html>"


BENCH_MARK = "<!-- bench -->"


def add_bench_section(directory: Path, summary_text: str) -> None:
    """Put the benchmark (plot + summary) into index.html, replacing an earlier one."""
    section = (
        f"{BENCH_MARK}<h2>Benchmarks</h2><pre>{html.escape(summary_text)}</pre>"
        f'<img src="bench.png" alt="log-log timings"><p><a href="bench.json">bench.json</a></p>{BENCH_MARK}'
    )
    index = directory / "index.html"
    page = index.read_text() if index.exists() else "<!doctype html><html><body></body></html>"
    if BENCH_MARK in page:
        before, _, rest = page.partition(BENCH_MARK)
        page = before + rest.partition(BENCH_MARK)[2]
    index.write_text(page.replace("</body>", section + "</body>"))
