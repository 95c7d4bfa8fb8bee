"""Running one rewrite on one problem: fresh inputs in the backend's dtype, the output
checked (shape, dtype, array type) and brought back to float64 (judged in judge.py).

A rewrite is untrusted code. It gets its own copies of the inputs (the problem's arrays,
which searches share, are made read-only), and a call that changes them is an error: it
would otherwise corrupt whatever runs next. Where the backend can make them unwritable
(`Backend.protect`: JAX's are immutable, NumPy's read-only) a write fails in the call and
it is run again on writable copies to name the input; elsewhere (PyTorch) copies are
compared after every call (at 1024 tokens that was a fifth of a NumPy verdict's time).
A failing output is computed twice, so that a rewrite whose output changes between calls
on the same input is reported as nondeterministic, not judged on whichever output came
first (and Hypothesis, replaying the input, does not see it pass)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from array_api_compat import array_namespace

import oracles
from oracles import backends
from oracles.problem import WEIGHTS, AttentionProblem

if TYPE_CHECKING:
    from rewrites.registry import Rewrite

N_HEAD_ARG = (5,)  # n_head, the sixth argument of every rewrite, is a Python int (static under jit)
INPUT_NAMES = ("x", *WEIGHTS)


@dataclass(frozen=True)
class LayoutArg:
    """The seventh argument a padded or packed rewrite takes: its name, how the problem gives
    it, and whether it has one value per position (then it grows with n_seq, like x)."""

    name: str
    of: Callable[[AttentionProblem], np.ndarray]
    per_position: bool


LAYOUT_ARG = {
    "padded": LayoutArg("attention_mask", AttentionProblem.attention_mask, per_position=True),  # [..., n_seq]
    "packed": LayoutArg("cu_seqlens", AttentionProblem.cu_seqlens, per_position=False),  # [n_documents + 1]
}
#: Failures of one rewrite x backend x dtype re-run to tell a wrong formula from noise;
#: once a rewrite is seen to be nondeterministic, every failure is.
RECHECKS = 3


class RewriteFailed(Exception):
    """The rewrite raised, or returned something that is not a valid output."""


def run_rewrite(rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem) -> np.ndarray:
    """The rewrite's output as float64 NumPy, or RewriteFailed naming what went wrong."""
    be = backends.get(backend)
    impl = rw.implementation(backend)
    if impl is None:
        raise RewriteFailed(rw.load_error or f"{rw.name} has no implementation for {backend}")
    known = NONDETERMINISM.known(rw, backend, dtype)
    if known:
        raise RewriteFailed(known)
    freeze(problem)
    args = rewrite_args(rw, problem, backend, dtype)  # fresh arrays for every call
    names = [*INPUT_NAMES, *_layout_name(rw)]
    if all([be.protect(a) for a in _arrays(args)]):  # nothing can write into them: no copies to compare
        out = _protected(rw, be, impl, names, problem, dtype, args)
    else:
        out = _compared(rw, be, impl, names, problem, dtype, args)
    try:  # `out` is the rewrite's object: its shape, dtype and conversion are its code too
        _check_output(rw, be, dtype, problem, args[0], out)
        return np.array(be.to_numpy(out), dtype=np.float64, copy=True)  # a copy: the rewrite may reuse its buffer
    except RewriteFailed:
        raise
    except Exception as e:
        raise RewriteFailed(f"returned a {type(out).__name__} that {backend} cannot read ({_line(e)})") from e


def _protected(rw: Rewrite, be: backends.Backend, impl: Any, names: list[str], problem: AttentionProblem,
               dtype: str, args: tuple) -> Any:  # fmt: skip
    """The call on unwritable inputs. One that tries to write into them is run again on
    writable copies, to say which input; one that made an input writeable changed it."""
    try:
        out = _call(be, impl, args, _positions(rw))
    except RewriteFailed as e:
        if not be.wrote_protected(str(e)):
            raise
        return _compared(rw, be, impl, names, problem, dtype)
    for name, a in zip(names, _arrays(args), strict=True):
        if getattr(getattr(a, "flags", None), "writeable", False):
            raise RewriteFailed(f"modified its input {name} (made it writeable)")
    return out


def _compared(rw: Rewrite, be: backends.Backend, impl: Any, names: list[str], problem: AttentionProblem,
              dtype: str, args: tuple | None = None) -> Any:  # fmt: skip
    """The call on writable inputs (`args`, else fresh ones), with copies compared after it."""
    args = args if args is not None else rewrite_args(rw, problem, be.name, dtype)
    arrays = _arrays(args)
    before = [np.array(be.to_numpy(a), copy=True) for a in arrays]
    out = _call(be, impl, args, _positions(rw))
    _check_inputs(be, names, arrays, before)
    return out


def _arrays(args: tuple) -> list:
    """A call's array arguments (all but n_head)."""
    return [a for i, a in enumerate(args) if i not in N_HEAD_ARG]


def rewrite_args(rw: Rewrite, problem: AttentionProblem, backend: str, dtype: str) -> tuple:
    """What `rw` is called with: the problem's arrays as `backend` arrays of `dtype`,
    n_head, and for a padded or packed rewrite the layout in its convention (int64)."""
    args = (*oracles.as_backend(problem, backend, dtype), problem.n_head)
    if rw.layout not in LAYOUT_ARG:
        return args
    return (*args, backends.get(backend).asarray(LAYOUT_ARG[rw.layout].of(problem), "int64"))


def _positions(rw: Rewrite) -> tuple[int, ...]:
    """The arguments with one value per position besides x (a padding mask): the seventh or none."""
    arg = LAYOUT_ARG.get(rw.layout)
    return (6,) if arg is not None and arg.per_position else ()


def _layout_name(rw: Rewrite) -> list[str]:
    return [LAYOUT_ARG[rw.layout].name] if rw.layout in LAYOUT_ARG else []


def reach(rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem) -> AttentionProblem:
    """The problem as `backend` runs `rw` on it: whole, or its first `Backend.tokens` tokens
    where rw is a loop per token whose steps grow or an unrolled loop per tile there (a
    causal prefix is a problem of its own)."""
    be, impl = backends.get(backend), rw.implementation(backend)
    if not be.compiles or impl is None or problem.n_seq <= backends.PROBE_TOKENS:
        return problem
    head = problem.prefix(backends.PROBE_TOKENS)
    try:
        limit = be.tokens(impl, rewrite_args(rw, head, backend, dtype), N_HEAD_ARG, _positions(rw))
    except Exception:  # it cannot be traced: running it will say why
        return problem
    return problem if limit is None or problem.n_seq <= limit else problem.prefix(limit)


def freeze(problem: AttentionProblem) -> None:
    """Make the problem's own arrays read-only: searches share them (cached real layers,
    known-hard examples), so nothing that runs may write into them."""
    for a in problem.arrays():
        if isinstance(a, np.ndarray) and a.flags.writeable:
            a.flags.writeable = False


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _call(be: backends.Backend, impl: Any, args: tuple, positions: tuple[int, ...]) -> Any:
    """Call the rewrite; whatever it raises, `sys.exit` included, is its error. NumPy's
    overflow and 0/0 warnings are not printed: a non-finite output is judged, not warned of
    (they reached the run's stderr from the diagnosis's probes)."""
    try:
        with np.errstate(all="ignore"):
            return be.runner(impl, args, N_HEAD_ARG, positions)(*args)
    except SystemExit as e:
        raise RewriteFailed(f"called sys.exit({e.code!r})") from e
    except Exception as e:
        raise RewriteFailed(f"raised {type(e).__name__}: {_line(e)}") from e


def _check_inputs(be: backends.Backend, names: list[str], arrays: list, before: list[np.ndarray]) -> None:
    """RewriteFailed if the call changed any of its inputs (compared value for value)."""
    for name, a, was in zip(names, arrays, before, strict=True):
        try:
            now = be.to_numpy(a)
        except Exception as e:  # replaced by something unreadable (torch .set_(), say)
            raise RewriteFailed(f"modified its input {name} ({_line(e)})") from e
        if now.shape != was.shape or not np.array_equal(now, was, equal_nan=True):
            raise RewriteFailed(f"modified its input {name}")


def _check_output(rw: Rewrite, be: backends.Backend, dtype: str, problem: AttentionProblem, x: Any, out: Any) -> None:
    """RewriteFailed unless `out` is an array of the inputs' kind, shape and dtype."""
    want = (*problem.x.shape[:-2], 1 if rw.output == "last" else problem.n_seq, problem.n_embd)
    shape, got_dtype = tuple(getattr(out, "shape", ())), str(getattr(out, "dtype", type(out).__name__))
    if shape != want:
        raise RewriteFailed(f"returned shape {list(shape)}, expected {list(want)} ({rw.output} output)")
    if got_dtype.rsplit(".", 1)[-1] != dtype:
        raise RewriteFailed(f"returned {got_dtype} for {dtype} inputs")
    if _namespace(out) is not _namespace(x):
        kind = f"{type(out).__module__.split('.')[0]}.{type(out).__name__}"
        raise RewriteFailed(f"returned a {kind} for {be.name} inputs")


def _namespace(a: Any) -> Any:
    try:
        return array_namespace(a)
    except TypeError:
        return None


class Nondeterminism:
    """What this process has seen of rewrites whose output changes between two calls on
    the same input. Once seen, every later call of that rewrite on that backend in that
    dtype fails at once with the same message (naming the input it was seen on): a search
    that replays or shrinks the failure gets one consistent answer, quickly. Other dtypes
    keep their own verdicts: they run other programs (picoGPT's mask on JAX is
    nondeterministic in float16 alone, where 0 * -1e10 is 0 * -inf)."""

    def __init__(self) -> None:
        self.confirmed: Counter[tuple] = Counter()  # failures that reproduced, per rewrite x backend x dtype
        self.seen: dict[tuple, str] = {}  # rewrite x backend x dtype -> message

    def known(self, rw: Rewrite, backend: str, dtype: str) -> str | None:
        return self.seen.get((*rw.identity, backend, dtype))

    def check(self, rw: Rewrite, backend: str, dtype: str, problem: AttentionProblem, out: np.ndarray) -> None:
        """Run a failing input again; RewriteFailed if the two outputs differ."""
        key = (*rw.identity, backend, dtype)
        if self.confirmed[key] >= RECHECKS:
            return
        again = run_rewrite(rw, backend, dtype, problem)
        if np.array_equal(out, again, equal_nan=True):
            self.confirmed[key] += 1
            return
        message = (
            f"nondeterministic: two calls on the same input differ {_difference(out, again)} ({problem.describe()})"
        )
        self.seen[key] = message
        raise RewriteFailed(message)


NONDETERMINISM = Nondeterminism()


def _difference(a: np.ndarray, b: np.ndarray) -> str:
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(all="ignore"):
        d = np.abs(a - b)[~same]
    finite = d[np.isfinite(d)]
    return f"by {finite.max():.3g}" if finite.size == d.size else "in which elements are NaN or inf"


def output_rows(rw: Rewrite) -> tuple:
    """The rows of the full output that the rewrite returns."""
    return np.s_[..., -1:, :] if rw.output == "last" else np.s_[...]
