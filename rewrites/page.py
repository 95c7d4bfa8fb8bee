"""index.html, the page a person reads: the verdicts first, then what is wrong with each
failing rewrite (its diagnosis, its counterexample's shapes and small values in full, a
picture where one helps), then the run's metadata. Plain HTML and inline SVG: no scripts,
no files beside it."""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rewrites.verify import LEGEND, Result

COLOURS = {"B": "#b7e1cd", "E": "#d9ead3", "P": "#cfe2f3", "U": "#fce8b2", "I": "#f4c7c3", "X": "#c9c9c9"}
STYLE = (
    "body{font:14px sans-serif;max-width:1100px;margin:1em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px;font:12px monospace}section{border-top:1px solid #ddd;margin:1em 0}"
    "figure{display:inline-block;margin:0 1em 0 0;vertical-align:top}figcaption{font-size:12px;color:#555}"
    "pre{font-size:11px;overflow-x:auto}"
)
SMALL = 64  # arrays of at most this many elements are shown in full


def render(results: Sequence[Result], meta: dict, headline: str, tables: Sequence[tuple[str, list, list]]) -> str:
    """The page: `headline` (a partial run...), `tables` (title, header, rows of verdict cells)."""
    body = ["<h1>attention-rewrites verdicts</h1>"]
    body += [f"<p><b>{html.escape(line)}</b></p>" for line in headline.split("\n\n") if line]
    body.append(f"<p>{html.escape(LEGEND)}</p>")
    for title, header, rows in tables:
        body.append(_table(title, header, rows))
    failing = _failing(results)
    if failing:
        body.append(f"<h2>What is wrong ({len(failing)} failing rewrite x backend x inputs)</h2>")
        body += [_failure(group) for group in failing]
    body.append(f"<h2>Run</h2><pre>{html.escape(json.dumps(meta, indent=1))}</pre>")
    head = f"<!doctype html><html><head><meta charset=utf-8><title>attention-rewrites</title><style>{STYLE}</style>"
    return f"{head}</head><body>{''.join(body)}</body></html>"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    out = [f"<h2>{html.escape(title)}</h2><table><tr>", *(f"<th>{html.escape(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in row[:3])
        tds += "".join(f'<td style="background:{COLOURS.get(c[:1], "#fff")}">{html.escape(c)}</td>' for c in row[3:])
        out.append(f"<tr>{tds}</tr>")
    return "".join(out) + "</table>"


def _failing(results: Sequence[Result]) -> list[list[Result]]:
    """Results with a counterexample, grouped by rewrite x backend x inputs (dtypes together)."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.counterexample is not None:
            groups.setdefault((r.rewrite, r.backend, r.inputs), []).append(r)
    return list(groups.values())


def _failure(group: list[Result]) -> str:
    first = group[0]
    out = [f"<section><h3>{html.escape(first.rewrite)} on {first.backend}, {first.inputs} inputs</h3><ul>"]
    for r in group:
        claim = "" if r.claim_holds else f" (claimed {r.claim})"
        out.append(f"<li><b>{r.dtype}: {r.verdict}</b>{claim}: {html.escape(r.counterexample.message)}</li>")
    out.append("</ul>")
    ce = first.counterexample
    shape = ", ".join(f"{k}={v}" for k, v in (ce.shape or {}).items())
    out.append(f"<p>counterexample: {html.escape(shape)}; <code>{html.escape(ce.replay or '')}</code></p>")
    pictures = [p for f in first.diagnosis for p in _pictures(f)]
    if pictures:
        out.append("<div>" + "".join(pictures) + "</div>")
    out.append(_values(ce.file))
    return "".join(out) + "</section>"


def _pictures(finding: dict) -> list[str]:
    if finding.get("seen"):
        return [_leak_svg(finding["n_seq"], finding["seen"])]
    if finding.get("error_by_row"):
        return [_error_svg(finding["error_by_row"])]
    return []


def _leak_svg(n: int, seen: list[list[int]], size: int = 220) -> str:
    """Which keys reach which query rows: grey where causal attention lets them, red where
    a key ahead of its row changed the row."""
    c = size / n
    cell = lambda i, j, colour: (
        f'<rect x="{j * c:.2f}" y="{i * c:.2f}" width="{c:.2f}" height="{c:.2f}" fill="{colour}"/>'
    )
    rects = [cell(i, j, "#ddd") for i in range(n) for j in range(i + 1)] + [cell(i, j, "#d33") for i, j in seen]
    svg = f'<svg width="{size}" height="{size}" style="border:1px solid #999">{"".join(rects)}</svg>'
    caption = "rows (queries) down, keys across: grey what causal attention sees, red a key ahead that moved its row"
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _error_svg(by_row: list[float], width: int = 420, height: int = 160) -> str:
    """log10(error / bound) by position, 1e-6 to 1e3, with the bound drawn: where the failure starts."""
    lo, hi = -6.0, 3.0
    logs = [min(max(float(np.log10(r)), lo), hi) if r > 0 else lo for r in by_row]  # inf -> hi
    n = len(logs)
    y = lambda v: height * (hi - v) / (hi - lo)
    points = " ".join(f"{i * width / max(n - 1, 1):.1f},{y(v):.1f}" for i, v in enumerate(logs))
    labels = "".join(f'<text x="2" y="{min(max(y(v) - 2, 10), height - 2):.1f}" font-size="10" fill="#555">{t}</text>'
                     for v, t in ((hi, "1e3"), (0.0, "bound"), (lo, "1e-6")))  # fmt: skip
    svg = (
        f'<svg width="{width}" height="{height}" style="border:1px solid #999">'
        f'<line x1="0" x2="{width}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#999" stroke-dasharray="4"/>'
        f'<polyline points="{points}" fill="none" stroke="#d33"/>{labels}</svg>'
    )
    caption = f"error / bound by position 0..{n - 1} (log scale; dashed: the bound)"
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _values(file: str | None) -> str:
    """The counterexample's arrays: small ones in full, the others by shape and range."""
    if not file or not Path(file).is_file():
        return ""
    return _values_of(file, Path(file).stat().st_mtime_ns)


@functools.lru_cache(maxsize=1024)  # a run rewrites the page after every task: read each file once
def _values_of(file: str, mtime_ns: int) -> str:
    rows = []
    with np.load(file) as f:
        for name in ("x", "c_attn_w", "c_attn_b", "c_proj_w", "c_proj_b"):
            if name not in f:
                continue
            a = f[name]
            said = np.array2string(a, precision=4, separator=", ") if a.size <= SMALL else (
                f"shape {list(a.shape)}, from {a.min():.4g} to {a.max():.4g}")  # fmt: skip
            rows.append(f"{name} = {said}")
    return f"<pre>{html.escape(chr(10).join(rows))}</pre>"
