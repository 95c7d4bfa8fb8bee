"""Verdict tables for the terminal, and the report folder: verdicts.json, verdicts.md,
index.html, and verdicts.jsonl, the verdicts written one line each as they arrive.

A run writes the report as it goes (`Stream`): an interrupted or killed run leaves every
verdict it computed in verdicts.jsonl and a report that says it is partial."""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from rewrites import page
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
            row.append("" if c is None else cell(c))
        rows.append(row)
    header = ["rewrite", "family", "claim"] + [
        f"{b[:5]} {d.replace('float', 'f').replace('bf', 'bf')}" for b, d in cols
    ]
    return header, rows


def cell(r: Result) -> str:
    """The verdict's symbol, `(f32)` for an effective precision, `<=N` if problems were cut to
    N tokens, `!` if it contradicts the claim."""
    precision = f"({r.precision.replace('float', 'f')})" if r.precision else ""
    return r.verdict.symbol + precision + (f"<={r.cut_to}" if r.cut_to else "") + ("" if r.claim_holds else "!")


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
    found = diagnoses(results)
    if found:
        parts.append("What is wrong (the first failing verdict's findings, per rewrite):\n" + "\n".join(found))
    parts.append(f"{len(bad)} contradicted claim(s)" + (":\n" + "\n".join(lines) if lines else ""))
    return "\n\n".join(parts)


def diagnoses(results: Sequence[Result]) -> list[str]:
    """One line per rewrite with a diagnosis: its first failing verdict's findings (the
    page has every dtype's)."""
    lines, seen = [], set()
    for r in results:
        if r.diagnosis and r.rewrite not in seen:
            seen.add(r.rewrite)
            said = "; ".join(f["text"] for f in r.diagnosis)
            lines.append(f"  {r.rewrite}: {said} ({r.backend} {r.dtype}, {r.inputs})")
    return lines


def mutant_table(results: Sequence[Result]) -> str:
    """For each rewrite claiming a counterexample: its shrunk size and how many examples it
    took, in float32, or in the dtype that witnessed an instability float32 cannot show."""
    rows = []
    for r in results:
        if r.inputs is not Inputs.HYPOTHESIS or r.claim not in (Verdict.INEQUIVALENT, Verdict.UNSTABLE):
            continue
        if r.dtype != (r.witness if r.claim in (Verdict.UNSTABLE, Verdict.IMPRECISE) and r.witness else "float32"):
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


INVARIANCE_LEGEND = (
    "b batch, p prefix, d deterministic: the letter where the bits are the same, - where they differ "
    "(the witness is in verdicts.json), ? not measured"
)


def invariance_table(results: Sequence[Result]) -> str:
    """Rows: rewrites; columns: backend/dtype; cells: the three bitwise invariances (one
    result per backend x dtype carries them: both input sources share one measurement)."""
    rs = [r for r in results if r.inputs is Inputs.HYPOTHESIS and r.invariance]
    if not rs:
        return ""
    header, rows = matrix(rs, Inputs.HYPOTHESIS)
    cells = {(r.rewrite, r.backend, r.dtype): r.invariance for r in rs}
    cols = _columns(rs)
    names = ("batch", "prefix", "deterministic")
    mark = lambda i: "".join(k[0] if i[k] else "?" if i[k] is None else "-" for k in names)
    for row in rows:
        row[3:] = ["" if i is None else mark(i) for i in (cells.get((row[0], b, d)) for b, d in cols)]
    return f"{markdown_table(header, rows)}\n\n{INVARIANCE_LEGEND}"


def throughput_summary(meta: dict) -> str:
    """Median Hypothesis examples per second per backend, and the JAX compilations of the run."""
    by: dict[str, list[float]] = {}
    for t in meta.get("throughput", []):
        by.setdefault(t["backend"], []).append(t["examples_per_s"])  # JSON dicts of verify.Throughput
    rates = ", ".join(f"{b} {statistics.median(v):.0f}" for b, v in by.items())
    compiles = meta.get("compilations")
    return f"verification throughput (median examples/s per rewrite): {rates}; compilations (JAX): {compiles}"


def headline(meta: dict) -> str:
    """What a reader must know before the tables: a partial run, real layers not run."""
    lines = []
    if meta.get("partial"):
        lines.append(f"PARTIAL REPORT: {meta['partial']}; the verdicts below are the ones that arrived.")
    if meta.get("gpt2_layers"):
        lines.append(f"Real GPT-2 layer verdicts: {meta['gpt2_layers']}.")
    return "\n\n".join(lines)


def write(results: Sequence[Result], directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "verdicts.json").write_text(
        json.dumps({"meta": meta, "results": [r.to_json() for r in results]}, indent=1)
    )
    invariances = invariance_table(results)
    parts = [
        f"# Verdicts{' (partial)' if meta.get('partial') else ''}",
        headline(meta),
        summary(results),
        throughput_summary(meta),
        f"## Counterexamples found\n\n{mutant_table(results)}",
        f"## Bitwise invariances\n\n{invariances}" if invariances else "",
    ]
    (directory / "verdicts.md").write_text("\n\n".join(p for p in parts if p) + "\n")
    index = directory / "index.html"
    kept = index.read_text().split(BENCH_MARK) if index.exists() else []
    page = _html(results, meta)
    if len(kept) == 3:  # a benchmark section from `attention-rewrites bench` stays
        page = page.replace("</body>", BENCH_MARK + kept[1] + BENCH_MARK + "</body>")
    index.write_text(page)


JSONL = "verdicts.jsonl"


class Stream:
    """The report of a run in progress. Each task's verdicts are appended to verdicts.jsonl
    (flushed: a killed run keeps them) and the report files are rewritten, marked partial,
    until `finish`. `order` sorts results (catalogue order, not arrival order)."""

    def __init__(self, directory: Path, meta: dict, expected: int, order: Callable[[Result], Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.meta, self.expected, self.order = directory, meta, expected, order
        self.results: list[Result] = []
        self.done = 0
        self.file: IO[str] = (directory / JSONL).open("w")
        self._write_partial("running")

    def add(self, results: Sequence[Result]) -> None:
        """One finished task's verdicts."""
        self.file.writelines(json.dumps(r.to_json()) + "\n" for r in results)
        self.file.flush()
        self.results += results
        self.done += 1
        self._write_partial("running")

    def sorted(self) -> list[Result]:
        return sorted(self.results, key=self.order)

    def finish(self, meta: dict, interrupted: str | None = None) -> list[Result]:
        """Write the final report: complete, or partial saying why (`interrupted`)."""
        self.file.close()
        self.meta = meta
        if interrupted:
            self._write_partial(interrupted)
        else:
            write(self.sorted(), self.directory, meta)
        return self.sorted()

    def _write_partial(self, why: str) -> None:
        state = f"{why}, {self.done} of {self.expected} rewrite x backend runs done"
        write(self.sorted(), self.directory, {**self.meta, "partial": state})


def read_jsonl(path: Path) -> list[Result]:
    """The verdicts of verdicts.jsonl; a last line cut short by a killed run is skipped."""
    lines = Path(path).read_text().splitlines()
    results = []
    for i, line in enumerate(lines):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        results.append(Result.from_json(d))
    return results


def _html(results: Sequence[Result], meta: dict) -> str:
    titles = {Inputs.HYPOTHESIS: "Verdicts on Hypothesis inputs", Inputs.GPT2: "Verdicts on the real GPT-2 layers"}
    tables = [(titles[inputs], *matrix(results, inputs)) for inputs in Inputs]
    return page.render(results, meta, headline(meta), [t for t in tables if t[2]])


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
