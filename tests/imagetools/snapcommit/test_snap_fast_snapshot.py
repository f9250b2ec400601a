"""Snapshot transactions on tables written in one run (the whole-run refcount add).

An L2 table whose clusters lie one after the other on the host (an image
written sequentially) has its refcounts changed with one big-integer add
instead of one per cluster. The oracle tests run snapshot -c/-a/-d on such
images with every refcount width where snapshots are possible and the
refusal where they are not (1-bit refcounts), next to qemu-img; the unit
test holds the whole-run add to the per-cluster loop, errors included.
"""

from __future__ import annotations

import random
import types
from array import array

import pytest
from snap_helpers import guest_bytes, qemu_check, snapshot_names

from imagetools.errors import ImageError
from imagetools.formats.qcow2.txn import Txn


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [8, 16, 64])
def test_snapshots_of_sequential_tables_match_qemu_img(pair, bits):
    pair.setup("image", "s.qcow2", "qcow2", "32M", "write -P 1 0 12M", "write -P 2 20M 64k",
               opts=f"cluster_size=64k,refcount_bits={bits}")
    steps = [("snapshot", "-c", "one", "s.qcow2"), ("snapshot", "-c", "two", "s.qcow2"),
             ("snapshot", "-d", "one", "s.qcow2"), ("snapshot", "-a", "two", "s.qcow2"),
             ("snapshot", "-d", "two", "s.qcow2")]
    pair.setup("io", "qcow2", "s.qcow2")
    for k, step in enumerate(steps):
        pair.same(*step)
        if k == 1:                            # after "two": rewrite part of the run
            pair.setup("io", "qcow2", "s.qcow2", "write -P 3 4M 1M")
        ref, ours = pair.ref.path("s.qcow2"), pair.ours.path("s.qcow2")
        qemu_check(pair.ours.qemu_img, ours)
        assert snapshot_names(pair.ours.qemu_img, ours) == \
            snapshot_names(pair.ref.qemu_img, ref)
        assert guest_bytes(pair.ours.qemu_img, ours, pair.ours.dir) == \
            guest_bytes(pair.ref.qemu_img, ref, pair.ref.dir)
        for _, name in snapshot_names(pair.ref.qemu_img, ref):
            assert guest_bytes(pair.ours.qemu_img, ours, pair.ours.dir, snapshot=name) == \
                guest_bytes(pair.ref.qemu_img, ref, pair.ref.dir, snapshot=name)


@pytest.mark.oracle
def test_one_bit_refcounts_refuse_a_snapshot_as_qemu_img(pair):
    pair.setup("image", "r.qcow2", "qcow2", "16M", "write -P 1 0 8M",
               opts="refcount_bits=1")
    with open(pair.ours.path("r.qcow2"), "rb") as f:
        before = f.read()
    run = pair.same("snapshot", "-c", "s", "r.qcow2")
    assert run.rc == 1 and b"Invalid argument" in run.err
    with open(pair.ours.path("r.qcow2"), "rb") as f:
        assert f.read() == before               # refused before anything was written


def _txn(code: str, limit: int, counts: list[int]) -> Txn:
    txn = Txn.__new__(Txn)                    # only what _add_many uses
    txn.layout = types.SimpleNamespace(refcount_max=limit)
    txn.counts = array(code, counts)
    return txn


def _loop(txn: Txn, clusters: list[int], delta: int):
    """The per-cluster rule, as add() applies it: (counts, error or None)."""
    counts = array(txn.counts.typecode, txn.counts)
    for c in clusters:
        value = counts[c] + delta
        if value < 0:
            return counts, f"Refcount underflow at cluster {c:#x}"
        if value > txn.layout.refcount_max:
            return counts, "Invalid argument"
        counts[c] = value
    return counts, None


@pytest.mark.parametrize("code,limit", [("B", 1), ("B", 15), ("B", 255), ("H", 65535),
                                        ("I", 2 ** 32 - 1), ("Q", 2 ** 64 - 1)])
def test_whole_run_add_is_the_per_cluster_add(code, limit):
    rng = random.Random(limit)
    for _ in range(40):
        n = 600
        counts = [rng.choice([0, 1, 1, 2, limit, limit - 1]) for _ in range(n)]
        first = rng.randrange(0, 300)
        clusters = list(range(first, first + rng.randrange(65, 300)))
        delta = rng.choice([1, -1])
        txn = _txn(code, limit, counts)
        expected, error = _loop(txn, clusters, delta)
        if error is None:
            txn._add_many(clusters, delta)
            assert txn.counts == expected
        else:
            with pytest.raises(ImageError, match=error):
                txn._add_many(clusters, delta)
    # a run where every value may move: the add without any edge value
    txn = _txn(code, limit, [min(1, limit - 1) if limit > 1 else 0] * 400)
    expected, error = _loop(txn, list(range(10, 390)), 1)
    assert error is None
    txn._add_many(list(range(10, 390)), 1)
    assert txn.counts == expected
