"""The project's one truth cache: what judging an output needs of the float64 truth.

`reference(problem, backend, dtype)` is the truth's output and tolerance for `problem` as
`backend` rounds it to `dtype`. Entries are keyed by the content of the rounded inputs, so
backends that round alike share them. They live in memory (least recently used go past
MEMORY_BYTES) and, for problems of DISK_MIN_ELEMENTS outputs or more (a real layer at full
context: its truth costs ~2 s and each bound ~5 s), as .npy files that later processes and
runs read back. The disk key holds a fingerprint of oracles/truth.py, so a changed bound
never serves stale tolerances.

Folder: $ATTENTION_REWRITES_CACHE (empty: no disk), else ~/.cache/attention-rewrites/truth,
unless `set_cache_dir` chose one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import oracles
from oracles import truth as truth_module
from oracles.problem import AttentionProblem
from oracles.truth import Truth

#: Problems this large or larger go to disk (see `size`; a GPT-2 layer at n_seq 1024 is ~13M).
DISK_MIN_ELEMENTS = 8_192
#: A full-context GPT-2 truth holds a few hundred MB of intermediates; Hypothesis's are tiny.
MEMORY_BYTES = 2 * 2**30
ENV_VAR = "ATTENTION_REWRITES_CACHE"
DEFAULT_DIR = Path("~/.cache/attention-rewrites/truth")
FORMAT = 1  # bump when the file layout changes


@dataclass(frozen=True, eq=False)
class Reference:
    """The truth of one problem as one dtype sees it: its output and what an output may differ by."""

    out: np.ndarray  # [..., n_seq, n_embd] float64 truth of the rounded problem
    tolerance: np.ndarray  # same shape: Truth.tolerance(dtype)
    dtype: str

    @property
    def representable(self) -> bool:
        """Whether a correct computation in `dtype` exists (no true intermediate overflows it):
        an input no dtype can hold says nothing about a program."""
        return bool(np.isfinite(self.tolerance).all())

    def excess(self, out: np.ndarray, sl: Any = np.s_[...]) -> float:
        """max |out - truth| / tolerance over the selection `sl` of the output."""
        return excess(out, self.out[sl], self.tolerance[sl])


def excess(out: np.ndarray, expected: np.ndarray, tolerance: np.ndarray) -> float:
    """max |out - expected| / tolerance (inf for a non-finite output; 0/0 counts as 0)."""
    if not np.isfinite(out).all():
        return np.inf
    err = np.abs(out - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(np.where(err == 0, 0.0, err / tolerance), initial=0.0))


# --- memory ------------------------------------------------------------------------------


class LRU:
    """Values by key, least recently used dropped once they hold more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total = limit, 0
        self.items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()

    def get(self, key: tuple) -> Any:
        if key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key][0]

    def put(self, key: tuple, value: Any, nbytes: int) -> None:
        """Store (or re-measure) `value`; the newest entry stays even if alone over the limit."""
        if key in self.items:
            self.total -= self.items.pop(key)[1]
        self.items[key] = (value, nbytes)
        self.total += nbytes
        while self.total > self.limit and len(self.items) > 1:
            self.total -= self.items.popitem(last=False)[1][1]

    def clear(self) -> None:
        self.items.clear()
        self.total = 0


_MEMORY = LRU(MEMORY_BYTES)
_KEYS: weakref.WeakKeyDictionary[AttentionProblem, dict[tuple[str, str], str]] = weakref.WeakKeyDictionary()


def clear_memory() -> None:
    """Forget every truth and reference held in memory (the disk cache stays)."""
    _MEMORY.clear()
    _KEYS.clear()


def _truth_bytes(t: Truth) -> int:
    arrays = (t.out, t.qkv, t.z, t.p, t.o, *t.problem.arrays(), *t._bounds.values())
    return sum(a.nbytes for a in arrays)


def _content_key(problem: AttentionProblem) -> str:
    h = hashlib.sha1(repr((problem.n_head, problem.x.shape)).encode())
    for a in problem.arrays():
        h.update(np.ascontiguousarray(a))  # the buffer itself: no copy of a 14 MB layer
    if problem.segments is not None:  # the layout changes the truth
        h.update(b"segments" + np.ascontiguousarray(problem.segments, np.int64).tobytes())
    return h.hexdigest()


def rounded_key(problem: AttentionProblem, backend: str, dtype: str) -> tuple[str, AttentionProblem | None]:
    """Content key of the rounded problem, computed once per problem object, backend and
    dtype (a real layer is ~14 MB); the rounded problem too when it had to be made."""
    keys = _KEYS.setdefault(problem, {})
    if (backend, dtype) in keys:
        return keys[(backend, dtype)], None
    rounded = oracles.rounded(problem, backend, dtype)
    keys[(backend, dtype)] = _content_key(rounded)
    return keys[(backend, dtype)], rounded


def _truth(key: str, rounded: AttentionProblem) -> Truth:
    truth = _MEMORY.get(("truth", key))
    if truth is None:
        truth = oracles.ground_truth(rounded)
        _MEMORY.put(("truth", key), truth, _truth_bytes(truth))
    return truth


def truth_for(problem: AttentionProblem, backend: str, dtype: str) -> Truth:
    """The full Truth (intermediates included) of `problem` as `backend` sees it in `dtype`,
    from the memory cache `reference` also uses. Prefer `reference` where out and tolerance
    are enough: it can come from disk."""
    key, rounded = rounded_key(problem, backend, dtype)
    return _truth(key, rounded if rounded is not None else oracles.rounded(problem, backend, dtype))


# --- disk --------------------------------------------------------------------------------

_UNSET = object()
_chosen_dir: Any = _UNSET
_unwritable: set[Path] = set()


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Use `path` as the disk cache folder from now on; None keeps references in memory only."""
    global _chosen_dir
    _chosen_dir = None if path is None else Path(path)


def cache_dir() -> Path | None:
    """The disk cache folder in use, or None when the disk is off."""
    if _chosen_dir is not _UNSET:
        return _chosen_dir
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return Path(env).expanduser() if env else None
    return DEFAULT_DIR.expanduser()


@functools.cache
def code_fingerprint() -> str:
    """sha1 of the code that defines the truth and its bound: part of every disk key."""
    return hashlib.sha1(Path(truth_module.__file__).read_bytes()).hexdigest()


def disk_key(key: str, dtype: str) -> str:
    """File stem of the reference of rounded inputs `key` in `dtype`."""
    return hashlib.sha1(f"{FORMAT}:{code_fingerprint()}:{key}:{dtype}".encode()).hexdigest()


def _path(key: str, dtype: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"{disk_key(key, dtype)}.npy"


def _read(path: Path, shape: tuple[int, ...], dtype: str) -> Reference | None:
    """The stored reference, or None when missing or unreadable (it is then recomputed)."""
    try:
        both = np.load(path, allow_pickle=False)
    except Exception:  # missing, truncated, not an array: any of numpy's many errors
        return None
    if not isinstance(both, np.ndarray) or both.shape != (2, *shape) or both.dtype != np.float64:
        return None
    both.flags.writeable = False
    return Reference(both[0], both[1], dtype)


def _write(path: Path, ref: Reference) -> None:
    _write_array(path, np.stack([ref.out, ref.tolerance]))


def _write_array(path: Path, array: np.ndarray) -> None:
    """Write atomically (temp file in the same folder, then rename), so a concurrent reader
    sees the whole file or none; an unwritable folder warns once and is left alone."""
    folder = path.parent
    if folder in _unwritable:
        return
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is not secret
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _unwritable.add(folder)
        warnings.warn(f"truth cache: cannot write {folder} ({e}); keeping references in memory only", stacklevel=3)


def size(problem: AttentionProblem) -> int:
    """What a problem costs the truth, in elements: its input and its attention scores
    (n_seq^2 per head and batch item, which dominate at long lengths)."""
    scores = int(np.prod(problem.x.shape[:-2], dtype=np.int64)) * problem.n_head * problem.n_seq**2
    return problem.x.size + scores


def stored(parts: tuple, shape: tuple[int, ...], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """A float64 array of `shape` kept on disk under a key made of `parts` (content keys and
    the fingerprints of the code that computes it): read when present and sound, else
    computed and written. For long intermediates other than references: oracle outputs,
    the real layers' inputs along the attention path."""
    folder = cache_dir()
    stem = hashlib.sha1(repr((FORMAT, *parts)).encode()).hexdigest()
    path = None if folder is None else folder / f"{stem}.npy"
    if path is not None:
        try:
            a = np.load(path, allow_pickle=False)
            if isinstance(a, np.ndarray) and a.shape == shape and a.dtype == np.float64:
                return a
        except Exception:  # missing or damaged: recomputed below
            pass
    a = np.asarray(compute(), np.float64)
    if path is not None:
        _write_array(path, a)
    return a


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha1 of a source file's bytes: a key part that changes when that code changes."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


# --- the reference -----------------------------------------------------------------------


def _frozen(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _compute(
    key: str, problem: AttentionProblem, backend: str, dtype: str, rounded: AttentionProblem | None
) -> Reference:
    truth = _truth(key, rounded if rounded is not None else oracles.rounded(problem, backend, dtype))
    ref = Reference(_frozen(truth.out), _frozen(truth.tolerance(dtype)), dtype)
    _MEMORY.put(("truth", key), truth, _truth_bytes(truth))  # re-measured: it now holds bounds
    return ref


def reference(problem: AttentionProblem, backend: str, dtype: str) -> Reference:
    """Truth output and tolerance of `problem` as `backend` sees it in `dtype` (inputs
    rounded): from memory, else from disk (large problems), else computed and stored."""
    key, rounded = rounded_key(problem, backend, dtype)
    ref = _MEMORY.get(("ref", key, dtype))
    if ref is not None:
        return ref
    path = _path(key, dtype) if size(problem) >= DISK_MIN_ELEMENTS else None
    ref = _read(path, problem.x.shape, dtype) if path is not None else None
    if ref is None:
        ref = _compute(key, problem, backend, dtype, rounded)
        if path is not None:
            _write(path, ref)
    _MEMORY.put(("ref", key, dtype), ref, ref.out.nbytes + ref.tolerance.nbytes)
    return ref
