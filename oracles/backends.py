"""Array backends: everything that differs between NumPy, JAX and PyTorch, in one object.

A `Backend` moves a float64 NumPy problem into its arrays and back, and carries what the
rest of the project must not branch on a backend's name for: compiling a function (JAX
jits, the others run eagerly), waiting for a result, releasing compiled code, counting
compilations. A backend is optional: `available()` lists the ones that import, and
`get(name)` raises `BackendUnavailable` (with the reason) for one that does not, so tests
can skip cleanly. This is the only module that tests a backend's name.

A process computes on one device (`use_device`, before any backend is loaded; default
"cpu"): PyTorch and JAX put every array there, a problem's inputs and whatever a rewrite
creates without naming a device (torch.set_default_device, jax_default_device), so a
verdict taken on a GPU is the GPU's. NumPy has no device but the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from typing import Any

import numpy as np

NAMES = ("numpy", "jax", "torch")
DEVICES = ("cpu", "cuda")
_DEVICE = ["cpu"]  # the device this process computes on (use_device)
_ON_SWITCH: dict[str, Callable[[str], None]] = {}  # backend -> makes `device` its default for new arrays
#: (fn, shapes but n_seq, dtype) -> its growth, the tokens it runs on, the longest n_seq compiled whole
_GROWS: dict[tuple, tuple[Growth, int | None, int | None]] = {}
_STEADY: dict[tuple, bool] = {}  # (fn, dtype) -> whether its loop per token keeps its steps' shapes
DTYPES = ("float64", "float32", "float16", "bfloat16")


class Growth(Enum):
    """How a function's traced (to-be-compiled) program grows with n_seq."""

    NONE = "fixed size"
    PER_TILE = "a loop per tile"  # grows between 16 and 256 tokens, not between 8 and 16
    PER_TOKEN = "a loop per token"


#: Equations of the largest program compiled at a problem's full length. A loop per tile
#: unrolls n_seq / tile times: tiles of 16 at 2049 tokens trace to 4,773 equations that took
#: XLA 155 s to compile, again for every new length (the whole catalogue's JAX run timed out
#: on it). Beyond this a loop per tile runs on each problem's first tokens only (`tokens`).
TRACE_BUDGET = 600
#: n_seq of the cheap traces that tell how a program grows: a loop per token is longer at
#: PROBE_TOKENS than at half as many, a loop per tile at TILE_TRACE than at PROBE_TOKENS. A
#: problem of PROBE_TOKENS or fewer is never cut.
PROBE_TOKENS, TILE_TRACE = 16, 256


class _TooMany(Exception):
    """Raised inside a probe's call once it compiles more programs than allowed (`programs`)."""


class BackendUnavailable(RuntimeError):
    """The backend's package is not installed (or fails to import)."""


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple[str, ...]  # the dtypes this backend computes in
    device: str  # where its arrays live: "cpu" or "cuda"
    asarray: Callable[[np.ndarray, str], Any]  # float64 NumPy -> native array of `dtype`
    to_numpy: Callable[[Any], np.ndarray]  # native array -> float64 NumPy (exact)
    namespace: Any  # the array API namespace (array-api-compat)
    #: fn -> a compiled fn whose arguments at `static` positions are Python values (JAX: jit)
    compile: Callable[[Callable, tuple[int, ...]], Callable] = lambda fn, static=(): fn
    synchronize: Callable[[Any], Any] = lambda out: out  # wait until `out` is computed
    release: Callable[[], None] = lambda: None  # drop compiled code (it maps memory)
    compilations: Callable[[], int] = lambda: 0  # compilations so far in this process
    #: fn -> whether tracing it grows with n_seq (a Python loop per token or tile), so that
    #: compiling it would unroll the loop; see `unrolls`
    traces: Callable[..., int] | None = field(default=None, repr=False)
    abstract: Callable[[tuple[int, ...], Any], Any] | None = field(default=None, repr=False)  # shape-only array
    #: The tokens a per-token loop runs on here (None: all of them). Eagerly, JAX compiles
    #: every primitive anew for each new shape, and a loop's cache grows a token a step:
    #: 0.5 s a token (a 256-token decode took 88 s, 1025 tokens over 600 s). So such a loop
    #: runs on each problem's first `loop_tokens` tokens, and its verdicts say so, unless its
    #: steps keep their shapes (`programs`).
    loop_tokens: int | None = None
    #: fn, *args, most= -> the programs an eager call compiles from empty caches (None: more
    #: than `most`, where it stops). A loop per token whose steps keep their shapes (a ring
    #: buffer of fixed slots) compiles as many at 48 tokens as at 16, and then runs eagerly
    #: on every token: ring_buffer_overflow_1000 compiles 38 programs on JAX at 64, 200 and
    #: 1001 tokens alike (~3 ms a step), where a growing cache compiles anew every step.
    programs: Callable[..., int | None] | None = field(default=None, repr=False)
    #: Make an array handed to untrusted code unwritable: True where it then cannot change
    #: (JAX's arrays never do; NumPy's made read-only), False where it can (PyTorch), so a
    #: call must be checked by comparing copies (execute.py)
    protect: Callable[[Any], bool] = lambda a: False
    #: Whether an error's message says the call wrote into a protected input (NumPy's
    #: "assignment destination is read-only", "output array is read-only")
    wrote_protected: Callable[[str], bool] = lambda message: False
    #: Dtypes computed in plain loops, without BLAS (NumPy's float16: 0.25 GMAC/s on this
    #: machine's cores, 300 times slower than its float32): the checks that give findings
    #: rather than verdicts run shorter problems in them (invariance.py)
    unblocked: tuple[str, ...] = ()

    def runner(
        self, fn: Callable, args: tuple, static: tuple[int, ...] = (), positions: tuple[int, ...] = ()
    ) -> Callable:
        """How to call `fn` on `args` (x first, [..., n_seq, n_embd]): compiled, except a
        function whose traced program grows per token (a Python loop over positions) beyond
        TRACE_BUDGET equations at this n_seq, which compiling would unroll (32 tokens already
        took 30 s to compile, 1024 minutes): it runs eagerly. Within the budget (a short
        problem) it is compiled: eagerly each primitive compiles per shape, and the quick
        profile's 5-token problems cost an eager `online_softmax` 618 compilations and 50 s
        on JAX, compiled 171 and 25 s. A loop per tile is compiled: it unrolls only n_seq / tile times, and
        eagerly every tile's new shape would compile each primitive anew (7,504 primitive
        compilations for one search of 64-token tiles). The decision is the backend's, for
        built-ins and plugins alike, and never pads: fn sees the n_seq it is judged at
        (`tokens` says how many that is). `positions`: the arguments besides x that have a
        value per position, [..., n_seq] (a padding mask), traced at each length too."""
        if self.traces is None:
            return fn
        growth, _, whole = self._growth(fn, args, static, positions)
        eager = growth is Growth.PER_TOKEN and (whole is None or args[0].shape[-2] > whole)
        return fn if eager else self.compile(fn, static)

    @property
    def compiles(self) -> bool:
        """Whether this backend compiles per shape (every new length costs a compilation)."""
        return self.traces is not None

    def tokens(
        self, fn: Callable, args: tuple, static: tuple[int, ...] = (), positions: tuple[int, ...] = ()
    ) -> int | None:
        """The most tokens of a problem this backend runs fn on (None: all of them): a loop
        per token its first `loop_tokens`, a loop per tile as many as keep its traced program
        within TRACE_BUDGET equations, anything else (and anything where nothing compiles) all;
        a loop per token whose steps keep their shapes (`_steady`) all as well."""
        if not self.compiles:
            return None
        growth, tokens, _ = self._growth(fn, args, static, positions)
        if growth is Growth.PER_TOKEN and tokens is not None:
            key = (fn, str(args[0].dtype))  # a probe costs 1-3 s: once per function and dtype
            if key not in _STEADY:
                _STEADY[key] = self._steady(fn, args, positions)
            return None if _STEADY[key] else tokens
        return tokens

    def _growth(
        self, fn: Callable, args: tuple, static: tuple, positions: tuple
    ) -> tuple[Growth, int | None, int | None]:
        """How fn's traced program grows with n_seq, the tokens it runs on, and (a loop per
        token) the longest n_seq whose program stays within TRACE_BUDGET: from cheap
        traces (no compilation) at 8 and 16 tokens, and at 256 where those two are the same
        size, once per function and shape, instead of one at the real length (7 s for a
        loop per token at 1024). A loop per tile grows linearly: its size at n is
        extrapolated from 16 and 256 tokens."""
        x = args[0]
        fixed = tuple(getattr(a, "shape", a) for i, a in enumerate(args[1:], 1) if i not in positions)
        key = (fn, x.shape[:-2], x.shape[-1], str(x.dtype), fixed, positions)
        if key not in _GROWS:
            shape_only = lambda a, axis, shape: self.abstract(shape, a.dtype)
            size = lambda n: self.traces(fn, *_at_length(args, positions, n, shape_only), static=static)
            short, half = size(PROBE_TOKENS), size(PROBE_TOKENS // 2)
            within = lambda per_token: PROBE_TOKENS + int((TRACE_BUDGET - short) / per_token)  # n at the budget
            if half < short:
                _GROWS[key] = (Growth.PER_TOKEN, self.loop_tokens, within((short - half) / (PROBE_TOKENS // 2)))
            elif (per_token := (size(TILE_TRACE) - short) / (TILE_TRACE - PROBE_TOKENS)) > 0:
                _GROWS[key] = (Growth.PER_TILE, max(within(per_token), PROBE_TOKENS), None)
            else:
                _GROWS[key] = (Growth.NONE, None, None)
        return _GROWS[key]

    def _steady(self, fn: Callable, args: tuple, positions: tuple) -> bool:
        """Whether a loop per token keeps its steps' shapes, so that run eagerly on any
        number of tokens it compiles a fixed set of programs: as many at 3 x PROBE_TOKENS
        tokens as at PROBE_TOKENS, each counted from empty caches (a growing KV cache
        compiles new ones every step). Run on args' own values, repeated to the length;
        a function that raises here is not steady (it keeps `loop_tokens`)."""
        if self.programs is None or self.loop_tokens is None:
            return False
        xp = self.namespace

        def at(n: int) -> tuple:  # args' own values along their tokens, repeated to n
            repeated = lambda a, axis: xp.concat([a] * -(-n // a.shape[axis]), axis=axis)
            return _at_length(args, positions, n, lambda a, axis, shape: repeated(a, axis)[tuple(map(slice, shape))])

        try:
            few = self.programs(fn, *at(PROBE_TOKENS))
            return few is not None and self.programs(fn, *at(3 * PROBE_TOKENS), most=few) is not None
        except Exception:
            return False

    def round_trip(self, a: np.ndarray, dtype: str) -> np.ndarray:
        """`a` rounded to `dtype` the way this backend stores it, back in float64."""
        return self.to_numpy(self.asarray(a, dtype))


def _at_length(args: tuple, positions: tuple, n: int, make: Callable[[Any, int, tuple], Any]) -> tuple:
    """args at n tokens: those with a value per token (x along axis -2, the `positions`
    arguments along axis -1) made by make(a, axis, its shape at n); the others as they are."""

    def at(a: Any, axis: int) -> Any:
        shape = list(a.shape)
        shape[axis] = n
        return make(a, axis, tuple(shape))

    return tuple(at(a, -2) if i == 0 else at(a, -1) if i in positions else a for i, a in enumerate(args))


def _numpy(device: str) -> Backend:
    import array_api_compat.numpy as xp

    if device != "cpu":
        raise BackendUnavailable(f"numpy computes on the CPU only, not on {device}")
    # NumPy has no bfloat16 of its own.
    return Backend(
        name="numpy",
        dtypes=("float64", "float32", "float16"),
        device=device,
        asarray=lambda a, dtype: np.array(a, dtype=dtype),  # a copy: callers may write into it
        to_numpy=lambda a: np.asarray(a, dtype=np.float64),
        namespace=xp,
        protect=_read_only,
        wrote_protected=lambda message: "read-only" in message,
        unblocked=("float16",),
    )


def _read_only(a: np.ndarray) -> bool:
    a.flags.writeable = False
    return True


def _jax(device: str) -> Backend:
    # Without this every process (the run and each worker) takes 75% of the GPU's memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.monitoring

    # float64 is opt-in in JAX; the ground truth and the float64 verdicts need it.
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    try:
        where = jax.devices(device)[0]
    except RuntimeError as e:  # no such platform in this jaxlib, or no device of it
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendUnavailable(f"jax {jax.__version__} has no {device} device here ({reason})") from e
    _persistent_compilation_cache(jax)
    # Also on a machine with a GPU, "cpu" means the CPU (JAX would default to the GPU).
    _ON_SWITCH["jax"] = lambda d: jax.config.update("jax_default_device", jax.devices(d)[0])
    _ON_SWITCH["jax"](device)

    compiled: dict[tuple[Callable, tuple[int, ...]], Callable] = {}
    count = [0]

    def compile_(fn: Callable, static: tuple[int, ...] = ()) -> Callable:
        if (fn, static) not in compiled:
            compiled[(fn, static)] = jax.jit(fn, static_argnums=static)
        return compiled[(fn, static)]

    def release() -> None:
        # Each executable maps code pages: one process verifying the whole catalogue passed
        # Linux's default vm.max_map_count (65,530) and crashed inside XLA.
        compiled.clear()
        jax.clear_caches()

    lowered, limit = [0], [None]  # programs lowered so far; where a probe (`programs`) stops

    def listen(event: str, _duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1
        elif event == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # every program, read from disk or not
            lowered[0] += 1
            if limit[0] is not None and lowered[0] > limit[0]:
                limit[0] = None
                raise _TooMany

    jax.monitoring.register_event_duration_secs_listener(listen)

    def traces(fn: Callable, *args: Any, static: tuple[int, ...] = ()) -> int:
        """Equations in fn's traced program: the size XLA would compile."""
        return len(jax.make_jaxpr(fn, static_argnums=static)(*args).jaxpr.eqns)

    def programs(fn: Callable, *args: Any, most: int | None = None) -> int | None:
        jax.clear_caches()
        before = lowered[0]
        limit[0] = None if most is None else before + most
        try:
            jax.block_until_ready(fn(*args))
        except _TooMany:
            return None
        finally:
            limit[0] = None
        made = lowered[0] - before
        return None if most is not None and made > most else made  # the fn may swallow _TooMany

    return Backend(
        name="jax",
        dtypes=DTYPES,
        device=device,
        # rounded on the host (NumPy rounds to nearest, as XLA does): on the device, a compilation
        # per shape and dtype, two thirds of a quick JAX verdict's; bfloat16, which NumPy lacks, there
        asarray=lambda a, dtype: jax.device_put(
            jnp.asarray(a, dtype=jnp.bfloat16) if dtype == "bfloat16" else np.asarray(a, dtype=dtype), where
        ),
        to_numpy=lambda a: np.asarray(a).astype(np.float64),  # exact, on the host too
        namespace=jnp,
        compile=compile_,
        synchronize=lambda out: out.block_until_ready(),
        release=release,
        compilations=lambda: count[0],
        traces=traces,
        abstract=jax.ShapeDtypeStruct,
        loop_tokens=16,
        programs=programs,
        protect=lambda a: True,  # immutable
    )


#: Compilations faster than this are not written to JAX's disk cache. All are: eager JAX
#: compiles each primitive per shape: a kv_cache_decode search on JAX (10 examples) took
#: 165 s cold and 48 s with every compilation cached (writing them all cost nothing seen).
PERSISTENT_MIN_COMPILE_S = 0.0


def _persistent_compilation_cache(jax: Any) -> None:
    """Compiled XLA programs kept on disk beside the truth cache (`jax-compiled/`), so a
    second run, and every worker of a run, compiles each program once: JAX compilations
    were most of a warm run's time. Off where the truth cache is off."""
    from oracles.reference import cache_dir

    folder = cache_dir()
    if folder is not None and not jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        jax.config.update("jax_compilation_cache_dir", str(folder / "jax-compiled"))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # nor the user's threshold
            jax.config.update("jax_persistent_cache_min_compile_time_secs", PERSISTENT_MIN_COMPILE_S)


def _torch(device: str) -> Backend:
    import array_api_compat.torch as xp
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"torch {torch.__version__} sees no cuda device (torch.cuda.is_available() is False)")
    # what a rewrite creates without device= lands on the device too
    _ON_SWITCH["torch"] = lambda d: torch.set_default_device(None if d == "cpu" else d)
    _ON_SWITCH["torch"](device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def synchronize(out: Any) -> Any:
        sync()
        return out

    return Backend(
        name="torch",
        dtypes=DTYPES,
        device=device,
        asarray=lambda a, dtype: torch.tensor(np.asarray(a, np.float64), dtype=getattr(torch, dtype), device=device),
        to_numpy=lambda a: a.detach().to(device="cpu", dtype=torch.float64).numpy(),
        namespace=xp,
        synchronize=synchronize,
    )


_FACTORIES = {"numpy": _numpy, "jax": _jax, "torch": _torch}


def use_device(device: str) -> None:
    """Compute on `device` ("cpu" or "cuda") from now on in this process: `get` returns the
    backends loaded for it, and each loaded one makes it its default for new arrays. Arrays
    made before stay where they are."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if device != _DEVICE[0]:
        _DEVICE[0] = device
        for name, switch in _ON_SWITCH.items():
            if unavailable_reason(name) is None:  # loads it for `device` (or says why not)
                switch(device)


def device() -> str:
    """The device this process computes on."""
    return _DEVICE[0]


@cache
def _load(name: str, device: str) -> Backend | str:
    try:
        return _FACTORIES[name](device)
    except ImportError as e:  # a missing optional dependency, not a bug
        return f"backend {name!r} is not installed ({e}); install attention-rewrites[{name}]"
    except BackendUnavailable as e:  # installed, but not on this device
        return str(e)


def get(name: str) -> Backend:
    """The backend called `name`; raises BackendUnavailable with the reason if it cannot load."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(NAMES)}")
    loaded = _load(name, _DEVICE[0])
    if isinstance(loaded, str):
        raise BackendUnavailable(loaded)
    return loaded


def unavailable_reason(name: str) -> str | None:
    """Why `name` cannot be used, or None if it can."""
    loaded = _load(name, _DEVICE[0])
    return loaded if isinstance(loaded, str) else None


def available() -> list[str]:
    """The names of the backends that import on this machine."""
    return [n for n in NAMES if unavailable_reason(n) is None]
