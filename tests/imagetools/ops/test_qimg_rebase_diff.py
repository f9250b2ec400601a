"""Property: rebase's ``diff_runs`` finds exactly the runs that a plain
sector-by-sector comparison finds (the definition qemu-img's compare_buffers
walk implements), whatever the buffers, their length and where they differ.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from imagetools.ops.rebase import DIFF_BLOCK, SECTOR, diff_runs


def reference_runs(old: bytes, new: bytes, n: int) -> list[tuple[int, int]]:
    """Maximal runs of differing 512-byte sectors of the first ``n`` bytes,
    one sector at a time."""
    runs: list[tuple[int, int]] = []
    for start in range(0, n, SECTOR):
        stop = min(n, start + SECTOR)
        if old[start:stop] != new[start:stop]:
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
    return runs


EDITS = st.lists(st.tuples(st.integers(0, 3 * DIFF_BLOCK + 2000),   # where
                           st.integers(1, 70_000),                   # how long
                           st.integers(0, 255)),                     # byte written
                 max_size=12)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 3 * DIFF_BLOCK + 2000), cut=st.integers(0, 1200), seed=st.integers(0, 7),
       edits=EDITS, kind=st.sampled_from(["bytearray", "bytes", "memoryview"]))
def test_diff_runs_is_the_sector_by_sector_definition(size, cut, seed, edits, kind):
    rng = random.Random(seed)
    old = bytearray(rng.randbytes(size) if seed % 2 else bytes(size))
    new = bytearray(old)
    for where, length, value in edits:
        new[where:where + length] = bytes([value]) * len(new[where:where + length])
    n = max(0, size - cut)                 # compare only the front, as rebase's last step does
    want = reference_runs(old, new, n)
    if kind == "bytes":
        got = diff_runs(bytes(old), bytes(new), n)
    elif kind == "memoryview":
        got = diff_runs(memoryview(old)[:n], memoryview(new)[:n])
    else:
        got = diff_runs(old, new, n)
    assert got == want


def test_diff_runs_cases_at_the_edges():
    old = bytearray(2 * DIFF_BLOCK + 700)
    new = bytearray(old)
    assert diff_runs(old, new) == []
    new[DIFF_BLOCK - 1] = 1                # last sector of one block, first of the next
    new[DIFF_BLOCK] = 1
    new[-1] = 1                            # the short last sector
    assert diff_runs(old, new) == [(DIFF_BLOCK - SECTOR, DIFF_BLOCK + SECTOR),
                                   (2 * DIFF_BLOCK + 512, 2 * DIFF_BLOCK + 700)]
    assert diff_runs(old, new, DIFF_BLOCK) == [(DIFF_BLOCK - SECTOR, DIFF_BLOCK)]
    with pytest.raises(ValueError):
        diff_runs(old, new[:100], 200)
