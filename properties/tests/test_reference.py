"""The truth cache (oracles/reference.py): right values, shared where inputs agree, on disk
for large problems, never stale, and never an error because of the disk."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import oracles
from oracles import backends
from oracles import reference as cache
from oracles.problem import AttentionProblem
from properties import checks


def small_problem(seed: int = 0, n_seq: int = 4, n_embd: int = 8, n_head: int = 2, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return AttentionProblem(
        scale * rng.standard_normal((n_seq, n_embd)),
        rng.standard_normal((n_embd, 3 * n_embd)) / np.sqrt(n_embd),
        rng.standard_normal(3 * n_embd),
        rng.standard_normal((n_embd, n_embd)) / np.sqrt(n_embd),
        rng.standard_normal(n_embd),
        n_head=n_head,
    )


@pytest.fixture
def disk(tmp_path, monkeypatch) -> Path:
    """An empty cache folder that takes every problem, and an empty memory; restored after."""
    folder = tmp_path / "truth"
    monkeypatch.setattr(cache, "_chosen_dir", cache._chosen_dir)
    monkeypatch.setattr(cache, "_unwritable", set())
    monkeypatch.setattr(cache, "DISK_MIN_ELEMENTS", 1)
    cache.set_cache_dir(folder)
    cache.clear_memory()
    yield folder
    cache.clear_memory()


@pytest.fixture
def truths(monkeypatch) -> list:
    """Every ground truth computed from here on (oracles.ground_truth counted)."""
    made, real = [], oracles.ground_truth
    monkeypatch.setattr(oracles, "ground_truth", lambda p, *a: made.append(p) or real(p, *a))
    return made


def forbid_truths(monkeypatch) -> None:
    def fail(*_):
        raise AssertionError("the truth was computed, not read back")

    monkeypatch.setattr(oracles, "ground_truth", fail)


def files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def assert_same(ref: cache.Reference, problem: AttentionProblem, backend: str, dtype: str) -> None:
    fresh = oracles.ground_truth(oracles.rounded(problem, backend, dtype))
    np.testing.assert_array_equal(ref.out, fresh.out)
    np.testing.assert_array_equal(ref.tolerance, fresh.tolerance(dtype))
    assert ref.dtype == dtype


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_reference_equals_a_fresh_truth_computed_and_read_back(disk, dtype):
    problem = small_problem()
    assert_same(cache.reference(problem, "numpy", dtype), problem, "numpy", dtype)
    cache.clear_memory()
    assert_same(cache.reference(problem, "numpy", dtype), problem, "numpy", dtype)


def test_reference_is_read_only_and_served_from_memory(disk, truths):
    problem = small_problem()
    ref = cache.reference(problem, "numpy", "float32")
    assert cache.reference(problem, "numpy", "float32") is ref
    assert len(truths) == 1
    assert not ref.out.flags.writeable and not ref.tolerance.flags.writeable


def test_a_second_process_reads_the_disk_instead_of_computing(disk, monkeypatch):
    problem = small_problem()
    first = cache.reference(problem, "numpy", "float32")
    assert [p.suffix for p in files(disk)] == [".npy"]  # one file, no temp file left behind
    cache.clear_memory()
    forbid_truths(monkeypatch)
    again = cache.reference(small_problem(), "numpy", "float32")  # a new object, same content
    np.testing.assert_array_equal(again.out, first.out)
    np.testing.assert_array_equal(again.tolerance, first.tolerance)


def test_a_real_second_process_reads_the_disk(disk, tmp_path):
    problem = small_problem()
    first = cache.reference(problem, "numpy", "float64")
    saved = problem.save(tmp_path / "problem.npz")
    script = f"""
import numpy as np, oracles
from oracles import reference as cache
from oracles.problem import AttentionProblem
cache.DISK_MIN_ELEMENTS = 1
cache.set_cache_dir({str(disk)!r})
oracles.ground_truth = None  # computing would raise
ref = cache.reference(AttentionProblem.load({str(saved)!r}), "numpy", "float64")
np.save({str(tmp_path / "got.npy")!r}, np.stack([ref.out, ref.tolerance]))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2])
    got = np.load(tmp_path / "got.npy")
    np.testing.assert_array_equal(got, np.stack([first.out, first.tolerance]))


def test_small_problems_stay_off_the_disk(disk, monkeypatch):
    # size: inputs plus scores, 4 x 8 + 2 heads x 4^2 = 64 at 4 tokens, 40 + 2 x 5^2 = 90 at 5
    assert cache.size(small_problem(n_seq=4)) == 64 and cache.size(small_problem(n_seq=5)) == 90
    monkeypatch.setattr(cache, "DISK_MIN_ELEMENTS", 65)
    cache.reference(small_problem(n_seq=4), "numpy", "float32")
    assert files(disk) == []
    cache.reference(small_problem(n_seq=5), "numpy", "float32")
    assert len(files(disk)) == 1


def test_a_changed_input_gives_another_key(disk, truths):
    problem = small_problem()
    x = problem.x.copy()
    x[-1, -1] += 0.5
    changed = replace(problem, x=x)
    a, b = cache.reference(problem, "numpy", "float64"), cache.reference(changed, "numpy", "float64")
    assert len(truths) == 2 and len(files(disk)) == 2
    assert not np.array_equal(a.out, b.out)
    cache.reference(replace(problem, n_head=4), "numpy", "float64")  # same arrays, other heads
    assert len(truths) == 3 and len(files(disk)) == 3


def test_each_dtype_has_its_own_entry_but_identical_inputs_share_the_truth(disk, truths):
    """Inputs exact in float16 round to themselves in every dtype: one truth, three tolerances."""
    rng = np.random.default_rng(1)
    problem = AttentionProblem(*(rng.integers(-4, 5, a.shape) / 4 for a in small_problem().arrays()), n_head=2)
    refs = [cache.reference(problem, "numpy", dt) for dt in ("float64", "float32", "float16")]
    assert len(truths) == 1
    assert len(files(disk)) == 3
    assert refs[0].tolerance.max() < refs[1].tolerance.max() < refs[2].tolerance.max()


def test_backends_that_round_alike_share_the_reference(disk, truths):
    if backends.unavailable_reason("torch"):
        pytest.skip("torch is not installed")
    problem = small_problem()
    assert cache.reference(problem, "numpy", "float32") is cache.reference(problem, "torch", "float32")
    assert len(truths) == 1


def test_the_code_fingerprint_is_part_of_the_key(disk, truths, monkeypatch):
    truth_py = Path(oracles.truth.__file__).read_bytes()
    assert cache.code_fingerprint() == hashlib.sha1(truth_py).hexdigest()
    problem = small_problem()
    cache.reference(problem, "numpy", "float32")
    key = cache.disk_key("some inputs", "float32")
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "a changed bound")
    assert cache.disk_key("some inputs", "float32") != key
    cache.clear_memory()
    cache.reference(problem, "numpy", "float32")  # the old file must not be served
    assert len(truths) == 2 and len(files(disk)) == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(p.read_bytes()[:-7]),  # truncated
        lambda p: p.write_bytes(b"PK\x03\x04 not an array at all"),
        lambda p: np.save(p, np.zeros((2, 3))),  # an array of the wrong shape
        lambda p: np.save(p, np.array([{"a": 1}], dtype=object)),  # pickled
    ],
    ids=["empty", "truncated", "garbage", "wrong-shape", "pickle"],
)
def test_a_corrupt_file_is_recomputed_and_rewritten(disk, truths, damage):
    problem = small_problem()
    cache.reference(problem, "numpy", "float32")
    (path,) = files(disk)
    damage(path)
    cache.clear_memory()
    ref = cache.reference(problem, "numpy", "float32")
    assert len(truths) == 2
    assert_same(ref, problem, "numpy", "float32")
    np.testing.assert_array_equal(np.load(path), np.stack([ref.out, ref.tolerance]))


def test_an_unwritable_folder_keeps_references_in_memory_with_one_warning(disk, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    cache.set_cache_dir(blocker / "truth")  # cannot be created, even by root
    problem = small_problem()
    with pytest.warns(UserWarning, match="memory only"):
        ref = cache.reference(problem, "numpy", "float32")
    assert_same(ref, problem, "numpy", "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.reference(small_problem(seed=2), "numpy", "float32")
    assert cache.reference(problem, "numpy", "float32") is ref


def test_a_failed_write_leaves_no_file(disk, monkeypatch):
    def full(*_, **__):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.warns(UserWarning):
        cache.reference(small_problem(), "numpy", "float32")
    assert files(disk) == []


def test_the_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "_chosen_dir", cache._UNSET)
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    assert cache.cache_dir() == tmp_path
    monkeypatch.setenv(cache.ENV_VAR, "")
    assert cache.cache_dir() is None
    monkeypatch.delenv(cache.ENV_VAR)
    assert cache.cache_dir() == Path.home() / ".cache/attention-rewrites/truth"
    cache.set_cache_dir(None)
    assert cache.cache_dir() is None


def test_no_disk_means_memory_only(disk, monkeypatch):
    cache.set_cache_dir(None)
    problem = small_problem()
    assert_same(cache.reference(problem, "numpy", "float32"), problem, "numpy", "float32")
    assert files(disk) == []


def test_memory_drops_the_least_recently_used_past_its_byte_limit():
    lru = cache.LRU(limit=25)
    for k in "abc":
        lru.put((k,), k, 10)
        lru.get(("a",))
    assert [k for (k,) in lru.items] == ["c", "a"] and lru.total == 20
    lru.put(("c",), "c", 30)  # re-measured: the newest stays even alone over the limit
    assert [k for (k,) in lru.items] == ["c"] and lru.total == 30


def test_representable_and_excess(disk):
    problem = small_problem(scale=1e4)  # logits beyond what float16 holds
    for dtype in ("float64", "float16"):
        ref = cache.reference(problem, "numpy", dtype)
        truth = checks.truth_for(problem, "numpy", dtype)
        assert ref.representable == checks.representable(truth, dtype) == (dtype == "float64")
    ref = cache.reference(small_problem(), "numpy", "float32")
    assert ref.excess(ref.out) == 0
    assert ref.excess(ref.out + 2 * ref.tolerance) == pytest.approx(2)
    assert ref.excess(ref.out[..., -1:, :], np.s_[..., -1:, :]) == 0
    assert ref.excess(np.full_like(ref.out, np.nan)) == np.inf
    assert cache.excess(np.zeros(2), np.zeros(2), np.zeros(2)) == 0  # 0/0 counts as 0
