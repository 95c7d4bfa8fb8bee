"""oracles/heap.py: a judging process keeps the memory of its large arrays once freed."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

# A fresh interpreter, since the setting is for the whole process (and pytest's is already
# set by conftest): allocate 128 MB, free it, and say from glibc's mallinfo2 whether it had an
# mmap of its own and how much free memory the heap keeps.
PROBE = """
import ctypes, sys
import numpy as np
from oracles.heap import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = libc.mallinfo2()
a = np.ones(2**24)  # 128 MB
held = libc.mallinfo2()
del a
freed = libc.mallinfo2()
print(held.hblks - before.hblks, freed.fordblks)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    mmapped, free_in_heap = map(int, out.split())
    return mmapped, free_in_heap


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33+ only (mallinfo2)")
def test_a_retaining_process_keeps_a_freed_large_array_in_its_heap():
    mmapped, free_in_heap = _probe("retain")
    assert mmapped == 0  # the 128 MB came from the heap, not an mmap of its own
    assert free_in_heap >= 2**27  # and stayed there once freed, for the next array
    mmapped, free_in_heap = _probe("default")  # glibc's default: its own mmap, unmapped when freed
    assert mmapped >= 1
    assert free_in_heap < 2**27
