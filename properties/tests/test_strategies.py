"""The strategies generate what their docstrings say: lengths at and between the rungs of the
ladder, shrinking to the shortest failing length, dense values in large arrays, bounded sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis.errors import InvalidArgument, NoSuchExample

from properties.strategies import (
    BATCHES,
    LENGTH_LADDER,
    SIZE_LIMITS,
    SizeLimits,
    attention_problems,
    long_attention_problems,
    sequence_lengths,
)

#: Derandomised, so each test sees the same examples on every run.
SEARCH = settings(
    max_examples=1000, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
GAPS = [(lo, hi) for lo, hi in itertools.pairwise(LENGTH_LADDER) if hi - lo > 1]


@pytest.mark.parametrize("rung", LENGTH_LADDER)
def test_sequence_lengths_reach_every_rung(rung):
    assert find(sequence_lengths(), lambda n: n == rung, settings=SEARCH) == rung


@pytest.mark.parametrize(("lo", "hi"), GAPS, ids=[f"{lo}-{hi}" for lo, hi in GAPS])
def test_sequence_lengths_reach_between_rungs_and_shrink_to_the_shortest(lo, hi):
    assert find(sequence_lengths(), lambda n: lo < n < hi, settings=SEARCH) == lo + 1


@settings(SEARCH, max_examples=100)
@given(n=sequence_lengths(max_len=100))
def test_sequence_lengths_stop_at_max_len(n):
    assert 1 <= n <= 100


def test_max_len_is_the_top_rung_and_between_false_stays_on_the_ladder():
    assert find(sequence_lengths(max_len=100), lambda n: n > 65, settings=SEARCH) == 66
    assert find(sequence_lengths(max_len=100), lambda n: n == 100, settings=SEARCH) == 100
    assert find(sequence_lengths(), lambda n: n > 1000, settings=SEARCH) == 1001  # 1000 is not on the grid
    assert find(sequence_lengths(between=False), lambda n: n > 300, settings=SEARCH) == 511
    assert find(sequence_lengths(ladder=(4, 9)), lambda n: n != 4, settings=SEARCH) == 5


@pytest.mark.parametrize(("threshold", "shortest"), [(300, 301), (64, 65)])
def test_long_problems_shrink_to_the_shortest_failing_length(threshold, shortest):
    """n_seq is monotone in the choices behind it and every problem makes the same number
    of choices, so a failure at every n_seq > threshold shrinks to the shortest length the
    strategy can draw above it, in the smallest shape: 301 lies in the gap 257..511, whose
    253 lengths are all reachable; 65 is a rung. (Past 1000 it would be 1001: the gap
    513..1023 holds a grid of 255 lengths, 514 + k * 509 // 255, with 999 and 1001.)"""
    p = find(long_attention_problems(), lambda p: p.n_seq > threshold, settings=SEARCH)
    assert (p.n_seq, p.n_head, p.head_dim, p.x.shape[:-2]) == (shortest, 1, 1, ())


def _assert_dense(p):
    assert "dense seed=" in p.label, p.label
    assert np.unique(p.x).size > 0.9 * p.x.size, p.describe()
    if p.n_head >= 2 and p.c_attn_w.size > 64:
        q = p.c_attn_w[:, : p.n_embd]
        assert not np.array_equal(q[:, : p.head_dim], q[:, p.head_dim : 2 * p.head_dim]), "heads 0 and 1 are equal"


def test_long_problems_with_two_heads_are_dense():
    p = find(long_attention_problems(), lambda p: p.n_head >= 2 and p.n_seq > 256 and p.n_embd > 4, settings=SEARCH)
    _assert_dense(p)


@settings(SEARCH, max_examples=60)
@given(p=long_attention_problems())
def test_large_arrays_are_dense(p):
    if p.x.size > 64:
        _assert_dense(p)
    sizes = [a.size for a in p.arrays()]
    if all(s <= 64 for s in sizes) and sum(sizes) <= 64:
        assert "dense" not in p.label


@settings(SEARCH, max_examples=150)
@given(p=long_attention_problems())
def test_long_problems_stay_within_the_size_limits(p):
    batch = p.x.shape[:-2]
    assert SIZE_LIMITS.allows(batch, p.n_seq, p.n_head, p.head_dim)
    assert int(np.prod(batch)) * p.n_head * p.n_seq**2 <= 2 * 2049**2
    if p.n_seq > 64:
        assert p.n_embd <= 128 and batch in ((), (2,)), p.describe()


def test_gpt2_head_shape_only_at_short_lengths():
    first = settings(SEARCH, phases=[Phase.generate])  # the first found: shrinking GPT-2 shapes is slow
    assert find(long_attention_problems(), lambda p: p.n_embd == 768, settings=first).n_seq <= 64
    assert not SIZE_LIMITS.allows((), 65, 12, 64) and SIZE_LIMITS.allows((2, 1), 64, 12, 64)
    assert not SIZE_LIMITS.allows((2,), 2049, 2, 64) and SIZE_LIMITS.allows((), 2049, 2, 64)
    assert not SIZE_LIMITS.allows((1,), 100, 1, 1) and SIZE_LIMITS.allows((2,), 100, 1, 128)
    assert not SizeLimits(max_scores=100).allows((), 11, 1, 1)
    assert not SIZE_LIMITS.allows((3, 5), 16, 12, 64) and SIZE_LIMITS.allows((3, 5), 64, 2, 64)


@settings(SEARCH, max_examples=100)
@given(p=attention_problems())
def test_default_problems_are_as_before(p):
    assert p.n_seq <= 6 and p.n_head <= 3 and p.head_dim <= 4 and p.x.shape[:-2] in BATCHES
    assert "dense" not in p.label and np.abs(p.x).max(initial=0) <= 2


@settings(SEARCH, max_examples=50)
@given(p=attention_problems(lengths=[7, 100], head_shapes=[(3, 5), (12, 64)], dense_above=64))
def test_lengths_and_head_shapes_are_kept_within_the_limits(p):
    assert p.n_seq in (7, 100)
    assert (p.n_head, p.head_dim) == (3, 5) or p.n_seq == 7
    assert p.n_seq == 7 or p.x.shape[:-2] in ((), (2,))


def test_no_head_shape_that_fits_is_an_error():
    with pytest.raises(InvalidArgument, match="no head shape"):
        find(attention_problems(lengths=[100], head_shapes=[(12, 64)]), lambda p: True, settings=SEARCH)


MENU = (((), 1, 1, 1), ((3, 5), 7, 7, 2), ((), 300, 2, 64))


@settings(SEARCH, max_examples=50)
@given(p=long_attention_problems(shape_menu=MENU))
def test_a_shape_menu_gives_its_shapes_only(p):
    assert (p.x.shape[:-2], p.n_seq, p.n_head, p.head_dim) in MENU


def test_a_shape_menu_shrinks_to_its_first_failing_entry_and_names_a_bad_one():
    assert find(long_attention_problems(shape_menu=MENU), lambda p: p.n_seq > 5, settings=SEARCH).n_seq == 7
    assert find(long_attention_problems(shape_menu=MENU), lambda p: p.n_embd > 14, settings=SEARCH).n_seq == 300
    with pytest.raises(InvalidArgument, match=r"shape_menu entry \(\(\), 0, 1, 1\)"):
        find(attention_problems(shape_menu=[((), 0, 1, 1)]), lambda p: True, settings=SEARCH)
    with pytest.raises(InvalidArgument, match="shape_menu is empty"):
        find(attention_problems(shape_menu=[]), lambda p: True, settings=SEARCH)


#: The fewest examples a quick search takes: pytest's (conftest.EXAMPLES)
QUICK_EXAMPLES = 20


def test_the_few_shapes_searches_see_every_shape_of_their_menus_within_the_limits():
    """On a backend that compiles per shape, `verify`'s searches draw from FEW_SHORT and
    FEW_LONG, pytest's quick ones from QUICK_SHAPES (bands of two shapes each): the formula
    search (moderate inputs, float64) and each dtype's own search meet every shape of their
    menus in their examples, and every shape is one the free draws could take (within
    SIZE_LIMITS)."""
    from rewrites.verify import Config, inputs
    from rewrites.verify.search import band_share, without_local_constants

    without_local_constants()  # as `verify` draws
    few, quick, full = inputs.FULL.few_shapes, inputs.QUICK.few_shapes, Config().examples
    for shape in (*inputs.FEW_SHORT, *inputs.FEW_LONG, *inputs.QUICK_SHAPES):
        assert SIZE_LIMITS.allows(shape[0], *shape[1:]), shape
    for bands, menu, examples in [(few.moderate, inputs.FEW_SHORT + inputs.FEW_LONG, full),
                                  (few.extreme, inputs.FEW_SHORT + inputs.FEW_LONG, full),
                                  (few.extreme_for("float16"), inputs.FEW_SHORT, full),
                                  (quick.moderate, inputs.QUICK_SHAPES, QUICK_EXAMPLES),
                                  (quick.extreme, inputs.QUICK_SHAPES, QUICK_EXAMPLES)]:  # fmt: skip
        seen: set = set()
        record = lambda p, seen=seen: seen.add((p.x.shape[:-2], p.n_seq, p.n_head, p.head_dim)) and False
        for i, band in enumerate(bands):
            share = band_share(examples, i, len(bands))
            with pytest.raises(NoSuchExample):
                find(band, record, settings=settings(SEARCH, max_examples=share, phases=[Phase.generate]))
        assert seen == set(menu)
