"""pytest wiring: backend x dtype parametrisation, options, Hypothesis profiles, GPT-2 weights.

Options (registered by the shipped pytest plugin, rewrites/pytest_plugin.py):
    --backend NAME      only this backend (repeatable); default every installed one
    --rewrite NAME      only this rewrite (repeatable); default the whole catalogue
    --gpt2-weights PATH safetensors file or folder (else $GPT2_WEIGHTS, ../shared/gpt2/, HF cache)
Hypothesis profile: $HYPOTHESIS_PROFILE = dev (default), ci (derandomised) or thorough.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers share the cores
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pytest
from hypothesis import HealthCheck, settings

from oracles import backends, gpt2, heap
from rewrites.verify import without_local_constants

_COMMON = dict(
    deadline=None,  # first calls compile (JAX); timing belongs in benchmarks, not tests
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)
settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
without_local_constants()  # derandomised examples must not depend on what a process imported
pytest_plugins = ["pytester"]  # properties/tests/test_pytest_plugin.py runs pytest in pytest


#: Examples a verdict search takes here (`--examples`, from rewrites/pytest_plugin.py, which
#: registers the options): fewer than `verify`'s 30, the known hard cases being explicit.
EXAMPLES = 20  # properties/tests/test_strategies.py checks the quick menus at this many


def _selected_backends(config: pytest.Config) -> list[str]:
    chosen = config.getoption("backend") or list(backends.NAMES)
    for name in chosen:
        if name not in backends.NAMES:
            raise pytest.UsageError(f"--backend {name!r}: choose from {', '.join(backends.NAMES)}")
    return chosen


def backend_params(config: pytest.Config, dtypes=backends.DTYPES) -> list:
    """pytest params 'backend-dtype' for every selected backend and the dtypes it has;
    a backend that is not installed appears once, skipped with the reason."""
    params = []
    for name in _selected_backends(config):
        reason = backends.unavailable_reason(name)
        if reason:
            params.append(pytest.param(name, dtypes[0], id=f"{name}", marks=pytest.mark.skip(reason=reason)))
            continue
        for dtype in dtypes:
            if dtype in backends.get(name).dtypes:
                params.append(pytest.param(name, dtype, id=f"{name}-{dtype}"))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "rewrite_case" in metafunc.fixturenames:
        from rewrites.registry import catalogue

        try:
            rewrites = catalogue(names=metafunc.config.getoption("rewrite"))
        except ValueError as e:
            raise pytest.UsageError(f"--rewrite: {e}") from None
        from rewrites.verify import CLAIM_DTYPES

        marker = metafunc.definition.get_closest_marker("families")
        rewrites = [rw for rw in rewrites if marker is None or rw.family in marker.args]
        layouts = metafunc.definition.get_closest_marker("layouts")
        rewrites = [rw for rw in rewrites if layouts is None or rw.layout in layouts.args]
        params = []
        for rw in rewrites:  # claims are held in float64 and float32; `verify` reports half precision
            for p in backend_params(metafunc.config, CLAIM_DTYPES):
                if not rw.exists_for(p.values[0]):
                    continue  # a library kernel exists for its own backend only
                group = pytest.mark.xdist_group(f"{rw.name}-{p.values[0]}")  # one verdict search per pair
                marks = [*p.marks, group, *([pytest.mark.skip(reason=rw.unavailable())] if rw.unavailable() else [])]
                params.append(pytest.param((rw, *p.values), id=f"{rw.name}-{p.id}", marks=marks))
        metafunc.parametrize("rewrite_case", params)
    elif {"backend", "dtype"} <= set(metafunc.fixturenames):
        marker = metafunc.definition.get_closest_marker("dtypes")
        dtypes = marker.args if marker else backends.DTYPES
        metafunc.parametrize(("backend", "dtype"), backend_params(metafunc.config, dtypes))
    elif "backend" in metafunc.fixturenames:
        params = backend_params(metafunc.config, ("float64",))  # every backend has float64
        metafunc.parametrize("backend", [pytest.param(p.values[0], id=p.values[0], marks=p.marks) for p in params])


def pytest_configure(config: pytest.Config) -> None:
    heap.retain_freed_memory()  # each xdist worker judges at 1024 tokens, again and again: oracles/heap.py
    config.addinivalue_line("markers", "dtypes(*names): run this backend/dtype test only in these dtypes")
    config.addinivalue_line("markers", "families(*names): run this rewrite test only for these families")
    config.addinivalue_line("markers", "layouts(*names): run this rewrite test only for rewrites of these layouts")
    config.addinivalue_line("markers", "xdist_group(name): tests that pytest-xdist keeps on one worker")


@pytest.fixture(scope="session")
def gpt2_weights(pytestconfig: pytest.Config) -> gpt2.GPT2Weights:
    """The real GPT-2 weights, loaded once per session. Skipped when none are found, unless
    a location was given explicitly (option or $GPT2_WEIGHTS): then a problem is an error."""
    explicit = pytestconfig.getoption("gpt2_weights")
    try:
        return gpt2.load(explicit)
    except gpt2.WeightsError as e:
        if explicit or os.environ.get(gpt2.ENV_VAR):
            raise
        pytest.skip(str(e))


@pytest.fixture(autouse=True, scope="module")
def _release_jax_executables():
    """Compiled JAX executables map memory; a whole suite in one process must let them go."""
    yield
    for name in backends.available():
        backends.get(name).release()


# --- rewrite verdicts: computed once per (rewrite, backend), shown in the terminal summary -----

_VERDICTS: dict[tuple[str, str], list] = {}


#: Families whose behaviour changes with length: pytest searches them as `verify` does, to
#: n_seq 2049 and real layers at 1024, on the backends that compile nothing per shape; the
#: others, and every family on JAX (each long length a compilation, minutes a rewrite:
#: `verify` searches JAX at real lengths), get the quick profile (short shapes).
LENGTH_FAMILIES = ("tiles", "length_mutant", "split_kv", "paged_kv")
LENGTH_EXAMPLES = 16
#: The real layer every rewrite sees at 1024 and (the next) at 1000 tokens here. `verify`
#: spreads them over all 12 by rewrite and backend; pinned, their float64 truths and bounds
#: (at 1024 tokens a truth took 1.8 s and a bound 2.7 s here, a float32 tolerance needing
#: its own truth and two bounds) are computed once a run instead of once a rewrite.
#: All 12 layers at 1024 are checked against the oracles in test_oracles.py.
REAL_LAYER = 5


@pytest.fixture(scope="session")
def verifiers(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """(family, backend) -> the Verifier for them (the full profile for LENGTH_FAMILIES on a
    backend that does not compile per shape, else the quick one)."""
    from rewrites.verify import CLAIM_DTYPES, Config, Verifier, inputs

    def make(profile, examples: int, explicit: bool) -> Verifier:
        return Verifier(
            Config(
                examples=examples,
                gpt2_weights=pytestconfig.getoption("gpt2_weights"),
                report_dir=tmp_path_factory.mktemp("report"),
                dtypes=CLAIM_DTYPES,
                profile=profile,
                explicit_examples=explicit,
                invariance=False,  # measured by `verify`; its rule is tested in test_invariance.py
                real_layer=REAL_LAYER,
            )
        )

    examples = pytestconfig.getoption("examples") or EXAMPLES
    # The full profile's LENGTH_EXAMPLES a search: 8 per length band (every length mutant is
    # found by its 10th). The length families get no explicit examples there: their faults
    # must be found by the search.
    full = make(inputs.FULL, min(examples, LENGTH_EXAMPLES), explicit=False)
    quick = make(inputs.QUICK, examples, explicit=True)
    return lambda family, backend: full if family in LENGTH_FAMILIES and not backends.get(backend).compiles else quick


@pytest.fixture(scope="session")
def verdicts(verifiers, pytestconfig: pytest.Config):
    """verdicts(rewrite, backend) -> its Results (Hypothesis and, when weights exist, GPT-2)."""
    try:
        gpt2.load(pytestconfig.getoption("gpt2_weights"))
        with_gpt2 = True
    except gpt2.WeightsError:
        if pytestconfig.getoption("gpt2_weights") or os.environ.get(gpt2.ENV_VAR):
            raise
        with_gpt2 = False

    def get(rw, backend: str) -> list:
        key = (rw.name, backend)
        if key not in _VERDICTS:
            _VERDICTS[key] = verifiers(rw.family, backend).verify_one(rw, [backend], gpt2_inputs=with_gpt2)
        return _VERDICTS[key]

    return get


_FROM_WORKERS: list = []  # with pytest-xdist: verdicts the workers computed


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand this worker's verdicts to the controller."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["verdicts"] = [r.to_json() for rs in _VERDICTS.values() for r in rs]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """On the pytest-xdist controller: collect a finished worker's verdicts."""
    from rewrites.verify import Result

    _FROM_WORKERS.extend(Result.from_json(d) for d in getattr(node, "workeroutput", {}).get("verdicts", []))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = [r for rs in _VERDICTS.values() for r in rs] + _FROM_WORKERS
    if not results:
        return
    from rewrites import report

    terminalreporter.section("rewrite verdicts")
    terminalreporter.write_line(report.summary(results))
