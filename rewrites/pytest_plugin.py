"""pytest where the rewrite lives: `pytest --attention-rewrites` in a plugin author's
repository collects one test per installed plugin rewrite x installed backend x claim
dtype, judged by the same engine and verdicts as `attention-rewrites verify`.

Loaded through the `pytest11` entry point whenever attention-rewrites is installed; its
options are the only ones (this project's own conftest.py uses them too). A failing test
says the verdict, the counterexample's shape, its saved file and the `replay` command.
`assert_rewrite` does the same from Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from oracles import backends, gpt2
from rewrites.verify.verdicts import CLAIM_DTYPES, Result


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attention-rewrites")
    group.addoption(
        "--attention-rewrites",
        action="store_true",
        help="collect a test per installed plugin rewrite x backend x claim dtype (float64, float32)",
    )
    group.addoption("--backend", action="append", default=[], help="only this backend (repeatable)")
    group.addoption("--rewrite", action="append", default=[], help="only this rewrite (repeatable)")
    group.addoption("--gpt2-weights", default=None, help="GPT-2 safetensors file or folder")
    group.addoption("--examples", type=int, default=None, help="Hypothesis examples per verdict search")
    group.addoption("--no-gpt2", action="store_true", help="skip the real GPT-2 layers (--attention-rewrites)")
    group.addoption("--rewrites-report", default=None, help="where counterexamples are saved (default: a temp dir)")
    group.addoption(
        "--rewrites-database",
        default=".hypothesis/attention-rewrites",
        help="example database: failing problems kept and tried first next time (a folder, module:attribute, "
        "or none; default .hypothesis/attention-rewrites, beside Hypothesis's own)",
    )
    group.addoption(
        "--device", default="cpu", choices=backends.DEVICES, help="where PyTorch and JAX compute (default cpu)"
    )


def pytest_configure(config: pytest.Config) -> None:
    backends.use_device(config.getoption("device"))  # before any test loads a backend


class RewriteClaimFailed(Exception):
    """A rewrite's verdict contradicts its claim (the message says how)."""


def explain(results: Iterable[Result]) -> str:
    """The failing verdicts as lines a person reads: verdict, counterexample, replay."""
    lines = []
    for r in results:
        lines.append(f"{r.rewrite} on {r.backend} {r.dtype} ({r.inputs}): claimed {r.claim}, verdict {r.verdict}")
        ce = r.counterexample
        if ce is not None:
            lines.append(f"  {ce.message}")
            if ce.shape:
                lines.append(f"  smallest counterexample: {ce.problem}")
            if ce.file:
                lines.append(f"  saved: {ce.file}\n  replay: {ce.replay}")
    return "\n".join(lines)


def assert_rewrite(
    fn: Callable,
    *,
    claim: str = "equivalent",
    backends: Iterable[str] = ("numpy",),
    output: str = "full",
    level: str = "sublayer",
    examples: int = 30,
    report_dir: str | os.PathLike = "report",
    gpt2_weights: str | None = None,
    real_layers: bool = True,
) -> list[Result]:
    """Verify `fn` (a sublayer or core-level attention function) as `verify` would; raise
    RewriteClaimFailed with the verdict, counterexample and replay command if a verdict
    contradicts `claim`. Real GPT-2 layers are used when weights are found (and asked for)."""
    from rewrites.registry import Rewrite
    from rewrites.verify import Config, Verifier

    doc = (fn.__doc__ or "").strip().splitlines()
    rw = Rewrite(getattr(fn, "__name__", "rewrite"), doc[0] if doc else "", "user", fn, output, claim, level=level)
    verifier = Verifier(Config(examples=examples, gpt2_weights=gpt2_weights, report_dir=Path(report_dir),
                               invariance=False))  # fmt: skip
    results = verifier.verify_one(rw, list(backends), gpt2_inputs=real_layers and _weights_found(gpt2_weights))
    bad = [r for r in results if not r.claim_holds]
    if bad:
        raise RewriteClaimFailed(explain(bad))
    return results


def _weights_found(path: str | None) -> bool:
    try:
        gpt2.locate(path)
        return True
    except gpt2.WeightsError:
        if path or os.environ.get(gpt2.ENV_VAR):
            raise
        return False


class RewriteItem(pytest.Item):
    """One plugin rewrite x backend x claim dtype."""

    def __init__(self, *, rewrite: Any, backend: str, dtype: str, verdicts: Callable, **kw: Any) -> None:
        super().__init__(**kw)
        self.rewrite, self.backend, self.dtype, self.verdicts = rewrite, backend, dtype, verdicts
        self.add_marker(pytest.mark.xdist_group(f"{rewrite.name}-{backend}"))  # one search per pair

    def runtest(self) -> None:
        results = [r for r in self.verdicts(self.rewrite, self.backend) if r.dtype == self.dtype]
        bad = [r for r in results if not r.claim_holds]
        if bad:
            raise RewriteClaimFailed(explain(bad))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, RewriteClaimFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return self.rewrite.source, None, self.name


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """With --attention-rewrites: a test per plugin rewrite x installed backend x claim dtype."""
    if not config.getoption("attention_rewrites"):
        return
    from rewrites.registry import catalogue

    rewrites = [rw for rw in catalogue(names=config.getoption("rewrite")) if rw.source != "built-in"]
    chosen = config.getoption("backend") or backends.available()
    verdicts = _verdicts(config)
    for rw in rewrites:
        for backend in (b for b in chosen if rw.exists_for(b)):
            for dtype in CLAIM_DTYPES:
                name = f"{rw.name}[{backend}-{dtype}]"
                item = RewriteItem.from_parent(
                    session, name=name, rewrite=rw, backend=backend, dtype=dtype, verdicts=verdicts
                )
                if rw.unavailable():  # another device only, or a library missing: said, not hidden
                    item.add_marker(pytest.mark.skip(reason=rw.unavailable()))
                items.append(item)


def _verdicts(config: pytest.Config) -> Callable:
    """verdicts(rewrite, backend) -> its Results, cached: each pair a task of `verify`'s
    worker pool, kept for the session, so a plugin rewrite that crashes, exits or hangs is
    that test's `error` and not the end of pytest, and its verdicts are computed as
    `verify` computes them (one BLAS thread a worker: the same bitwise verdicts)."""
    from collections import deque

    from rewrites.verify import Config
    from rewrites.verify.pool import Pool, Task
    from rewrites.verify.workers import DEFAULT_TIMEOUT

    weights = config.getoption("gpt2_weights")
    report = config.getoption("rewrites_report") or _report_folder(config)
    examples = config.getoption("examples") or 30
    database = config.getoption("rewrites_database")
    database = None if database.lower() == "none" else database
    cfg = Config(
        examples=examples,
        gpt2_weights=weights,
        report_dir=Path(report),
        dtypes=CLAIM_DTYPES,
        database=database,
        invariance=False,  # invariances: `verify`'s report
        device=config.getoption("device"),
    )
    with_gpt2 = not config.getoption("no_gpt2") and _weights_found(weights)
    cache: dict[tuple, list[Result]] = {}
    pool: list[Pool] = []  # started by the first test that needs it

    def get(rw: Any, backend: str) -> list[Result]:
        if (rw.identity, backend) not in cache:
            if not pool:
                pool.append(Pool(cfg, with_gpt2, True, DEFAULT_TIMEOUT))
                config.add_cleanup(pool[0].close)
            done = next(pool[0].run(deque([Task(rw, backend)]), 1))
            cache[(rw.identity, backend)] = done.results
        return cache[(rw.identity, backend)]

    return get


def _report_folder(config: pytest.Config) -> Path:
    """Where counterexamples go without --rewrites-report: beside pytest's own tmp_path
    folders, kept for the failure messages to name and removed with them (pytest keeps
    the last three runs' folders)."""
    import tempfile

    factory = getattr(config, "_tmp_path_factory", None)  # pytest's tmp_path machinery, if loaded
    if factory is None:
        return Path(tempfile.mkdtemp(prefix="attention-rewrites-"))
    return factory.mktemp("attention-rewrites", numbered=True)
